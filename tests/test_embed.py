"""Stage 1 (per-image textual inversion) on tiny random components: batched = one image at a time,
resumable shards, clear errors."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusion_fixtures import SMALL

from ncis_core import diffusion as D
from ncis_core.config import load_config
from ncis_core.runs import RunDir
from ncis_core.stages import embed


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("smoke", SMALL + ["embed.steps=3", "embed.noise_batch=4"])
    pipe, tokens, split, dataset = embed.prepare(cfg)
    return cfg, pipe, tokens, dataset


def test_timestep_grid_is_the_papers():
    grid = embed.timestep_grid(load_config("cifar100").embed)
    assert grid[0] == 1 and grid[1] == 21 and grid[-1] == 981 and len(grid) == 50


def test_batched_equals_one_image_at_a_time(setup):
    cfg, pipe, tokens, dataset = setup
    images = list(range(6))  # two images of each of three classes
    batched = embed.embed_indices(pipe, tokens, dataset, images,
                                  replace(cfg, embed=replace(cfg.embed, images_per_step=6)))
    alone = torch.cat([embed.embed_indices(pipe, tokens, dataset, [i], cfg) for i in images])
    chunked = embed.embed_indices(pipe, tokens, dataset, images,
                                  replace(cfg, embed=replace(cfg.embed, images_per_step=6, micro_batch=4)))
    assert (batched - alone).abs().max() <= 1e-4
    assert (batched - chunked).abs().max() <= 1e-4
    # the rows moved away from their class token's row, each image its own way
    table = D.embedding_table(pipe.text_encoder).weight
    labels = [dataset[i][1] for i in images]
    start = table[[tokens.token_ids[c] for c in labels]]
    moved = (batched - start).abs().amax(1)
    assert (moved > 1e-3).all() and (moved < 3 * cfg.embed.steps * cfg.embed.lr).all()
    assert not torch.allclose(batched[0], batched[1])


def test_stage_resumes_from_shards_after_an_interruption(tmp_path):
    cfg = load_config("smoke", SMALL, out=str(tmp_path / "a"))
    run = RunDir.create(cfg)

    def interrupt(shard):
        if shard == 1:
            raise KeyboardInterrupt  # as if killed after two of the three shards

    with pytest.raises(KeyboardInterrupt):
        embed.run(cfg, run, progress=False, on_shard_end=interrupt)
    parts = sorted(p.name for p in embed.shards_dir(run).iterdir())
    assert parts == ["shard-00000.safetensors", "shard-00001.safetensors"]
    redone = []
    resumed = embed.run(cfg, run, progress=False, on_shard_end=redone.append)
    assert redone == [2] and not embed.shards_dir(run).exists()
    assert run.manifest()["stages"]["embed"]["status"] == "complete"

    fresh = embed.run(load_config("smoke", SMALL, out=str(tmp_path / "b")),
                      RunDir.create(load_config("smoke", SMALL, out=str(tmp_path / "b"))), progress=False)
    assert torch.equal(resumed["embeddings"], fresh["embeddings"])
    assert resumed["embeddings"].shape == (12, 32)
    assert resumed["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert resumed["image_ids"].tolist() == list(range(12))
    assert resumed["class_names"] == ["bear", "bird", "cat", "dog", "elephant", "giraffe"]
    assert resumed["metadata"]["class_token"] == "placeholder"


def test_bad_prompt_is_refused(setup):
    cfg, pipe, tokens, dataset = setup
    bad = replace(cfg, embed=replace(cfg.embed, prompt="An image"))
    with pytest.raises(ValueError, match="has no '{}'"):
        embed.embed_indices(pipe, tokens, dataset, [0], bad)

# The two-process accelerate run of this stage is in test_generate.py: one launch runs both
# diffusion stages (each launch costs two interpreter start-ups).


def test_max_per_class_embeds_a_subset_with_the_splits_image_ids(tmp_path):
    from ncis_core.data import get_split

    cfg = load_config("smoke", [*SMALL, "embed.max_per_class=2"], out=str(tmp_path / "run"))
    out = embed.run(cfg, RunDir.create(cfg), progress=False)
    labels = np.asarray(get_split(cfg.data, "id-train").dataset.labels)
    assert len(out["labels"]) == 2 * 6
    assert np.array_equal(labels[out["image_ids"].numpy()], out["labels"].numpy())
    assert np.bincount(out["labels"].numpy()).tolist() == [2] * 6


def _hand_alphas_cumprod() -> torch.Tensor:
    """SD's scheduler by hand (METHOD.md §1): β linear in √β from 0.00085 to 0.012, T = 1000."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_latents_are_the_vae_posterior_mode_times_the_scaling_factor(setup):
    cfg, pipe, tokens, dataset = setup
    images = np.stack([dataset[i][0] for i in range(3)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)  # the tiny VAE has SD's factor
    with torch.no_grad():
        direct = pipe.vae.encode(x).latent_dist.mean * 0.18215  # a diagonal Gaussian's mode = its mean
    torch.testing.assert_close(embed.encode_latents(pipe, embed.to_model_range(images)), direct)


def test_one_inversion_equals_a_hand_written_adam_loop(setup):
    """Stage 1 for one image (encode, prompt, timesteps and noise from the image's generator, the
    DDPM noising x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, Adam on the class token's row) against a loop written
    from METHOD.md §1; the row enters the text encoder by a functional call with an edited table,
    not through the kit's hook."""
    from torch.func import functional_call

    cfg, pipe, tokens, dataset = setup
    ecfg = cfg.embed
    i = 2
    image, label = dataset[i]
    got = embed.embed_indices(pipe, tokens, dataset, [i], cfg)[0]

    x = torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    te, unet = pipe.text_encoder, pipe.unet
    table = D.embedding_table(te)
    name = next(n for n, p in te.named_parameters() if p is table.weight)
    tok = tokens.token_ids[label]
    ids = pipe.tokenizer(ecfg.prompt.format(tokens.prompt_words[label]), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    assert (ids == tok).sum() == 1
    alphas = _hand_alphas_cumprod()
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.float(), alphas)
    grid = torch.arange(1, 1000, 20)  # {1, 21, …, 981}
    n = ecfg.noise_batch
    row = table.weight[tok].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([row], lr=1e-2)
    g = embed.image_generator(cfg.run.seed, i)
    for _ in range(ecfg.steps):
        t = grid[torch.randint(len(grid), (n,), generator=g)]
        eps = torch.randn((n, *z0.shape[1:]), generator=g)
        weight = torch.cat([table.weight[:tok].detach(), row[None], table.weight[tok + 1:].detach()])
        ctx = functional_call(te, {name: weight}, (ids,))[0]
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(zt, t, encoder_hidden_states=ctx.expand(n, -1, -1)).sample
        loss = ((pred - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (row - table.weight[tok]).abs().max() > 1e-3  # it moved
    torch.testing.assert_close(got, row.detach(), rtol=0, atol=1e-5)
