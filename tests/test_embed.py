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
