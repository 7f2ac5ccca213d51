"""ncis_core.diffusion on tiny random components built from configs (never a download): loading,
class tokens, row swaps, per-sample prompt embeddings, two seeded inference steps on the CPU."""

import numpy as np
import pytest
import torch

from ncis_core import diffusion as D
from ncis_core.config import DiffusionConfig

TINY = DiffusionConfig(pipeline=D.TINY_RANDOM, dtype="float32")
WORDS = ["bear", "cat", "fish", "aquarium", "chimp"]


@pytest.fixture(scope="module")
def pipe():
    return D.load_pipeline(TINY, words=WORDS)


def test_tiny_pipeline_is_cached_seeded_and_runs_two_steps(pipe):
    assert D.load_pipeline(TINY, words=WORDS) is pipe
    assert pipe.safety_checker is None
    assert D.embedding_width(pipe) == pipe.unet.config.cross_attention_dim == 32
    assert pipe.tokenizer.tokenize("An image of a bear") == ["an</w>", "image</w>", "of</w>", "a</w>", "bear</w>"]
    other = D.build_tiny_pipeline(WORDS, seed=0)
    assert torch.equal(other.unet.conv_in.weight, pipe.unet.conv_in.weight)

    def two_steps():
        return pipe("An image of a bear", num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    first, again = two_steps(), two_steps()
    assert first.shape == (1, 32, 32, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)


def test_saved_folder_loads_through_from_pretrained_like_sd14(pipe, tmp_path):
    folder = tmp_path / "generator"
    pipe.save_pretrained(str(folder))
    loaded = D.load_pipeline(DiffusionConfig(pipeline=str(folder), dtype="float32"))
    ids = D.tokenize(loaded.tokenizer, ["An image of a cat"])
    torch.testing.assert_close(D.encode_prompts(loaded, ids), D.encode_prompts(pipe, ids))


@pytest.mark.parametrize("source, needle", [
    ("CompVis/stable-diffusion-v1-4", "diffusion.pipeline=/path/to/folder"),
    ("data/no-such/generator", "neither an existing local folder"),
])
def test_unreachable_pipeline_says_how_to_point_at_a_local_copy(source, needle):
    with pytest.raises(D.PipelineLoadError, match="sd-v1-4.ckpt") as err:
        D.load_pipeline(DiffusionConfig(pipeline=source))
    assert needle in str(err.value)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(D.PipelineLoadError, match="model_index.json"):
        D.load_pipeline(DiffusionConfig(pipeline=str(tmp_path)))


def test_encode_matches_the_pipeline_and_per_sample_vectors_match_swapped_rows(pipe):
    prompts = ["An image of a bear", "An image of a cat", "An image of a bear"]
    ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(D.encode_prompts(pipe, prompts), ref, rtol=0, atol=0)
    tokens = D.class_tokens(pipe, ["bear", "cat"], "first_piece")
    ids = D.tokenize(pipe.tokenizer, prompts)
    per_token = [tokens.token_ids[c] for c in (0, 1, 0)]
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    batched = D.encode_prompts(pipe, ids, per_token, vectors)
    for b in range(3):  # each sample = the paper's row swap with its own vector
        with D.swap_rows(pipe.text_encoder, [per_token[b]], vectors[b:b + 1]):
            alone = D.encode_prompts(pipe, ids[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], alone)
    assert not torch.allclose(batched[0], batched[2])  # same prompt, different vectors


def test_gradients_reach_the_vectors_and_the_table_is_untouched(pipe):
    tokens = D.class_tokens(pipe, ["bear"], "first_piece")
    table = D.embedding_table(pipe.text_encoder).weight.clone()
    v = torch.zeros(2, 32, requires_grad=True)
    D.encode_prompts(pipe, ["An image of a bear"] * 2, tokens.token_ids * 2, v).square().sum().backward()
    assert v.grad.abs().sum(1).min() > 0
    assert torch.equal(table, D.embedding_table(pipe.text_encoder).weight)


def test_swap_rows_restores_on_exceptions(pipe):
    weight = D.embedding_table(pipe.text_encoder).weight
    before = weight.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with D.swap_rows(pipe.text_encoder, [5, 7], torch.ones(2, 32)):
            assert torch.equal(weight[5], torch.ones(32))
            raise RuntimeError("boom")
    assert torch.equal(weight, before)


def test_first_piece_and_placeholder_tokens(pipe):
    names, longs = ["fish", "chimp", "cockroach"], ["aquarium fish", "chimpanzee", "cockroach"]
    first = D.class_tokens(pipe, names, "first_piece", longs)
    assert first.tokens[0] == "fish</w>" and first.tokens[2] == "c"  # not in the tiny vocab: letters
    assert "cockroach" in first.multi_piece and "fish" not in first.multi_piece
    # The paper's CIFAR class 21 ("chimp"'s piece is not in "chimpanzee"'s prompt), on tiny words:
    odd = D.class_tokens(pipe, ["fish", "bear"], "first_piece", ["aquarium fish", "cat"])
    assert D.tokens_missing_from_prompt(pipe, odd, "A high-quality image of the {}") == [1]

    table = D.embedding_table(pipe.text_encoder).weight
    placeholder = D.class_tokens(pipe, names, "placeholder", longs)
    assert placeholder.tokens == ["<fish>", "<chimp>", "<cockroach>"]
    assert placeholder.generation_words == ["aquarium <fish>", "<chimp>", "<cockroach>"]
    assert D.tokens_missing_from_prompt(pipe, placeholder, "A high-quality image of the {}") == []
    assert pipe.tokenizer.tokenize("An image of a <cockroach>")[-1] == "<cockroach>"
    pieces = pipe.tokenizer.convert_tokens_to_ids(placeholder.pieces[2])
    torch.testing.assert_close(table[placeholder.token_ids[2]], table[pieces].mean(0))
    again = D.class_tokens(pipe, names, "placeholder", longs)  # idempotent on the cached pipeline
    assert again.token_ids == placeholder.token_ids


def test_bad_inputs_give_clear_messages(pipe):
    with pytest.raises(ValueError, match="cannot be encoded by the tokenizer"):
        D.class_tokens(pipe, ["bear", "  "], "placeholder")
    with pytest.raises(ValueError, match="unknown diffusion.class_token"):
        D.class_tokens(pipe, ["bear"], "middle_piece")
    with pytest.raises(ValueError, match="width 16 .* input-embedding width is 32"):
        D.encode_prompts(pipe, ["An image of a bear"], [0], torch.zeros(1, 16))


def test_no_hook_stays_on_the_embedding_table_after_encode_prompts(pipe):
    """The per-sample vectors enter through a forward hook on the table: gone after a normal call
    and after one that raises mid-forward (a left-over hook used to surface only as a shape crash
    in the next, differently sized call)."""
    table = D.embedding_table(pipe.text_encoder)
    before = dict(table._forward_hooks)
    tokens = D.class_tokens(pipe, ["bear"], "first_piece")
    D.encode_prompts(pipe, ["An image of a bear"] * 2, tokens.token_ids * 2, torch.zeros(2, 32))
    assert dict(table._forward_hooks) == before

    def boom(module, args, output):
        raise RuntimeError("boom")

    last_norm = [m for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm)][-1]
    later = last_norm.register_forward_hook(boom)  # after the table, inside the encoder's forward
    try:
        with pytest.raises(RuntimeError, match="boom"):
            D.encode_prompts(pipe, ["An image of a bear"], tokens.token_ids, torch.zeros(1, 32))
    finally:
        later.remove()
    assert dict(table._forward_hooks) == before
    # and the table is plain again: a prompt without vectors is the pipeline's own encoding
    ref, _ = pipe.encode_prompt(["An image of a bear"], "cpu", 1, False)
    torch.testing.assert_close(D.encode_prompts(pipe, ["An image of a bear"]), ref, rtol=0, atol=0)
