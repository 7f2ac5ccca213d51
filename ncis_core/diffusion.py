"""Stable Diffusion for stages 1 and 4: loading, class tokens, and per-sample prompt embeddings.

:func:`load_pipeline` (hub id, diffusers folder, single-file checkpoint or ``tiny-random``; cached),
:func:`class_tokens`, :func:`swap_rows` (the paper's injection) and :func:`encode_prompts` (one
class-token vector per sample, differentiable) over the CLIP text encoder's token-embedding table.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .errors import user_error
from . import assets
from .progress import bar_options

__all__ = [
    "vae_reconstruct",
    "TINY_RANDOM",
    "tiny_configs",
    "offline_tokenizer",
    "build_tokenizer",
    "build_scheduler",
    "build_pipeline",
    "local_source",
    "pipeline_problem",
    "PROMPT_WORDS",
    "PipelineLoadError",
    "resolve_dtype",
    "GENERATION_PRECISIONS",
    "generation_precision",
    "load_pipeline",
    "pipeline_with_class_tokens",
    "class_token_rows",
    "build_tiny_pipeline",
    "clear_pipeline_cache",
    "set_progress",
    "ClassTokens",
    "token_pieces",
    "class_tokens",
    "generation_names",
    "tokens_missing_from_prompt",
    "embedding_table",
    "embedding_width",
    "swap_rows",
    "tokenize",
    "encode_prompts",
]

log = logging.getLogger(__name__)

#: ``diffusion.pipeline`` value that builds tiny random components from configs (smoke, tests).
TINY_RANDOM = "tiny-random"

#: Words of the kit's prompts; the tiny tokenizer keeps them whole.
PROMPT_WORDS: tuple[str, ...] = ("an", "image", "of", "a", "the", "high", "quality")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CACHE: dict[tuple, object] = {}
_SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


@user_error
class PipelineLoadError(RuntimeError):
    """``diffusion.pipeline`` could not be loaded; the message says how to point at a local copy."""


# ----------------------------------------------------------------------------- loading
def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto`` → float16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown diffusion.dtype {name!r}; use auto, {', '.join(_DTYPES)}") from None


#: ``generate.precision`` → the dtype of the generation pipeline's weights
GENERATION_PRECISIONS = {"autocast": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                         "fp32": torch.float32}


def generation_precision(precision: str, device: torch.device | str, autocast_device: str | None = None,
                         autocast_dtype: torch.dtype = torch.float16
                         ) -> tuple[torch.dtype, Callable[[], contextlib.AbstractContextManager]]:
    """``generate.precision`` on ``device`` → ``(weights dtype, context factory)`` for rendering.

    ``autocast``: fp32 weights under fp16 autocast on CUDA (``autocast_device`` forces a device type).
    """
    try:
        dtype = GENERATION_PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown generate.precision {precision!r}; use "
                         f"{', '.join(GENERATION_PRECISIONS)}") from None
    kind = autocast_device or torch.device(device).type
    if precision != "autocast" or (autocast_device is None and kind != "cuda"):
        return dtype, contextlib.nullcontext
    return dtype, functools.partial(torch.autocast, kind, dtype=autocast_dtype)


def _local_path(source: str) -> Path | None:
    """``source`` as an existing local path (:func:`ncis_core.assets.resolve`), or None."""
    return assets.resolve(source)


def _looks_like_hub_id(source: str) -> bool:
    # "owner/name" with no further slashes and no file suffix; anything else is meant as a path.
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None
            and not source.startswith(".") and not source.endswith(_SINGLE_FILE_SUFFIXES))


def _hint(source: str) -> str:
    return (f"Point the config at a local copy instead: `--set diffusion.pipeline=/path/to/folder` "
            f"(a diffusers folder holding model_index.json, e.g. a snapshot of {source}) or "
            f"`--set diffusion.pipeline=/path/to/sd-v1-4.ckpt` (an original single-file checkpoint; "
            f"add `--set diffusion.single_file_config=/path/to/diffusers-folder` to load it offline).")


def local_source(source: str) -> Path | None:
    """``diffusion.pipeline`` (or ``single_file_config``) as the loader's local path, or None."""
    return _local_path(source) if source else None


def pipeline_problem(dcfg) -> str | None:
    """Why ``dcfg.pipeline`` could not be loaded without a download, or None; nothing is loaded."""
    dcfg = getattr(dcfg, "diffusion", dcfg)
    source = dcfg.pipeline
    if source == TINY_RANDOM:
        return None
    path = _local_path(source)
    if path is not None and path.is_dir():
        if not (path / "model_index.json").exists():
            return (f"diffusion.pipeline={source!r} is a folder without model_index.json, so it is not a "
                    f"diffusers pipeline (save one with `pipe.save_pretrained(folder)`). " + _hint(source))
        return None
    if path is not None and path.is_file():
        config = dcfg.single_file_config
        if config and _local_path(config) is not None:
            return None
        if config and _looks_like_hub_id(config) and _in_hub_cache(config):
            return None
        return (f"the single-file checkpoint {path} needs its component configs and tokenizer: "
                f"diffusion.single_file_config={config!r} is " + ("neither a local folder nor in the "
                f"Hugging Face cache" if config else "empty, so diffusers would fetch them from the hub")
                + "; set it to a local diffusers folder of the same model (e.g. a snapshot of "
                  "CompVis/stable-diffusion-v1-4).")
    if not _looks_like_hub_id(source):
        return (f"diffusion.pipeline={source!r} is neither an existing local folder or file nor a hub id "
                f"(owner/name). " + _hint(source))
    if not _in_hub_cache(source):
        from huggingface_hub.constants import HF_HUB_CACHE

        return (f"diffusion.pipeline={source!r} is not in the Hugging Face cache ({HF_HUB_CACHE}), so "
                f"stage 1 would download it (about 4 GB; this fails offline). " + _hint(source))
    return None


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return isinstance(found, str)


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte → printable character table, which its BPE vocab uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(words: Sequence[str] = (), max_length: int = 77):
    """A ``CLIPTokenizer`` built offline whose vocabulary holds every byte and every word in ``words``.

        >>> tok = build_tokenizer(["giraffe"])
        >>> tok.tokenize("An image of a giraffe")[-1]
        'giraffe</w>'
    """
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2:
            continue  # a one-letter word is already the byte token "a</w>"
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            merge = (prefix, piece)
            prefix = prefix + piece
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(prefix, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    broken = [w for w in words if tok.tokenize(w) != [w.lower() + "</w>"]]
    if broken:  # another word's chain won over this one's: reorder the words or add a merge
        raise ValueError(f"tokenizer splits {broken}: {[tok.tokenize(w) for w in broken]}")
    return tok


def build_scheduler(kind: str = "pndm"):
    """SD 1.4's scheduler settings: PNDM (PLMS, ``skip_prk_steps``) for sampling, DDPM for training."""
    from diffusers import DDPMScheduler, PNDMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", steps_offset=1)
    if kind == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)


def build_pipeline(vae, text_encoder, tokenizer, unet):
    """A ``StableDiffusionPipeline`` from the parts, with SD's PNDM scheduler and no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler("pndm"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def offline_tokenizer(words: Sequence[str] = ()):
    """An offline ``CLIPTokenizer`` keeping :data:`PROMPT_WORDS` and ``words`` whole where it can."""
    vocab_words = tuple(dict.fromkeys([*PROMPT_WORDS, *(w.lower() for w in words if w.strip())]))
    # Multi-word names ("aquarium fish") are kept whole word by word.
    vocab_words = tuple(dict.fromkeys(p for w in vocab_words for p in re.findall(r"[a-z]+", w)))
    try:
        return build_tokenizer(vocab_words)
    except ValueError:
        # merge chains collide ("quality" takes aquarium's "q u"): keep words greedily, split the rest
        kept: list[str] = []
        for word in vocab_words:
            try:
                build_tokenizer((*kept, word))
                kept.append(word)
            except ValueError:
                pass
        log.info("offline tokenizer: %s split into pieces", sorted(set(vocab_words) - set(kept)))
        return build_tokenizer(tuple(kept))


def tiny_configs(width: int = 32) -> dict[str, dict]:
    """The component configs of :func:`build_tiny_pipeline` (also what ``plan`` costs for ``tiny-random``)."""
    return {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                     block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=width,
                     attention_head_dim=4, norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    layers_per_block=1, norm_num_groups=8, sample_size=32),
        "text_encoder": dict(vocab_size=1000, hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
    }


def build_tiny_pipeline(words: Sequence[str] = (), seed: int = 0, width: int = 32):
    """A ``StableDiffusionPipeline`` of tiny random components from configs, seeded, no download.

    ``words`` are kept as single tokens; ``width`` is ``D``, the UNet's cross-attention width too.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = offline_tokenizer(words)
    configs = tiny_configs(width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**{
            **configs["text_encoder"], "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length, "projection_dim": width,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}))
    for module in (unet, vae, text_encoder):
        module.eval()
    return build_pipeline(vae, text_encoder, tokenizer, unet)


def _refused_pickle(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it chains) is weights-only unpickling refusing a file."""
    import pickle

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _load(source: str, dtype: torch.dtype, single_file_config: str):
    from diffusers import StableDiffusionPipeline

    common = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    path = _local_path(source)
    if path is not None and path.is_dir():
        if not (path / "model_index.json").exists():
            raise PipelineLoadError(
                f"diffusion.pipeline={source!r} is a folder without model_index.json, so it is not a "
                f"diffusers pipeline (save one with `pipe.save_pretrained(folder)`). " + _hint(source))
        return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **common)
    if path is not None and path.is_file():
        kwargs = dict(common)
        kwargs.pop("requires_safety_checker")
        if single_file_config:
            cfg_path = _local_path(single_file_config)
            kwargs["config"] = str(cfg_path) if cfg_path else single_file_config
        try:
            return StableDiffusionPipeline.from_single_file(
                str(path), local_files_only=bool(os.environ.get("HF_HUB_OFFLINE")), **kwargs)
        except Exception as exc:  # noqa: BLE001 - many hub/network error types; one message
            if _refused_pickle(exc):
                # some published .ckpt files also pickle training objects (e.g. lightning
                # callbacks); weights-only loading rightly refuses to run them
                raise PipelineLoadError(
                    f"{path} holds pickled objects besides tensors, which weights-only loading "
                    f"refuses to unpickle (they could run code). Convert it once on a machine you "
                    f"trust to .safetensors (load it with torch.load(weights_only=False), save its "
                    f"state_dict with safetensors.torch.save_file) and point diffusion.pipeline at "
                    f"that file.") from exc
            raise PipelineLoadError(
                f"could not load the single-file checkpoint {path} ({type(exc).__name__}: {exc}). "
                f"diffusers needs the matching component configs and tokenizer: set "
                f"diffusion.single_file_config to a local diffusers folder of the same model "
                f"(e.g. a snapshot of CompVis/stable-diffusion-v1-4).") from exc
    if not _looks_like_hub_id(source):
        raise PipelineLoadError(
            f"diffusion.pipeline={source!r} is neither an existing local folder or file nor a hub id "
            f"(owner/name). For the demo preset it is the demo generator's folder: train it with "
            f"ncis_core.demo_generator.train_generator (see notebooks/extras/). " + _hint(source))
    try:
        return StableDiffusionPipeline.from_pretrained(source, **common)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated repo: one message
        raise PipelineLoadError(
            f"could not load the Stable Diffusion pipeline {source!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            + _hint(source)) from None


def set_progress(pipe, progress: bool) -> None:
    """The pipeline's own progress bar: off when ``progress`` is false, else tqdm's defaults."""
    pipe.set_progress_bar_config(**bar_options(progress))


def load_pipeline(dcfg, device: torch.device | str = "cpu", words: Sequence[str] = (),
                  progress: bool = False, seed: int = 0, dtype: torch.dtype | None = None):
    """The cached, frozen pipeline named by ``dcfg.pipeline``, on ``device`` in ``dcfg.dtype``.

    Args:
        dcfg: a :class:`~ncis_core.config.DiffusionConfig` (or an ``ExperimentConfig``).
        words, seed: for ``tiny-random`` only: words its tokenizer keeps whole, the weight seed.
        dtype: overrides ``dcfg.dtype`` (stage 1's ``embed.precision``, stage 4's weights dtype).

    Raises:
        PipelineLoadError: an unreachable hub id, a missing folder or an unreadable checkpoint.
    """
    dcfg = getattr(dcfg, "diffusion", dcfg)
    device = torch.device(device)
    if dtype is None:
        dtype = resolve_dtype(dcfg.dtype, device)
    if dcfg.pipeline == TINY_RANDOM:
        key = (TINY_RANDOM, tuple(sorted(set(words))), seed, dtype, str(device))
    else:
        path = _local_path(dcfg.pipeline)
        key = (str(path.resolve()) if path else dcfg.pipeline, dcfg.single_file_config, dtype, str(device))
    pipe = _CACHE.get(key)
    if pipe is None:
        if dcfg.pipeline == TINY_RANDOM:
            pipe = build_tiny_pipeline(words, seed=seed)
        else:
            log.info("loading the diffusion pipeline %s (%s) on %s", dcfg.pipeline, dtype, device)
            pipe = _load(dcfg.pipeline, dtype, dcfg.single_file_config)
        pipe = pipe.to(device=device, dtype=dtype)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)  # frozen: stage 1 differentiates w.r.t. its rows only
        _CACHE[key] = pipe
    set_progress(pipe, progress)
    return pipe


def clear_pipeline_cache() -> None:
    """Forget the cached pipelines (frees their memory)."""
    _CACHE.clear()


# ----------------------------------------------------------------------------- class tokens
def embedding_table(text_encoder) -> torch.nn.Embedding:
    """The text encoder's input token-embedding table (``vocab × D``)."""
    return text_encoder.get_input_embeddings()


def embedding_width(pipe_or_text_encoder) -> int:
    """``D``: the width of the input-embedding table."""
    te = getattr(pipe_or_text_encoder, "text_encoder", pipe_or_text_encoder)
    return embedding_table(te).weight.shape[1]


def token_pieces(tokenizer, name: str) -> list[str]:
    """The BPE pieces of ``name``; ValueError when it yields no token or an unknown one."""
    pieces = tokenizer.tokenize(name)
    if not name.strip() or not pieces:
        raise ValueError(f"class name {name!r} cannot be encoded by the tokenizer: it yields no token")
    ids = tokenizer.convert_tokens_to_ids(pieces)
    unk = tokenizer.unk_token_id
    if any(i is None for i in ids) or (unk is not None and unk in ids
                                       and tokenizer.unk_token not in name):
        raise ValueError(f"class name {name!r} cannot be encoded by the tokenizer: its pieces {pieces} "
                         f"include tokens outside the vocabulary (mapped to {tokenizer.unk_token!r})")
    return pieces


@dataclass(frozen=True)
class ClassTokens:
    """Which row of the input-embedding table stands for each class (all lists are per class).

    Attributes:
        token_ids: the row that stage 1 optimises and stage 4 replaces; ``tokens``: its string.
        pieces: the BPE pieces of the short name.
        prompt_words: what fills ``{}`` of the embedding prompt (short name or placeholder).
        generation_words: what fills ``{}`` of the generation prompt (the long name, injected).
        long_names: the long name itself (the ordinary, un-injected class prompt).
    """

    strategy: str
    names: list[str]
    token_ids: list[int]
    tokens: list[str]
    pieces: list[list[str]]
    prompt_words: list[str]
    generation_words: list[str] = field(default_factory=list)
    long_names: list[str] = field(default_factory=list)

    @property
    def multi_piece(self) -> dict[str, list[str]]:
        """Classes whose short name splits into several BPE pieces → their pieces."""
        return {n: p for n, p in zip(self.names, self.pieces) if len(p) > 1}

    def summary(self) -> dict:
        """A JSON-able record (written into the stage-1 file's metadata)."""
        return {"strategy": self.strategy, "tokens": self.tokens, "token_ids": self.token_ids,
                "multi_piece": self.multi_piece}


def _placeholder(name: str) -> str:
    return "<" + re.sub(r"\s+", "-", name.strip().lower()) + ">"


def generation_names(dataset: str, names: Sequence[str], nail_prompt: str = "concatenated") -> list[str]:
    """The long names of the generation prompt for the short ``names`` of ``dataset`` (CLASSES.md)."""
    from .data.classes import (CIFAR100_LONG, CIFAR100_SHORT, IMAGENET100_NAIL_ORIGINAL, IMAGENET100_NAMES,
                               IMAGENET100_PROMPT_NAMES)

    if nail_prompt not in ("concatenated", "wire_nail"):
        raise ValueError(f"generate.nail_prompt={nail_prompt!r} is not one of concatenated, wire_nail")
    table = {"cifar100": dict(zip(CIFAR100_SHORT, CIFAR100_LONG)),
             "imagenet100": dict(zip(IMAGENET100_NAMES, IMAGENET100_PROMPT_NAMES))}.get(dataset, {})
    if dataset == "imagenet100" and nail_prompt == "concatenated":
        table["nail"] = IMAGENET100_NAIL_ORIGINAL
    return [table.get(n, n) for n in names]


def class_tokens(pipe, names: Sequence[str], strategy: str,
                 long_names: Sequence[str] | None = None) -> ClassTokens:
    """Pick (and for ``placeholder`` create) the class-token rows.

    ``first_piece``: the first BPE piece of each short name (the paper). ``placeholder``: a new token
    ``<name>`` per class, its row the mean of the name's pieces' rows.
    """
    names = [str(n) for n in names]
    long_names = list(long_names) if long_names is not None else list(names)
    if len(long_names) != len(names):
        raise ValueError(f"{len(long_names)} long names for {len(names)} classes")
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    pieces = [token_pieces(tokenizer, n) for n in names]
    multi = {n: p for n, p in zip(names, pieces) if len(p) > 1}
    if multi:
        log.info("%d class names split into several BPE pieces: %s", len(multi),
                 ", ".join(f"{n} → {'+'.join(p)}" for n, p in multi.items()))
    if strategy == "first_piece":
        tokens = [p[0] for p in pieces]
        ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
        return ClassTokens(strategy, names, ids, tokens, pieces, list(names), long_names, long_names)
    if strategy != "placeholder":
        raise ValueError(f"unknown diffusion.class_token {strategy!r}; use first_piece or placeholder")
    tokens = [_placeholder(n) for n in names]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"class names give duplicate placeholder tokens: {tokens}")
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new)
        if len(tokenizer) > embedding_table(text_encoder).num_embeddings:
            # mean_resizing=False: the new rows are set just below, no need to sample them
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            text_encoder.requires_grad_(False)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    for t, i in zip(tokens, ids):
        if tokenizer.tokenize(t) != [t] and tokenizer.tokenize(f"a {t}")[-1] != t:
            raise ValueError(f"the tokenizer does not keep the placeholder {t!r} whole")
    weight = embedding_table(text_encoder).weight
    with torch.no_grad():
        for i, p in zip(ids, pieces):
            piece_ids = torch.as_tensor(tokenizer.convert_tokens_to_ids(p), device=weight.device)
            weight[i] = weight[piece_ids].float().mean(0).to(weight.dtype)
    generation = []
    for name, long, token in zip(names, long_names, tokens):
        pattern = r"(?<![\w])" + re.escape(name) + r"(?![\w])"
        generation.append(re.sub(pattern, token, long, count=1) if re.search(pattern, long) else token)
    return ClassTokens(strategy, names, ids, tokens, pieces, tokens, generation, long_names)


def pipeline_with_class_tokens(cfg, class_names: Sequence[str], device: torch.device | str = "cpu",
                               progress: bool = False, dtype: torch.dtype | None = None):
    """``(pipe, tokens)``: the run's pipeline and the :class:`ClassTokens` of ``class_names``."""
    long_names = generation_names(cfg.data.dataset, class_names, cfg.generate.nail_prompt)
    words = [*class_names, *long_names, *cfg.embed.prompt.replace("{}", " ").split(),
             *cfg.generate.prompt.replace("{}", " ").split()]
    pipe = load_pipeline(cfg.diffusion, device, words=words, progress=progress, seed=cfg.run.seed, dtype=dtype)
    return pipe, class_tokens(pipe, class_names, cfg.diffusion.class_token, long_names)


def class_token_rows(pipe, tokens: "ClassTokens") -> torch.Tensor:
    """``C × D`` float32 (CPU): the class tokens' rows of the pipeline's input-embedding table."""
    table = embedding_table(pipe.text_encoder).weight
    return table[torch.as_tensor(tokens.token_ids, device=table.device)].detach().float().cpu()


def tokens_missing_from_prompt(pipe, tokens: ClassTokens, template: str) -> list[int]:
    """Classes whose token is not in their generation prompt (nothing would be injected)."""
    ids = tokenize(pipe.tokenizer, [template.format(w) for w in tokens.generation_words])
    return [c for c, t in enumerate(tokens.token_ids) if not bool((ids[c] == t).any())]


# ----------------------------------------------------------------------------- injection
@contextlib.contextmanager
def swap_rows(text_encoder, token_ids: Sequence[int], rows: torch.Tensor) -> Iterator[None]:
    """Replace rows ``token_ids`` of the input-embedding table by ``rows`` inside the block, then restore."""
    weight = embedding_table(text_encoder).weight
    index = torch.as_tensor(list(token_ids), dtype=torch.long, device=weight.device)
    rows = torch.as_tensor(rows).to(weight.device, weight.dtype).reshape(len(index), weight.shape[1])
    if len(set(index.tolist())) != len(index):
        raise ValueError("swap_rows needs distinct token ids (one row can hold one vector)")
    with torch.no_grad():
        saved = weight[index].clone()
        weight[index] = rows
    try:
        yield
    finally:
        with torch.no_grad():
            weight[index] = saved


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``B × max_length`` exactly as the SD pipeline makes them (padded, truncated)."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(pipe, prompts: Sequence[str] | torch.Tensor, token_ids: Sequence[int] | None = None,
                   vectors: torch.Tensor | None = None) -> torch.Tensor:
    """The text encoder's ``B × L × D`` context for ``prompts``, sample ``b``'s token ``token_ids[b]``
    given ``vectors[b]`` instead of its table row (differentiable; the table is never written).

    ``prompts``: ``B`` strings or token ids from :func:`tokenize`. Without ``vectors``: the plain encoding.
    """
    text_encoder = pipe.text_encoder
    table = embedding_table(text_encoder)
    device = table.weight.device
    ids = prompts if torch.is_tensor(prompts) else tokenize(pipe.tokenizer, prompts)
    ids = ids.to(device)
    if vectors is None:
        return text_encoder(ids)[0]
    width = table.weight.shape[1]
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise ValueError(f"embeddings of width {vectors.shape[-1]} (shape {tuple(vectors.shape)}) do not "
                         f"fit the text encoder, whose input-embedding width is {width}: they were made "
                         f"with a different diffusion.pipeline")
    if token_ids is None or len(token_ids) != len(ids) or len(vectors) != len(ids):
        raise ValueError(f"{len(ids)} prompts need as many token ids and vectors, got "
                         f"{None if token_ids is None else len(token_ids)} and {len(vectors)}")
    targets = torch.as_tensor(list(token_ids), dtype=ids.dtype, device=device)
    mask = (ids == targets[:, None])[..., None]
    vectors = vectors.to(device=device, dtype=table.weight.dtype)

    def inject(module, args, output):
        return torch.where(mask, vectors[:, None, :], output)

    handle = table.register_forward_hook(inject)
    try:
        return text_encoder(ids)[0]
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- processes


@torch.no_grad()
def vae_reconstruct(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The VAE round trip of ``x`` (``N × 3 × H × W`` in [-1, 1]) through the posterior modes, no grad."""
    out = []
    for i in range(0, len(x), batch):
        out.append(vae.decode(vae.encode(x[i:i + batch]).latent_dist.mode()).sample.clamp(-1, 1))
    return torch.cat(out)
