"""The demo generator: offline tokenizer, the train-generator command on a tiny configuration, and
the shipped pipeline folder (loads with ``StableDiffusionPipeline.from_pretrained`` offline, generates)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in this file may reach the hub
os.environ.setdefault("TQDM_DISABLE", "1")

from diffusers import StableDiffusionPipeline  # noqa: E402

from ncis_core import assets  # noqa: E402
from ncis_core import demo_generator as dg  # noqa: E402
from ncis_core.config import load_config  # noqa: E402
from ncis_core.data.classes import DEMO_ID_CLASSES, DEMO_NEAR_CLASSES  # noqa: E402
from ncis_core.demo_generator.train import _encode_all  # noqa: E402
from ncis_core.diffusion import build_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = assets.path("data/demo/generator")  # shipped with the package (repository: data/demo/generator)
TINY = ["data.max_per_class=4", "generator.vae_steps=2", "generator.unet_steps=3",
        "generator.checkpoint_every=2"]


def _generate(pipe, prompt="An image of a cat", guidance=3.0):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, guidance_scale=guidance, generator=g, output_type="np").images


def test_tokenizer_keeps_class_names_and_prompt_words_whole():
    tok = build_tokenizer(dg.DEMO_WORDS)
    for word in list(DEMO_ID_CLASSES) + list(DEMO_NEAR_CLASSES) + ["an", "image", "of", "a", "the"]:
        assert tok.tokenize(word) == [word + "</w>"], word
    ids = tok("An image of a giraffe").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 7
    assert tok.model_max_length == 77  # SD 1.4's context length: the pipeline pads to it


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The command itself, on the smoke preset's tiny generator, for a few steps."""
    base = tmp_path_factory.mktemp("gen")
    out, work = base / "pipe", base / "work"
    cmd = [sys.executable, "-m", "ncis_core", "train-generator", "--preset", "smoke", "--out", str(out),
           "--work", str(work)] + [a for s in TINY for a in ("--set", s)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, work, cmd, env


@pytest.mark.heavy
def test_train_generator_command_makes_a_loadable_pipeline(tiny_folder):
    out, work, _, _ = tiny_folder
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / part).exists(), part
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.__class__.__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    image = _generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # the measured scaling factor is what was saved, not SD's 0.18215
    record = json.loads((out / "training.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)
    assert (work / "unet.json").exists() and (work / "vae.safetensors").exists()


@pytest.mark.heavy
def test_train_generator_resumes_from_its_checkpoints(tiny_folder, caplog):
    out, work, _, _ = tiny_folder
    before = json.loads((work / "unet.json").read_text())
    assert before["step"] == 3
    weights = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    # finished checkpoints are resumed: the rerun trains nothing and saves the same weights
    caplog.set_level(logging.INFO, logger="ncis_core")
    dg.train_generator(load_config("smoke", TINY), out=out, work=work, progress=False)
    assert "resuming unet from step 3" in caplog.text
    record = json.loads((out / "training.json").read_text())
    assert record["history"]["unet"] == before["history"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    # a checkpoint of another configuration is refused, not silently mixed in
    with pytest.raises(ValueError, match="different generator config"):
        dg.train_generator(load_config("smoke", TINY + ["generator.unet_lr=0.5"]), out=out, work=work,
                           progress=False)


def test_scaling_factor_is_one_over_latent_std():
    gcfg = load_config("smoke").generator
    torch.manual_seed(0)
    vae = dg.build_vae(gcfg).eval()
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    scale = dg.measure_scaling_factor(vae, x)
    mean, std = _encode_all(vae, x)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert scale == pytest.approx(1 / z.std().item(), rel=1e-5)


def test_the_ema_is_diffusers_emamodel_with_the_kits_warm_up():
    """EMAModel(decay) against the hand-written EMA it replaced (shadow ← d·shadow + (1 − d)·w with
    d = min(decay, (1 + s) / (10 + s)) at the 0-based step s): the same d from the second update on;
    the first update copies the weights (d = 0, where the old EMA kept 10 % of the initial ones), and
    the warm-up's product of decays leaves ~1e-12 of that after 100 updates, so after a run the
    shadows agree to float rounding (EMAModel computes s − (1 − d)(s − w))."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    module, decay = torch.nn.Linear(6, 3), 0.95  # the cap is reached at s = 170
    ema = EMAModel(module.parameters(), decay=decay)
    shadow = [p.detach().clone() for p in module.parameters()]
    for s in range(300):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * torch.randn_like(p))
        d = min(decay, (1 + s) / (10 + s))
        for old, p in zip(shadow, module.parameters()):
            old.mul_(d).add_(p.detach(), alpha=1 - d)
        ema.step(module.parameters())
        if s == 0:
            assert ema.cur_decay_value == 0.0
            assert all(torch.equal(e, p) for e, p in zip(ema.shadow_params, module.parameters()))
        else:
            assert ema.cur_decay_value == d
    for e, old in zip(ema.shadow_params, shadow):
        torch.testing.assert_close(e, old, rtol=1e-5, atol=1e-6)


def _tiny_generator(*overrides):
    from ncis_core.device import seed_everything

    cfg = load_config("smoke", ["data.max_per_class=4", "generator.warmup_steps=2", *overrides])
    seed_everything(0)
    x, labels, classes = dg.training_images(cfg)
    tok = build_tokenizer(tuple(dg.DEMO_WORDS) + tuple(c.lower() for c in classes if c.lower() not in dg.DEMO_WORDS))
    vae, text_encoder, unet = (dg.build_vae(cfg.generator), dg.build_text_encoder(cfg.generator, tok),
                               dg.build_unet(cfg.generator))
    return cfg.generator, x, labels, classes, tok, vae, text_encoder, unet


def test_both_phases_learning_rates_are_lambdalr_of_the_warm_up_factor_bit_for_bit(tmp_path, monkeypatch):
    """LambdaLR's base lr × factor is the product the rates were set to by hand: every step's rate,
    both groups of the UNet phase, is unchanged (so is a retrained generator)."""
    from ncis_core.demo_generator.train import _lr_factor

    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            seen.append([group["lr"] for group in self.param_groups])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    g, x, labels, classes, tok, vae, text_encoder, unet = _tiny_generator(
        "generator.vae_steps=4", "generator.unet_steps=5")
    dg.train_vae(vae, x, g, tmp_path, 0, progress=False)
    assert seen == [[g.vae_lr * _lr_factor(s, 4, 2)] for s in range(4)]
    seen.clear()
    dg.train_unet(unet, text_encoder, tok, _encode_all(vae, x), labels, classes, g, tmp_path, 0, progress=False)
    assert seen == [[g.unet_lr * _lr_factor(s, 5, 2), g.text_lr * _lr_factor(s, 5, 2)] for s in range(5)]


def test_an_interrupted_unet_phase_resumes_to_the_same_weights_and_ema(tmp_path, monkeypatch):
    from ncis_core.demo_generator import train as dg_train

    steps = ("generator.unet_steps=4", "generator.checkpoint_every=2")
    g, x, labels, classes, tok, vae, text_encoder, unet = _tiny_generator(*steps)
    latents = _encode_all(vae, x)
    history, ema_u, ema_t = dg.train_unet(unet, text_encoder, tok, latents, labels, classes, g, tmp_path / "a", 0,
                                          progress=False)
    straight = unet.state_dict()

    real = dg_train._step_generator

    def killed_at_step_3(seed, phase, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(seed, phase, step)

    g, x, labels, classes, tok, vae, text_encoder, unet = _tiny_generator(*steps)
    monkeypatch.setattr(dg_train, "_step_generator", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        dg.train_unet(unet, text_encoder, tok, latents, labels, classes, g, tmp_path / "b", 0, progress=False)
    assert json.loads((tmp_path / "b" / "unet.json").read_text())["step"] == 2
    monkeypatch.setattr(dg_train, "_step_generator", real)
    g, x, labels, classes, tok, vae, text_encoder, again = _tiny_generator(*steps)
    resumed, ema_u2, ema_t2 = dg.train_unet(again, text_encoder, tok, latents, labels, classes, g, tmp_path / "b",
                                            0, progress=False)
    assert resumed == history
    assert all(torch.equal(straight[k], v) for k, v in again.state_dict().items())
    for first, second in ((ema_u, ema_u2), (ema_t, ema_t2)):
        assert first.optimization_step == second.optimization_step == 4
        assert all(torch.equal(a, b) for a, b in zip(first.shadow_params, second.shadow_params))


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="generator not shipped yet")
def test_shipped_generator_loads_offline_and_generates():
    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED), local_files_only=True,
                                                   dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for word in list(DEMO_ID_CLASSES) + list(DEMO_NEAR_CLASSES):
        assert pipe.tokenizer.tokenize(word) == [word + "</w>"], word
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)
    image = _generate(pipe, "An image of a giraffe", guidance=5.0)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 30 * 2**20


@pytest.mark.heavy
def test_extras_notebook_trains_and_draws_on_smoke(tmp_path):
    """notebooks/extras/train_demo_generator.ipynb through papermill on the tiny smoke generator."""
    import papermill

    from ncis_core.runner import NOTEBOOK_DIR

    out = tmp_path / "nb"
    papermill.execute_notebook(
        str(NOTEBOOK_DIR / "extras" / "train_demo_generator.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters={"preset": "smoke", "run_dir": str(out), "overrides": [
            f"generator.out={tmp_path / 'gen'}", f"generator.work_dir={tmp_path / 'work'}"]},
        progress_bar=False, cwd=str(tmp_path))
    for figure in ["generator_losses.png", "generator_montage.png", "generator_vae_reconstructions.png"]:
        assert (out / "figures" / figure).stat().st_size > 1000
