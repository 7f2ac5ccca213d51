"""Stage 4's ``generate.precision``: the original's fp32 weights under fp16 autocast (on CUDA), or
fp16 / bf16 / fp32 weights without autocast, taken from one helper and not from ``diffusion.dtype``.
The autocast is forced onto the CPU (bf16) to check the dtype each part of a render runs in."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusion_fixtures import SMALL  # noqa: F401 - sets the offline environment

from ncis_core import diffusion as D
from ncis_core.config import ConfigError, load_config
from ncis_core.plan import dataset_counts, stage_work
from ncis_core.stages import embed, generate

NAMES = ["bear", "bird"]


def _record(seen: dict, name: str):
    def hook(module, args, output):
        seen.setdefault(name, []).append(output[0] if isinstance(output, tuple) else output)
    return hook


def _hooks(pipe, seen: dict) -> list:
    """Forward hooks on the token embedding, the embeddings (token + position), a LayerNorm and a
    Linear of the text encoder, the final LayerNorm, a conv and a Linear of the UNet and the VAE
    decoder's last conv."""
    text = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 5 has no text_model
    layer = text.encoder.layers[0]
    unet_linear = next(m for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear) and "to_q" in n)
    modules = {"token_embedding": text.embeddings.token_embedding, "embeddings": text.embeddings,
               "layer_norm": layer.layer_norm1, "text_linear": layer.mlp.fc1,
               "final_layer_norm": text.final_layer_norm, "unet_conv": pipe.unet.conv_in,
               "unet_linear": unet_linear, "vae_conv": pipe.vae.decoder.conv_out}
    return [m.register_forward_hook(_record(seen, name)) for name, m in modules.items()]


def _render(pipe, tokens, vectors, gcfg, seen: dict):
    handles = _hooks(pipe, seen)
    try:
        return generate.generate_images(pipe, tokens, 0, vectors, [1, 2], gcfg)
    finally:
        for h in handles:
            h.remove()


def test_autocast_forced_onto_the_cpu_runs_each_part_of_a_render_in_the_originals_dtype(monkeypatch):
    cfg = load_config("smoke", ["generate.steps=1"])
    pipe, tokens = generate.prepare(cfg, NAMES, "cpu")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32  # fp32 weights
    real = D.generation_precision
    monkeypatch.setattr(D, "generation_precision", lambda precision, device: real(
        precision, device, autocast_device="cpu", autocast_dtype=torch.bfloat16))
    width = D.embedding_width(pipe)
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(vectors.bfloat16().float(), vectors)  # a bf16 round trip would show
    seen: dict = {}
    images = _render(pipe, tokens, vectors, cfg.generate, seen)
    assert images.shape == (2, cfg.generate.output_size, cfg.generate.output_size, 3)
    dtypes = {name: {t.dtype for t in outs} for name, outs in seen.items()}
    for name in ("token_embedding", "embeddings", "layer_norm", "final_layer_norm"):
        assert dtypes[name] == {torch.float32}, name
    for name in ("text_linear", "unet_conv", "unet_linear", "vae_conv"):
        assert dtypes[name] == {torch.bfloat16}, name
    # the injected row reaches the encoder in fp32, unrounded: its embeddings are row + position
    ids = D.tokenize(pipe.tokenizer, [cfg.generate.prompt.format(tokens.generation_words[0])] * 2)
    mask = ids == tokens.token_ids[0]
    assert mask.any()
    injected = seen["embeddings"][0]  # the first encoding: the prompt with the outlier rows
    positions = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).embeddings.position_embedding.weight
    for b in range(2):
        for pos in mask[b].nonzero().flatten().tolist():
            assert torch.equal(injected[b, pos], vectors[b] + positions[pos])
    assert pipe.unet.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")  # weights untouched


@pytest.mark.parametrize("precision, dtype", [("autocast", torch.float32), ("fp32", torch.float32),
                                              ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_generation_precision_gives_the_weights_dtype_and_autocasts_on_cuda_only(precision, dtype):
    weights, context = D.generation_precision(precision, "cpu")
    assert weights == dtype
    with context():
        assert not torch.is_autocast_enabled("cpu")
    weights, context = D.generation_precision(precision, "cuda")
    assert weights == dtype
    if precision == "autocast":  # the original: torch.autocast("cuda"), fp16
        assert isinstance(context, functools.partial) and context.func is torch.autocast
        assert context.args == ("cuda",) and context.keywords == {"dtype": torch.float16}
    else:
        with context():
            assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="generate.precision"):
        D.generation_precision("half", "cpu")


@pytest.mark.parametrize("precision, dtype", [("autocast", torch.float32), ("fp32", torch.float32),
                                              ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_stage_4_loads_its_pipeline_in_generate_precision_not_diffusion_dtype(precision, dtype):
    cfg = load_config("smoke", [*SMALL, f"generate.precision={precision}", "diffusion.dtype=float16"])
    stage1, tokens, _, _ = embed.prepare(cfg, "cpu")
    pipe, _ = generate.prepare(cfg, tokens.names, "cpu")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == dtype
    # stage 1's pipeline (embed.precision=fp32) is shared only with a stage 4 of the same dtype
    assert stage1.unet.dtype == torch.float32
    assert (stage1 is pipe) == (dtype == torch.float32)


def test_autocast_on_the_cpu_renders_the_bytes_of_fp32():
    out = {}
    for precision in ("autocast", "fp32"):
        cfg = load_config("smoke", [f"generate.precision={precision}"])
        pipe, tokens = generate.prepare(cfg, NAMES, "cpu")
        vectors = torch.randn(2, D.embedding_width(pipe), generator=torch.Generator().manual_seed(3))
        seen: dict = {}
        out[precision] = _render(pipe, tokens, vectors, cfg.generate, seen)
        assert {t.dtype for t in seen["unet_linear"]} == {torch.float32}  # no autocast
    assert (out["autocast"] == out["fp32"]).all()


@pytest.mark.parametrize("preset", ["cifar100", "imagenet100"])
def test_paper_presets_generate_under_autocast_like_the_original(preset):
    assert load_config(preset).generate.precision == "autocast"


def test_a_bad_generate_precision_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["generate.precision=half"])
    message = str(err.value)
    assert "generate.precision" in message and "autocast" in message and "\n" not in message


@pytest.mark.heavy
def test_plan_prices_stage_4_by_generate_precision():
    def work(precision):
        cfg = load_config("cifar100", [f"generate.precision={precision}"])
        counts, classes, _ = dataset_counts(cfg)
        return stage_work(cfg, counts, classes)["generate"]

    fp16, fp32, autocast = work("fp16"), work("fp32"), work("autocast")
    assert autocast["precision"] == "autocast"
    # fp32 weights with fp16 activations: between fp16's and fp32's memory
    assert fp16["peak_memory_gib"] < autocast["peak_memory_gib"] < fp32["peak_memory_gib"]
    # diffusion.dtype no longer prices stage 4
    cfg = load_config("cifar100", ["diffusion.dtype=float32"])
    counts, classes, _ = dataset_counts(cfg)
    assert stage_work(cfg, counts, classes)["generate"]["peak_memory_gib"] == autocast["peak_memory_gib"]
