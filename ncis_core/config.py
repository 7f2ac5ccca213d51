"""Configuration: one frozen dataclass per stage, presets in YAML, ``stage.key=value`` overrides.

Defaults are the paper's CIFAR-100 values; a preset (``ncis_core/presets/<name>.yaml``) lists what
differs. :func:`load_config` merges schema ← preset ← overrides, type-checked by ``omegaconf``.

    >>> cfg = load_config("smoke", ["cvpn.epochs=3"])
    >>> cfg.cvpn.epochs, cfg.data.dataset
    (3, 'demo')
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import user_error

__all__ = [
    "ConfigError",
    "RunConfig",
    "DataConfig",
    "DiffusionConfig",
    "EmbedConfig",
    "CVPNConfig",
    "SampleConfig",
    "GenerateConfig",
    "ClassifierConfig",
    "EvaluateConfig",
    "CompareConfig",
    "GeneratorConfig",
    "ExperimentConfig",
    "PRESET_DIR",
    "available_presets",
    "preset_summary",
    "load_config",
    "load_run_config",
    "config_to_yaml",
    "config_from_yaml",
    "memo_by_content",
]

PRESET_DIR = Path(__file__).parent / "presets"


@user_error
class ConfigError(ValueError):
    """An unknown preset, an unknown key or a badly typed value; the message lists what is valid."""


@dataclass(frozen=True)
class RunConfig:
    """Run-level settings.

    Args:
        seed: the global seed; every stage derives its generators from it.
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda`` or ``mps``.
        preset: the preset this config came from (written by :func:`load_config`).
    """

    seed: int = 0
    device: str = "auto"
    out: str = "outputs/run"
    preset: str = ""


@dataclass(frozen=True)
class DataConfig:
    """Datasets and their roots (layouts: ``data/README.md``).

    Args:
        dataset: ``demo`` (the embedded animal-silhouette world), ``cifar100`` or ``imagenet100``.
        root: the ID root (cifar100: holds ``cifar-100-python/``; imagenet100: ``train/``, ``val/``).
        ood_sets: OOD test sets (``ncis_core.data.ood.OOD_SETS``; demo: ``demo_near``, ``digits``, ...).
        ood_roots: set name → its root (file or folder); the demo world's sets need none.
        ood_subset_size: images per OOD set (a seeded random subset); ``null`` keeps all.
        subset_seed: seed of the OOD subsets (METHOD.md defect 3).
        resize, image_size: ``Resize`` then ``CenterCrop`` sides (CIFAR 32, 32; ImageNet 256, 224).
        as_is_sets: OOD sets scored at their own size, without Resize/CenterCrop (LSUN-C, iSUN).
        skip_unreadable: skip and count unreadable image files instead of failing on the first.
        max_per_class: at most this many ID images per class and split (``smoke``); ``null``: all.
    """

    dataset: str = "cifar100"
    root: str = "data/cifar100"
    ood_sets: List[str] = field(
        default_factory=lambda: ["svhn", "places365", "lsun_crop", "isun", "textures"])
    ood_roots: Dict[str, str] = field(default_factory=lambda: {
        "svhn": "data/ood/svhn", "places365": "data/ood/places365", "lsun_crop": "data/ood/LSUN",
        "isun": "data/ood/iSUN", "textures": "data/ood/dtd/images"})
    ood_subset_size: Optional[int] = 2000
    subset_seed: int = 0
    resize: int = 32
    image_size: int = 32
    as_is_sets: List[str] = field(default_factory=lambda: ["lsun_crop", "isun"])
    skip_unreadable: bool = False
    max_per_class: Optional[int] = None


@dataclass(frozen=True)
class DiffusionConfig:
    """The Stable Diffusion pipeline shared by stages 1 and 4.

    Args:
        pipeline: a hub id, a local diffusers folder, or an original single-file checkpoint.
        dtype: ``auto`` (fp16 on CUDA, else fp32), ``float32``, ``float16`` or ``bfloat16``.
        class_token: ``first_piece`` (paper) or ``placeholder`` (one new token per class; defect 1).
        single_file_config: a diffusers folder or hub id with a single-file checkpoint's configs.
    """

    pipeline: str = "CompVis/stable-diffusion-v1-4"
    dtype: str = "auto"  # VAE round trips; stage 1: embed.precision, stage 4: generate.precision
    class_token: str = "first_piece"
    single_file_config: str = ""


@dataclass(frozen=True)
class EmbedConfig:
    """Stage 1: per-image textual inversion (METHOD.md §1).

    Args (beyond the paper's values):
        micro_batch: images per UNet call inside a step (0: all ``images_per_step``).
        max_per_class, max_images: embed only the first N per class / in all (null: every image).
        precision: the frozen UNet's dtype: ``fp32`` (original), ``bf16``, ``fp16`` (loss-scaled).
        loss_scale: the starting loss scale of ``precision=fp16``.
    """

    prompt: str = "An image of a {}"
    resolution: int = 512
    steps: int = 3
    lr: float = 1e-2
    noise_batch: int = 32
    timestep_first: int = 1
    timestep_stride: int = 20
    images_per_step: int = 8
    shard_size: int = 512
    micro_batch: int = 0  # bounds memory only: the chunks' gradients add up to the same step
    max_per_class: Optional[int] = None
    max_images: Optional[int] = None
    precision: str = "fp32"
    loss_scale: float = 65536.0
    loss_scale_window: int = 200


@dataclass(frozen=True)
class CVPNConfig:
    """Stage 2: the conditional volume-preserving network (METHOD.md §2).

    Args (beyond the paper's values):
        packed_orthogonal: store only the strict upper triangle of each orthogonal matrix.
        expm: ``auto`` (``eigh`` on the CPU, ``matrix_exp`` elsewhere), ``eigh`` or ``matrix_exp``.
        mixed_precision: bfloat16 autocast for the coupling MLPs on CUDA.
        holdout_fraction: per-class fraction of the embeddings kept out of training (paper: 0).
        selection_subset: ``class_balanced`` (original) or ``dataset_order`` selection points.
        selection_reduce: ``sum`` (original: summed over the k invariants) or ``mean``.
    """

    num_layers: int = 4
    hidden: Optional[int] = None
    variance_pct: float = 5.0
    lr: float = 1e-4
    final_lr_factor: float = 0.1
    batch_size: int = 64
    epochs: int = 200
    center: bool = False
    selection_points: int = 1000
    packed_orthogonal: bool = False
    expm: str = "auto"
    mixed_precision: bool = False
    holdout_fraction: float = 0.0
    selection_subset: str = "class_balanced"
    selection_reduce: str = "sum"


@dataclass(frozen=True)
class SampleConfig:
    """Stage 3: outlier embeddings (METHOD.md §3, §3b).

    Args:
        method: a registered method that produces embeddings (``ncis``, ``linear``, ``knn_boundary``).
        reg_weight, rounds, draws_per_round, keep_per_round: the tail sampler (λ of ``Σ + λI``, ...).
        method_args: ``method_args.<method>.<key>``, e.g. ``sample.method_args.knn_boundary.k=54``.
    """

    method: str = "ncis"
    reg_weight: float = 1e-5
    rounds: int = 10
    draws_per_round: int = 3330
    keep_per_round: int = 10
    method_args: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateConfig:
    """Stage 4: outlier images (METHOD.md §4).

    Args (beyond the paper's values):
        embedding_per: ``batch`` (original: one outlier embedding per batch) or ``image`` (defect 2).
        batch_embedding: ``random`` (original; seeded by ``generate.seed``) or ``cyclic`` (k mod M).
        antialias: antialias the 512 → ``output_size`` resize (the original does not).
        quantize: float → uint8 by ``truncate`` (original) or ``round``.
        precision: ``autocast`` (original: fp16 autocast on CUDA), or ``fp16``/``bf16``/``fp32`` weights.
        nail_prompt: ImageNet-100's ``nail``: ``concatenated`` (original) or ``wire_nail``.
    """

    prompt: str = "A high-quality image of the {}"
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    steps: int = 50
    eta: float = 0.0
    height: int = 512
    width: int = 512
    output_size: int = 256
    seed: int = 42
    num_batches: int = 800  # ≥ 6 400 images: stage 5 draws 6 400 without replacement (cifar100.yaml)
    batch_size: int = 8
    embedding_per: str = "batch"
    batch_embedding: str = "random"
    antialias: bool = False
    quantize: str = "truncate"
    precision: str = "autocast"
    nail_prompt: str = "concatenated"


@dataclass(frozen=True)
class ClassifierConfig:
    """Stage 5: classifier training with synthetic outliers (METHOD.md §5).

    Args (beyond the paper's values):
        precision: ``fp32`` (original) or ``bf16`` (autocast on CUDA).
        drop_last: drop the last partial ID batch of each epoch (the original keeps it).
        outliers_with_replacement: draw ``num_outliers`` with replacement when stage 4 made fewer.
    """

    arch: str = "resnet34"
    width: int = 32  # channels of the first stage of arch=small (the demo network); ResNets ignore it
    pretrained: str = ""
    epochs: int = 250
    batch_size: int = 256
    outlier_batch_size: int = 256
    lr: float = 0.1
    final_lr: float = 1e-6
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    energy_weight: float = 1.0
    energy_head: str = "linear"
    head_hidden: int = 0
    outliers: str = "ncis"
    outlier_folder: str = ""
    num_outliers: Optional[int] = 6400
    outliers_with_replacement: bool = False
    id_generated: str = "none"
    seed: Optional[int] = None  # the classifier's own seed (compare varies it); null: run.seed
    mean: List[float] = field(default_factory=lambda: [125.3 / 255, 123.0 / 255, 113.9 / 255])
    std: List[float] = field(default_factory=lambda: [63.0 / 255, 62.1 / 255, 66.7 / 255])
    num_workers: int = 2
    precision: str = "fp32"
    drop_last: bool = False


@dataclass(frozen=True)
class EvaluateConfig:
    """Stage 6: OOD scores and metrics (METHOD.md §6).

    Args:
        score, extra_scores: the main score (the tables' first) and the others, registered names.
        score_args: ``score_args.<score>.<argument>``, e.g. ``evaluate.score_args.odin.temperature=1000``.
        energy_sign: ``positive`` (original), ``auto`` (the energy head's slope sign) or ``negative``.
        fpr95_rule: ``closest`` (original) or ``first_above``; see :func:`ncis_core.metrics.ood_metrics`.
    """

    score: str = "energy"
    extra_scores: List[str] = field(default_factory=lambda: ["msp", "maxlogit"])
    positive: str = "id"
    score_args: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 256
    energy_sign: str = "positive"
    fpr95_rule: str = "closest"


@dataclass(frozen=True)
class CompareConfig:
    """``compare``: how its trainings run (not what they compute).

    Args:
        max_parallel: stage-5 trainings side by side (1: one at a time; null: the cores, 1 on CUDA).
    """

    max_parallel: Optional[int] = None


@dataclass(frozen=True)
class GeneratorConfig:
    """The demo world's small SD-architecture generator (:mod:`ncis_core.demo_generator`).

    Args:
        out: where ``train-generator`` saves the pipeline (``save_pretrained`` layout).
        work_dir: checkpoints of an unfinished training (resumed on rerun).
        vae_channels: VAE width per level; ``n`` levels shrink 32 px to 32 / 2^(n-1) latents.
        attention_head_dim: diffusers' name for the number of heads.
        text_width: the CLIP text encoder's width, also the UNet's cross-attention width.
        kl_weight: VAE loss = L1 + ``kl_weight`` · KL.
        warmup_steps: linear warm-up of both phases before a cosine decay to 10 %.
        ema_decay: EMA of the UNet and text encoder weights (the EMA is what gets saved).
        empty_prompt_prob: fraction of "" prompts (classifier-free guidance needs them).
        guidance_scale, eval_steps, eval_per_class: the quality check's generation settings.
        threads: torch intra-op threads while training (0: torch's default).
    """

    out: str = "data/demo/generator"
    work_dir: str = "outputs/generator-train"
    image_size: int = 32
    vae_channels: List[int] = field(default_factory=lambda: [16, 32, 64])
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 8
    unet_channels: List[int] = field(default_factory=lambda: [32, 64, 128])
    unet_layers_per_block: int = 1
    attention_head_dim: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    vae_steps: int = 1500
    vae_batch_size: int = 64
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    unet_steps: int = 6000
    unet_batch_size: int = 64
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    empty_prompt_prob: float = 0.1
    prompts: List[str] = field(default_factory=lambda: ["An image of a {}"])
    hflip: bool = True
    checkpoint_every: int = 250
    save_dtype: str = "float32"
    guidance_scale: float = 5.0
    eval_steps: int = 25
    eval_per_class: int = 50
    threads: int = 1


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment: one section per stage plus the run-level one."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cvpn: CVPNConfig = field(default_factory=CVPNConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


# Values a key may take where the type alone does not say (checked after the merge).
_CHOICES = {
    ("run", "device"): ("auto", "cpu", "cuda", "mps"),
    ("data", "dataset"): ("demo", "cifar100", "imagenet100"),
    ("diffusion", "dtype"): ("auto", "float32", "float16", "bfloat16"),
    ("diffusion", "class_token"): ("first_piece", "placeholder"),
    ("cvpn", "expm"): ("auto", "eigh", "matrix_exp"),
    ("embed", "precision"): ("fp32", "bf16", "fp16"),
    ("cvpn", "selection_subset"): ("class_balanced", "dataset_order"),
    ("cvpn", "selection_reduce"): ("sum", "mean"),
    ("generate", "embedding_per"): ("batch", "image"),
    ("generate", "batch_embedding"): ("random", "cyclic"),
    ("generate", "quantize"): ("truncate", "round"),
    ("generate", "nail_prompt"): ("concatenated", "wire_nail"),
    ("generate", "precision"): ("autocast", "fp16", "bf16", "fp32"),
    ("classifier", "precision"): ("fp32", "bf16"),
    ("classifier", "energy_head"): ("linear", "monotone"),
    ("classifier", "id_generated"): ("none", "vae_recon", "idgen"),
    ("evaluate", "positive"): ("id", "ood"),
    ("evaluate", "energy_sign"): ("auto", "positive", "negative"),
    ("evaluate", "fpr95_rule"): ("closest", "first_above"),
    ("generator", "save_dtype"): ("float32", "float16"),
}

# Every integer is a count ≥ 1 (or null where Optional), except the seeds and these, where 0 means:
_ZERO_ALLOWED = {
    ("embed", "micro_batch"): "all images_per_step in one UNet call",
    ("embed", "timestep_first"): "timestep 0 is a timestep",
    ("generate", "num_batches"): "no images, for runs whose stage 5 trains on none of stage 4's",
    ("classifier", "head_hidden"): "the linear energy head",
    ("classifier", "num_workers"): "load in the main process",
    ("generator", "warmup_steps"): "no warm-up",
    ("generator", "threads"): "torch's default",
}
_NOT_COUNTS = {("run", "seed"), ("data", "subset_seed"), ("generate", "seed"), ("classifier", "seed")}


def available_presets() -> list[str]:
    """Names of the presets shipped in ``ncis_core/presets/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_summary(name: str) -> str:
    """The preset's one-line description (its first ``# `` comment line)."""
    for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return ""


def _valid_keys(section: str | None = None) -> list[str]:
    if section is None:
        return [f.name for f in dataclasses.fields(ExperimentConfig)]
    cls = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}[section]
    cls = globals()[cls] if isinstance(cls, str) else cls
    return [f"{section}.{f.name}" for f in dataclasses.fields(cls)]


def _container_of(exc: OmegaConfBaseException) -> type | None:
    """``list`` or ``dict`` when ``exc`` is a scalar assigned to a list or mapping field, else None."""
    cls, name, value = getattr(exc, "object_type", None), getattr(exc, "key", None), getattr(exc, "value", None)
    if not (dataclasses.is_dataclass(cls) and isinstance(name, str)) or isinstance(value, (list, dict)) \
            or OmegaConf.is_config(value):
        return None
    default = getattr(cls(), name, None)
    return type(default) if isinstance(default, (list, dict)) else None


def _explain(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    section = key.split(".")[0] if key else None
    if isinstance(exc, ConfigKeyError):
        if section in _valid_keys():
            valid = ", ".join(_valid_keys(section))
        else:
            valid = ", ".join(_valid_keys())
        return ConfigError(f"unknown config key {key!r} in {origin}; valid keys: {valid}")
    container = _container_of(exc)
    if container is not None:  # a scalar where the schema wants a list or a mapping
        value = getattr(exc, "value", "")
        example = f"{key}=[{value}]" if container is list else f"{key}.NAME={value}"
        return ConfigError(f"{key} must be a {'list' if container is list else 'mapping'}, "
                           f"e.g. {example} (in {origin})")
    message = str(exc).splitlines()[0]
    if "Incompatible value 'None'" in message and "type 'str'" in message:
        # `--set key=` reads as null in a dot-list; an empty string must be quoted
        message += f" (for an empty string write {key}=\'\')"
    return ConfigError(f"bad value for {key!r} in {origin}: {message}")


def _check_choices(cfg: ExperimentConfig) -> None:
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key} = {value!r} is not one of {', '.join(choices)}")


def _check_positive(cfg: ExperimentConfig) -> None:
    """Refuse counts below 1 (``cvpn.epochs=0``) now, not hours later; see ``_ZERO_ALLOWED``."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        for f in dataclasses.fields(part):
            where = (section.name, f.name)
            value = getattr(part, f.name)
            values = value if isinstance(value, list) else [value]
            if where in _NOT_COUNTS or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                continue
            low = 0 if where in _ZERO_ALLOWED else 1
            if any(v < low for v in values):
                what = "≥ 0" if low == 0 else "a positive integer"
                what = "a list of positive integers" if isinstance(value, list) else what
                zero = f" (0: {_ZERO_ALLOWED[where]})" if low == 0 else ""
                raise ConfigError(f"{section.name}.{f.name} = {value!r}: must be {what}{zero}")
    g, c = cfg.generate, cfg.classifier
    from .outliers.base import NOTHING, get_method

    if g.num_batches == 0 and c.outliers == cfg.sample.method and not c.outlier_folder \
            and get_method(c.outliers).produces != NOTHING:
        raise ConfigError(f"generate.num_batches = 0 makes no outlier images, but stage 5 trains on "
                          f"stage 4's (classifier.outliers={c.outliers}): set generate.num_batches ≥ 1 "
                          f"or classifier.outliers=none")


def _check_outlier_methods(cfg: ExperimentConfig) -> None:
    """Check the outlier-method keys against the registry of :mod:`ncis_core.outliers`."""
    from .outliers import base as outliers  # the registry (it registers the built-in methods)

    samplers = outliers.method_names(outliers.EMBEDDINGS)
    if cfg.sample.method not in samplers:
        raise ConfigError(f"sample.method = {cfg.sample.method!r} is not one of {', '.join(samplers)}")
    sources = [*outliers.method_names(), "folder"]
    if cfg.classifier.outliers not in sources:
        raise ConfigError(f"classifier.outliers = {cfg.classifier.outliers!r} is not one of {', '.join(sources)}")
    try:
        outliers.check_method_args(cfg.sample.method_args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_counts(cfg: ExperimentConfig) -> None:
    """Cross-stage counts that would otherwise fail hours into a run (METHOD.md defect 4)."""
    g, c = cfg.generate, cfg.classifier
    made = g.num_batches * g.batch_size
    from .outliers.base import NOTHING, get_method

    from_stage4 = c.outliers != "folder" and get_method(c.outliers).produces != NOTHING and not c.outlier_folder
    if from_stage4 and c.num_outliers is not None and c.num_outliers > made \
            and not c.outliers_with_replacement:
        need = -(-c.num_outliers // g.batch_size)
        raise ConfigError(
            f"classifier.num_outliers={c.num_outliers} but stage 4 makes generate.num_batches × "
            f"generate.batch_size = {g.num_batches} × {g.batch_size} = {made} images: set "
            f"generate.num_batches={need} (or more), lower classifier.num_outliers, or set "
            f"classifier.outliers_with_replacement=true")


def _check_scores(cfg: ExperimentConfig) -> None:
    """Check the ``evaluate`` score keys against the registry of :mod:`ncis_core.scores`."""
    from .scores import base as scores  # imported here: the registry's modules need torch, the config does not

    e = cfg.evaluate
    named = [("evaluate.score", e.score)] + [(f"evaluate.extra_scores[{i}]", n)
                                             for i, n in enumerate(e.extra_scores)]
    for key, name in named:
        if name not in scores.SCORES:
            raise ConfigError(f"{key} = {name!r} is not a registered score; registered: "
                              f"{', '.join(scores.SCORES)}")
    for name, args in e.score_args.items():
        if name not in scores.SCORES:
            raise ConfigError(f"evaluate.score_args.{name}: no score {name!r}; registered: "
                              f"{', '.join(scores.SCORES)}")
        try:  # building one is cheap (setup does the work) and runs the constructor's own checks
            scores.build_score(name, **scores.score_arguments(name, args))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"evaluate.score_args.{name}: {exc}") from None


def load_config(preset: str, overrides: list[str] | tuple[str, ...] = (), out: str | None = None,
                start: "ExperimentConfig | None" = None) -> ExperimentConfig:
    """Resolve a preset plus ``stage.key=value`` overrides into a frozen :class:`ExperimentConfig`.

    Args:
        overrides: dot-list overrides, e.g. ``["cvpn.epochs=3", "run.device=cpu"]``.
        out: the run folder (sets ``run.out``; an override of ``run.out`` wins).
        start: resolve the overrides on this config instead of the preset's file.

    Raises:
        ConfigError: an unknown preset or key, a bad value or choice, or counts that cannot work.
    """
    presets = available_presets()
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; available presets: {', '.join(presets)}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form stage.key=value")
    try:
        if start is not None:  # an existing run folder's resolved config (load_run_config)
            merged = _typed(start)
        else:
            merged = OmegaConf.merge(_schema(), OmegaConf.load(PRESET_DIR / f"{preset}.yaml"))
    except OmegaConfBaseException as exc:
        raise _explain(exc, f"preset {preset}") from None
    base = {"run": {"preset": preset}}
    if out is not None:
        base["run"]["out"] = str(out)
    try:
        merged = OmegaConf.merge(merged, base, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise _explain(exc, "--set overrides") from None
    cfg = OmegaConf.to_object(merged)
    _check_choices(cfg)
    _check_outlier_methods(cfg)
    _check_positive(cfg)
    _check_counts(cfg)
    _check_scores(cfg)
    return cfg


def load_run_config(preset: str, overrides: list[str] | tuple[str, ...] = (), out: str | None = None
                    ) -> ExperimentConfig:
    """The config of a command on run folder ``out``: its ``config.yaml`` plus ``overrides`` if any.

    Without one, as :func:`load_config`. Raises ConfigError also when the folder has another preset.
    """
    existing = Path(out) / "config.yaml" if out is not None else None
    if existing is None or not existing.is_file():
        return load_config(preset, overrides, out=out)
    folder = config_from_yaml(existing.read_text())
    if folder.run.preset != preset:
        raise ConfigError(f"{out} is a run folder of preset {folder.run.preset!r}, not {preset!r}: use "
                          f"--preset {folder.run.preset} (its config.yaml is the default there) or "
                          f"another --out")
    return load_config(preset, overrides, out=out, start=folder)


_T = TypeVar("_T")


@functools.lru_cache(maxsize=1)
def _schema():
    """The schema as an OmegaConf node, built once (``OmegaConf.merge`` copies it)."""
    return OmegaConf.structured(ExperimentConfig)


def memo_by_content(maxsize: int = 1024) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Memoise ``f(cfg, *args)`` by the config's ``repr`` (its content), the ``maxsize`` most recent.

    ``f`` must return an immutable value and depend on nothing but its arguments.
    """
    def wrap(f: Callable[..., _T]) -> Callable[..., _T]:
        memo: OrderedDict[tuple, _T] = OrderedDict()

        @functools.wraps(f)
        def cached(cfg, *args):
            key = (type(cfg), repr(cfg), args)
            if key in memo:
                memo.move_to_end(key)
                return memo[key]
            value = memo[key] = f(cfg, *args)
            if len(memo) > maxsize:
                memo.popitem(last=False)
            return value

        return cached

    return wrap


@memo_by_content(maxsize=8)
def _typed(cfg: ExperimentConfig):
    """``cfg`` merged into the schema (a typed node the overrides merge into; merging copies it)."""
    return OmegaConf.merge(_schema(), OmegaConf.structured(cfg))


@memo_by_content()
def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what the run folder keeps as ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


@functools.lru_cache(maxsize=16)  # a command reads its folder's config.yaml once per job (compare: ~50)
def config_from_yaml(text: str) -> ExperimentConfig:
    """Read back a config written by :func:`config_to_yaml` (type-checked against the schema)."""
    try:
        merged = OmegaConf.merge(_schema(), OmegaConf.create(text))
    except OmegaConfBaseException as exc:
        raise _explain(exc, "config.yaml") from None
    cfg = OmegaConf.to_object(merged)
    _check_choices(cfg)
    return cfg
