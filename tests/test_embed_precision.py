"""Stage 1's precision (``embed.precision``) on tiny random components, on the CPU: the pipeline's
dtype comes from it and not from ``diffusion.dtype``; bf16 and fp16 rows stay close to fp32's; fp16's
loss scale keeps the gradient at the UNet output from flushing to zero, and an overflow redoes the
step with the same noise."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusion_fixtures import SMALL

from ncis_core import diffusion as D
from ncis_core.config import load_config
from ncis_core.runs import RunDir
from ncis_core.stages import embed, generate

IMAGES = list(range(6))  # two images of each of three classes


def _setup(precision: str, extra=()):
    cfg = load_config("smoke", [*SMALL, "embed.steps=3", "embed.noise_batch=4",
                                f"embed.precision={precision}", *extra])
    pipe, tokens, _, dataset = embed.prepare(cfg)
    return cfg, pipe, tokens, dataset


def _batch(pipe, tokens, dataset, cfg, indices):
    """What embed_indices hands to invert for one batch: latents, prompt ids, token ids, init rows."""
    items = [dataset[i] for i in indices]
    labels = [label for _, label in items]
    latents = embed.encode_latents(pipe, embed.to_model_range(np.stack([im for im, _ in items])))
    token_ids = [tokens.token_ids[c] for c in labels]
    init = D.embedding_table(pipe.text_encoder).weight[token_ids].detach().float()
    return latents, embed._prompt_ids(pipe, tokens, cfg.embed.prompt)[labels], token_ids, init


class _GradSpy(torch.optim.Adam):
    """Adam that keeps the gradient of its first step (what the optimiser is given, unscaled)."""

    first: list = []

    def step(self, closure=None):
        if not _GradSpy.first:
            _GradSpy.first.append(self.param_groups[0]["params"][0].grad.detach().clone())
        return super().step(closure)


def _updates_and_grad(precision, monkeypatch):
    cfg, pipe, tokens, dataset = _setup(precision)
    assert pipe.unet.dtype == embed.PRECISIONS[precision] == pipe.text_encoder.dtype
    _GradSpy.first = []
    with monkeypatch.context() as m:
        m.setattr(torch.optim, "Adam", _GradSpy)
        # one batch of all six images, so the spy's first step covers all of them
        rows = embed.embed_indices(pipe, tokens, dataset, IMAGES,
                                   replace(cfg, embed=replace(cfg.embed, images_per_step=len(IMAGES))))
    table = D.embedding_table(pipe.text_encoder).weight
    init = table[[tokens.token_ids[dataset[i][1]] for i in IMAGES]].detach().float()
    assert rows.dtype == torch.float32
    return rows - init, _GradSpy.first[0]


@pytest.fixture(scope="module")
def fp32_reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's function-scoped `one_thread`
    try:
        with pytest.MonkeyPatch.context() as m:
            return _updates_and_grad("fp32", m)
    finally:
        torch.set_num_threads(threads)


# Per-image relative difference of the row updates, ‖Δ_p − Δ_fp32‖ / ‖Δ_fp32‖ with Δ = rows − init
# (each run from its own pipeline's init row), 6 images, 3 steps, noise batch 4. Measured (torch
# 2.13 CPU): bf16 max 0.196 / mean 0.048; fp16 max 0.0037 / mean 0.0022. Adam's first steps are
# ≈ lr · g / |g| entry by entry, so entries with small gradients amplify bf16's (8-bit mantissa)
# gradient error: the first step's gradient is off by 0.027 relative in bf16, 0.0031 in fp16
# (at noise batch 16 bf16's rows differ by 0.029 / 0.020). Tolerances: about twice the measurement.
TOLERANCE = {"bf16": (0.4, 0.1), "fp16": (0.01, 0.005)}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_rows_of_each_precision_are_close_to_fp32(precision, fp32_reference, monkeypatch):
    ref, ref_grad = fp32_reference
    upd, grad = _updates_and_grad(precision, monkeypatch)
    rel = (upd - ref).norm(dim=1) / ref.norm(dim=1)
    max_tol, mean_tol = TOLERANCE[precision]
    assert rel.max() <= max_tol and rel.mean() <= mean_tol, rel
    # Adam hardly cares about a gradient's scale, so the rows alone would not show a missing
    # unscale: the gradient it is given must be the true one (fp16's was scaled by 65536).
    grad_rel = (grad - ref_grad).norm() / ref_grad.norm()
    assert grad_rel < 0.05, grad_rel


def _output_gradient(pipe, tokens, cfg, loss_scale):
    """The gradient at the UNet output (fp16, as cast there) in one fp16 step on an image whose
    per-image loss is a mean over M = 16 × 4 × 32 × 32 = 65536 elements: ~2/M ≈ 3e-5 per element
    before scaling, the size SD-1.4's 32 × 4 × 64 × 64 gives at |ε_θ − ε| ≈ 0.1."""
    ecfg = replace(cfg.embed, steps=1, noise_batch=16, loss_scale=loss_scale)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    token_id = tokens.token_ids[0]
    init = D.embedding_table(pipe.text_encoder).weight[[token_id]].detach().float()
    prompt_ids = embed._prompt_ids(pipe, tokens, ecfg.prompt)[[0]]
    grads = []

    def keep_grad(module, args, output):  # returns None: the output itself is left alone
        output.register_hook(lambda g: grads.append(g.detach().clone()))

    handle = pipe.unet.conv_out.register_forward_hook(keep_grad)  # conv_out's output is ε_θ
    try:
        stats = {}
        embed.invert(pipe, latents, prompt_ids, [token_id], init, ecfg,
                     [embed.image_generator(0, 0)], stats)
    finally:
        handle.remove()
    assert stats == {"loss_scale": loss_scale, "redone_steps": 0}
    (grad,) = grads
    assert grad.dtype == torch.float16
    return grad


@pytest.mark.heavy
def test_fp16_loss_scale_keeps_the_unet_output_gradient_from_flushing_to_zero():
    cfg, pipe, tokens, _ = _setup("fp16")
    unscaled = _output_gradient(pipe, tokens, cfg, 1.0)
    scaled = _output_gradient(pipe, tokens, cfg, 65536.0)
    subnormal = lambda g: float((g.abs() < torch.finfo(torch.float16).tiny).float().mean())  # noqa: E731
    # Measured: unscaled 45 exact zeros of 65536 (0.07 %; a true zero would need ε_θ = ε exactly)
    # and 94 % of the entries subnormal (fp16's normal range starts at 6.1e-5), i.e. with fewer
    # than 10 significant bits; scaled by 65536: no zero and no subnormal entry.
    assert int((unscaled == 0).sum()) >= 20 and subnormal(unscaled) > 0.8
    assert int((scaled == 0).sum()) == 0 and subnormal(scaled) < 0.01


def test_fp16_overflow_halves_the_scale_and_redoes_the_step_with_the_same_noise():
    cfg, pipe, tokens, dataset = _setup("fp16")
    batch = _batch(pipe, tokens, dataset, cfg, [0, 2, 4])

    def run(loss_scale, window=200):
        gens = [embed.image_generator(cfg.run.seed, i) for i in (0, 2, 4)]
        stats = {}
        rows = embed.invert(pipe, *batch, replace(cfg.embed, loss_scale=loss_scale,
                                                  loss_scale_window=window), gens, stats)
        return rows, stats, torch.stack([torch.randn(1, generator=g) for g in gens])

    # 2**30 overflows the fp16 backward pass here (the first finite scale is 2**21 on torch 2.13's
    # CPU kernels): the first step is redone at half the scale until its gradient is finite
    rows, stats, after = run(2.0 ** 30)
    assert stats["redone_steps"] > 0 and stats["loss_scale"] < 2.0 ** 30
    # a run that started at the scale the first one settled at never overflows, and gives the same
    # rows bit for bit: the redone steps drew no new noise (the generators' next draws agree too)
    same_rows, same_stats, same_after = run(stats["loss_scale"])
    assert same_stats == {"loss_scale": stats["loss_scale"], "redone_steps": 0}
    assert torch.equal(rows, same_rows) and torch.equal(after, same_after)
    # and the default start, which does not overflow here, agrees to fp16 rounding
    default_rows, default_stats, _ = run(65536.0)
    assert default_stats["redone_steps"] == 0
    assert (default_rows - rows).abs().max() <= 1e-4
    # clean steps double the scale after each window (here 1 step): 1024 → 8192 in 3 steps
    _, grown, _ = run(1024.0, window=1)
    assert grown == {"loss_scale": 8192.0, "redone_steps": 0}


def test_fp16_refuses_a_bad_loss_scale():
    cfg, pipe, tokens, dataset = _setup("fp16")
    batch = _batch(pipe, tokens, dataset, cfg, [0])
    for bad in ({"loss_scale": 0.0}, {"loss_scale": float("inf")}, {"loss_scale_window": 0}):
        with pytest.raises(ValueError, match="loss_scale"):
            embed.invert(pipe, *batch, replace(cfg.embed, **bad), [embed.image_generator(0, 0)])


def test_diffusion_dtype_does_not_leak_into_stage_1():
    # stage 4's float16 must not become stage 1's: its pipeline is in embed.precision's dtype
    cfg = load_config("smoke", [*SMALL, "diffusion.dtype=float16"])
    assert cfg.embed.precision == "fp32"
    pipe, tokens, _, _ = embed.prepare(cfg, "cpu")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    rows, _ = embed.class_token_rows(cfg)
    table = D.embedding_table(pipe.text_encoder).weight
    assert torch.equal(rows, table[tokens.token_ids].detach())  # exact: no float16 round trip
    bf16 = load_config("smoke", [*SMALL, "diffusion.dtype=float16", "embed.precision=bf16"])
    assert embed.prepare(bf16)[0].unet.dtype == torch.bfloat16
    # stage 4 follows generate.precision (autocast: fp32 weights), not diffusion.dtype either
    gen_pipe, _ = generate.prepare(cfg, tokens.names)
    assert gen_pipe.unet.dtype == torch.float32


def test_stage_records_its_precision(tmp_path):
    cfg = load_config("smoke", [*SMALL, "embed.max_per_class=1", "embed.precision=bf16"],
                      out=str(tmp_path / "run"))
    run = RunDir.create(cfg)
    out = embed.run(cfg, run, progress=False)
    assert out["metadata"]["precision"] == "bf16"
    assert run.manifest()["stages"]["embed"]["info"]["precision"] == "bf16"
