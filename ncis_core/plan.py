"""``python -m ncis_core plan``: what a run will cost, and whether it could start, before it starts.

:func:`plan` reads the resolved config and the disk (nothing is computed) and returns per stage the
work, its FLOPs (:mod:`ncis_core.flops`), projected hours on a card (:data:`CARDS`), disk, peak
memory, and a preflight; :func:`format_plan` prints it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import assets
from .config import ExperimentConfig

__all__ = ["Card", "CARDS", "parse_card", "plan", "format_plan", "pipeline_configs", "saved_activation_bytes",
           "dataset_counts", "stage_work",
           "NOMINAL_COUNTS"]

# Stable Diffusion 1.4's component configs, shipped with the package (ncis_core/assets/)
SD14_CONFIGS = assets.path("data/sd14_configs")


@dataclass(frozen=True)
class Card:
    """A device's datasheet rates in TFLOP/s (dense, no sparsity) and its memory.

    Args:
        tf32: the rate of fp32 convolutions (cuDNN's default); ``fp32``: of fp32 matrix products.
        measured: the rates were measured (``cpu``), not the vendor's.
    """

    name: str
    bf16: float
    tf32: float
    fp32: float
    memory_gib: float
    measured: bool = False
    #: measured cards only: TFLOP/s per stage, for ``sd14``- and ``small``-sized models
    stage_tflops: dict | None = None


#: ``cpu``'s measured TFLOP/s per stage (docs/measurements.md)
CPU_STAGE_TFLOPS = {
    "sd14": {"embed": 0.122, "cvpn": 0.094, "sample": 0.076, "generate": 0.121, "classifier": 0.107,
             "evaluate": 0.061},
    "small": {"embed": 0.066, "cvpn": 0.014, "sample": 0.005, "generate": 0.038, "classifier": 0.060,
              "evaluate": 0.008},
}


#: The cards ``--gpu`` knows (NVIDIA datasheets); ``cpu``: the project's 2-core machine, measured
CARDS: dict[str, Card] = {
    "h100": Card("NVIDIA H100 SXM", 989.4, 494.7, 66.9, 80),
    "h200": Card("NVIDIA H200 SXM", 989.4, 494.7, 66.9, 141),
    "a100": Card("NVIDIA A100 SXM", 312.0, 156.0, 19.5, 80),
    "cpu": Card("2-core CPU (measured)", 0.1, 0.1, 0.1, 24, measured=True, stage_tflops=CPU_STAGE_TFLOPS),
}

#: Image counts used when a dataset is not on disk (the official splits; METHOD.md §6).
NOMINAL_COUNTS = {
    "cifar100": {"id-train": 50_000, "id-test": 10_000},
    "imagenet100": {"id-train": 126_689, "id-test": 5_000},
    "demo": {"id-train": 4_800, "id-test": 1_200},
}
_NOMINAL_OOD = {"svhn": 26_032, "places365": 328_500, "lsun_crop": 10_000, "lsun_resize": 10_000,
                "isun": 8_925, "textures": 5_640, "inaturalist": 10_000, "sun": 10_000, "places": 10_000,
                "demo_near": 800, "digits": 1_797, "texture_crops": 600, "faces": 200}
_PNG_RATIO = 0.6   # PNG bytes / raw RGB bytes for generated photographs (assumed)
_SHARDED = {"embed", "generate", "classifier"}
# measured peak RSS / the memory formula is at most 1.39 (docs/measurements.md)
MEMORY_MARGIN = 1.4


def parse_card(spec: str) -> tuple[str, Card]:
    """``h100`` / ``h200`` / ``a100`` / ``cpu``, or ``NAME:TFLOPS`` (one dense rate for every precision).

        >>> parse_card("l40s:362")[1].bf16
        362.0
    """
    key = spec.strip().lower()
    if key in CARDS:
        return key, CARDS[key]
    if ":" in spec:
        name, rate = spec.rsplit(":", 1)
        try:
            tflops = float(rate)
        except ValueError:
            raise ValueError(f"--gpu {spec!r}: the rate after ':' must be a number of TFLOP/s") from None
        return name, Card(name, tflops, tflops, tflops, float("nan"))
    raise ValueError(f"--gpu {spec!r}: use one of {', '.join(CARDS)} or NAME:TFLOPS (e.g. l40s:362)")


# ----------------------------------------------------------------------------- model configs
def pipeline_configs(cfg: ExperimentConfig) -> tuple[dict, str]:
    """The UNet, VAE and text-encoder configs of ``diffusion.pipeline`` (else SD 1.4's) and their source."""
    from . import diffusion

    d = cfg.diffusion
    if d.pipeline == diffusion.TINY_RANDOM:
        return diffusion.tiny_configs(), "tiny-random"
    folder = diffusion.local_source(d.pipeline)
    if not (folder is not None and folder.is_dir() and (folder / "unet" / "config.json").exists()):
        single = diffusion.local_source(d.single_file_config)
        folder = single if single and (single / "unet" / "config.json").exists() else SD14_CONFIGS
    configs = {name: json.loads((folder / name / "config.json").read_text())
               for name in ("unet", "vae", "text_encoder")}
    return configs, str(folder)


@lru_cache(maxsize=32)
def _counted(kind: str, config_json: str, size: int, backward: bool = False) -> dict:
    from . import flops

    config = json.loads(config_json)
    if kind == "unet":
        return flops.unet_flops(config, size, backward=backward)
    if kind == "vae":
        return flops.vae_flops(config, size)
    return flops.text_encoder_flops(config, backward=backward)


def _count(kind: str, config: dict, size: int = 0, backward: bool = False) -> dict:
    return _counted(kind, json.dumps(config, sort_keys=True, default=list), size, backward)


class _FusedAttention:
    """Attention as the fused GPU kernels keep it for the backward (q, k, v, output; no n × n)."""

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        self.original = F.scaled_dot_product_attention

        class Fused(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
                ctx.save_for_backward(q, k, v, out)
                return out

            @staticmethod
            def backward(ctx, grad):  # never run: only what forward saves is measured
                raise NotImplementedError

        F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: Fused.apply(q, k, v)
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self.original


def saved_activation_bytes(build, inputs, bytes_per_element: int = 4, largest: bool = False) -> int:
    """Bytes a forward keeps for its backward, on the meta device (``largest``: its biggest one)."""
    import torch

    kept: dict[int, int] = {}
    with torch.device("meta"):
        module = build()
        args = inputs()
        weights = {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers()]}

        def pack(t):
            storage = t.untyped_storage()
            if storage._cdata not in weights:  # each storage once, however many ops keep it
                kept[storage._cdata] = storage.nbytes() // t.element_size() * bytes_per_element
            return t

        with _FusedAttention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(*args)
    return max(kept.values(), default=0) if largest else sum(kept.values())


@lru_cache(maxsize=16)
def _unet_saved_bytes(config_json: str, latent: int, bytes_per: int) -> int:
    """Bytes the UNet's forward keeps for stage 1's backward, per noised copy."""
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads(config_json)

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = UNet2DConditionModel.from_config(config).requires_grad_(False)

        def forward(self, z, t, ctx):
            return self.unet(z, t, encoder_hidden_states=ctx).sample

    width = config.get("cross_attention_dim", 768)
    return saved_activation_bytes(
        Call, lambda: (torch.zeros(1, config.get("in_channels", 4), latent, latent), torch.tensor([1]),
                       torch.zeros(1, 77, width, requires_grad=True)), bytes_per)


def _params(config: dict, kind: str) -> int:
    return _params_cached(json.dumps(config, sort_keys=True, default=list), kind)


@lru_cache(maxsize=16)
def _params_cached(config_json: str, kind: str) -> int:
    """Parameters of a pipeline component, built on the meta device."""
    import torch

    config = json.loads(config_json)

    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(config)
        elif kind == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(config)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- counts
def dataset_counts(cfg: ExperimentConfig) -> tuple[dict[str, int], list[str], list[str]]:
    """Images per split (else :data:`NOMINAL_COUNTS`), the ID class names, and the loaders' problems."""
    from .data import build_splits, get_split
    from .data.base import DataError
    from .data.classes import CIFAR100_SHORT, DEMO_ID_CLASSES, IMAGENET100_WNIDS

    counts: dict[str, int] = {}
    classes = {"cifar100": CIFAR100_SHORT, "imagenet100": IMAGENET100_WNIDS,
               "demo": DEMO_ID_CLASSES}.get(cfg.data.dataset, [])
    problems: list[str] = []
    names = ["id-train", "id-test", *cfg.data.ood_sets]
    # the demo world is built in one go; the other datasets split by split
    loaders = [lambda: build_splits(cfg.data)] if cfg.data.dataset == "demo" else \
        [lambda n=n: [get_split(cfg.data, n)] for n in names]
    for load in loaders:
        try:
            for split in load():
                counts[split.name] = len(split.dataset)
                if split.role == "id-train":
                    classes = list(split.classes)
        except (DataError, FileNotFoundError, OSError) as exc:
            problems.append(str(exc).splitlines()[0])
    nominal = NOMINAL_COUNTS.get(cfg.data.dataset, {})
    size = cfg.data.ood_subset_size
    for name in names:
        if name not in counts:
            full = nominal.get(name, _NOMINAL_OOD.get(name, 0))
            counts[name] = min(full, size) if size is not None and name in cfg.data.ood_sets else full
    return counts, list(classes), list(dict.fromkeys(problems))


def _hours(conv: float, matmul: float, precision: str, card: Card, fraction: float) -> float:
    if precision in ("bf16", "fp16", "autocast"):  # autocast: convolutions and matmuls in fp16
        seconds = (conv + matmul) / (card.bf16 * 1e12)
    else:
        seconds = conv / (card.tf32 * 1e12) + matmul / (card.fp32 * 1e12)
    return seconds / max(fraction, 1e-9) / 3600


def stage_work(cfg: ExperimentConfig, counts: dict, classes: list[str]) -> dict[str, dict]:
    """Per stage: the work, its FLOPs (conv / matmul split), precision, disk and peak memory."""
    configs, _ = pipeline_configs(cfg)
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    width = text.get("hidden_size", 768)
    num_classes = max(len(classes), 1)
    e, g, c, cv, s = cfg.embed, cfg.generate, cfg.classifier, cfg.cvpn, cfg.sample
    out: dict[str, dict] = {}
    gib = 2 ** 30

    # stage 1: per image, steps × noise_batch UNet forward+backward, the prompt fwd+bwd per step, one VAE encode
    n_train = counts.get("id-train", 0)
    n_embed = min(n_train, e.max_per_class * num_classes) if e.max_per_class else n_train
    n_embed = min(n_embed, e.max_images) if e.max_images is not None else n_embed
    latent1 = max(e.resolution // factor, 1)
    u1 = _count("unet", unet, latent1, backward=True)
    t1 = _count("text", text, 0, backward=True)
    v1 = _count("vae", vae, e.resolution)["encode"]
    passes = n_embed * e.steps * e.noise_batch
    conv = passes * u1["conv"] + n_embed * v1["conv"] + n_embed * e.steps * t1["conv"]
    mm = passes * u1["matmul"] + n_embed * v1["matmul"] + n_embed * e.steps * t1["matmul"]
    bytes1 = {"fp32": 4, "bf16": 2, "fp16": 2}[e.precision]
    weights1 = (_params(unet, "unet") + _params(vae, "vae") + _params(text, "text")) * bytes1
    batch1 = e.micro_batch if e.micro_batch > 0 else e.images_per_step
    act1 = _unet_saved_bytes(json.dumps(unet, sort_keys=True, default=list), latent1, bytes1) * batch1 * e.noise_batch
    out["embed"] = {
        "work": {"images": n_embed, "unet_forward_backward": passes, "unet_batch": batch1 * e.noise_batch},
        "conv": conv, "matmul": mm, "precision": e.precision,
        "disk_bytes": {"embeddings.safetensors": n_embed * (width * 4 + 16)},
        "peak_memory_gib": (weights1 + act1) / gib,
    }

    # stage 2: two Adam steps per mini-batch; forward, inverse and their backward
    n_cvpn = int(round(n_embed * (1 - cv.holdout_fraction)))
    steps2 = math.ceil(n_cvpn / cv.batch_size) * cv.epochs
    hidden = cv.hidden or 4 * math.ceil(width / 2)
    coupling = 2 * (width // 2 * hidden + 3 * hidden * hidden + hidden * (width - width // 2))
    per_sample = cv.num_layers * coupling + (cv.num_layers + 1) * 2 * width * width
    # 2 passes (forward, inverse) × 3 (forward + backward with weight gradients), plus the orthogonal
    # matrices' exponentials (≈ 14 D³ each, forward and backward) every step
    mm2 = steps2 * (2 * 3 * cv.batch_size * per_sample + 2 * 3 * (cv.num_layers + 1) * 14 * width ** 3)
    params2 = cv.num_layers * coupling // 2 + (cv.num_layers + 1) * width * width + num_classes * hidden
    out["cvpn"] = {"work": {"steps": steps2, "batch": cv.batch_size, "embeddings": n_cvpn},
                   "conv": 0, "matmul": mm2, "precision": "bf16" if cv.mixed_precision else "fp32",
                   "disk_bytes": {"cvpn/best.safetensors": params2 * 4},
                   "peak_memory_gib": (4 * params2 * 4 + n_cvpn * width * 4) / gib}

    # stage 3: per class a covariance, draws with their log-density, f⁻¹ of the kept ones
    draws = num_classes * s.rounds * s.draws_per_round
    kept = num_classes * s.rounds * s.keep_per_round
    mm3 = draws * 2 * width * width + num_classes * 2 * width ** 3 + (n_embed + kept) * per_sample
    from . import outliers

    sampler = outliers.get_method(s.method)
    if sampler.flops is not None:  # a sampler that is not the tail sampler counts its own work
        mm3 = num_classes * sampler.flops(outliers.method_params(sampler, s.method_args),
                                          int(n_embed * (1 - cv.holdout_fraction) / num_classes), width)
    out["sample"] = {"work": {"draws": draws, "kept": kept}, "conv": 0, "matmul": mm3, "precision": "fp32",
                     "disk_bytes": {"outlier_embeddings.safetensors": kept * width * 4},
                     "peak_memory_gib": (params2 * 4 + s.draws_per_round * width * 8) / gib}

    # stage 4: per image, steps × (2 with guidance) UNet forwards, two prompts, one VAE decode
    images4 = g.num_batches * g.batch_size
    guided = 2 if g.guidance_scale > 1 else 1
    u4 = _count("unet", unet, max(g.height // factor, 1))
    t4 = _count("text", text, 0)
    v4 = _count("vae", vae, g.height)["decode"]
    evals = images4 * g.steps * guided
    # generate.precision; autocast (planned for CUDA, where it applies): fp32 weights (autocast
    # caches no fp16 copies of weights that need no gradient) and activations of fp16's size (the
    # convolutions' and matmuls' outputs, which dominate, are fp16)
    precision4 = g.precision
    bytes4 = {"fp32": 4, "bf16": 2, "fp16": 2, "autocast": 4}[precision4]
    weights4 = weights1 // bytes1 * bytes4
    act_bytes4 = 2 if precision4 == "autocast" else bytes4
    act4 = g.batch_size * guided * (g.height // factor) ** 2 * unet["block_out_channels"][0] * act_bytes4 * 24
    out["generate"] = {
        "work": {"images": images4, "unet_evaluations": evals, "guidance": guided > 1},
        "conv": evals * u4["conv"] + images4 * (v4["conv"] + guided * t4["conv"]),
        "matmul": evals * u4["matmul"] + images4 * (v4["matmul"] + guided * t4["matmul"]),
        "precision": precision4,
        "disk_bytes": {"outliers/*.png": int(images4 * g.output_size ** 2 * 3 * _PNG_RATIO)},
        "peak_memory_gib": (weights4 + act4) / gib,
    }

    # stage 5: forward + backward with weight gradients over ID + outliers (+ generated ID) per step
    from . import flops

    n_id = n_train
    steps_epoch = (n_id // c.batch_size if c.drop_last else math.ceil(n_id / c.batch_size)) if n_id else 0
    steps5 = steps_epoch * c.epochs
    with_outliers = c.outliers != "none"
    per_step = c.batch_size + (c.outlier_batch_size if with_outliers else 0) + \
        (c.outlier_batch_size if with_outliers and c.id_generated != "none" else 0)
    cl = flops.classifier_flops(c.arch, num_classes, cfg.data.image_size, c.width, training=True)
    seen = steps5 * per_step
    # classifier.id_generated=vae_recon: one VAE round trip per ID training image (cached afterwards)
    recon = _count("vae", vae, max(8, e.resolution)) if with_outliers and c.id_generated == "vae_recon" else None
    recon_conv = n_id * (recon["encode"]["conv"] + recon["decode"]["conv"]) if recon else 0
    recon_mm = n_id * (recon["encode"]["matmul"] + recon["decode"]["matmul"]) if recon else 0
    params5 = _classifier_params(c.arch, num_classes, c.width)
    out["classifier"] = {
        "work": {"steps": steps5, "steps_per_epoch": steps_epoch, "images_seen": seen, "images_per_step": per_step},
        "conv": seen * cl["conv"] + recon_conv, "matmul": seen * cl["matmul"] + recon_mm,
        "recon_conv": recon_conv, "recon_matmul": recon_mm, "precision": c.precision,
        "disk_bytes": {"classifier/best.safetensors": params5 * 4, "classifier/last.safetensors": params5 * 8},
        # weights, gradients, momentum (fp32) + what the forward keeps for the backward, per image
        "peak_memory_gib": (params5 * 12 + per_step *
                            _classifier_activation_bytes(c.arch, num_classes, cfg.data.image_size, c.width)) / gib,
        # split_batches: each process holds 1/N of every step's images
        "activation_gib": per_step * _classifier_activation_bytes(c.arch, num_classes, cfg.data.image_size,
                                                                  c.width) / gib,
    }

    # stage 6: one forward per image and score group (logit scores share it; a score's own extra
    # passes on top, ODIN's backward and second forward), one pass over ID train per score with setup
    from .scores import score_class

    scored = counts.get("id-test", 0) + sum(counts.get(n, 0) for n in cfg.data.ood_sets)
    names = [cfg.evaluate.score, *cfg.evaluate.extra_scores]
    kinds = [score_class(n) for n in dict.fromkeys(names)]
    passes6 = 1 + sum(k.forward_passes - 1 for k in kinds)
    fwd = flops.classifier_flops(c.arch, num_classes, cfg.data.image_size, c.width)
    extra = n_id * sum(k.needs_setup for k in kinds)
    sets = [counts.get(n, 0) for n in ["id-test", *cfg.data.ood_sets]]
    eval_batch = min(cfg.evaluate.batch_size, max(sets, default=1))
    out["evaluate"] = {"work": {"images_scored": scored, "scores": len(set(names))},
                       "conv": (scored * passes6 + extra) * fwd["conv"],
                       "matmul": (scored * passes6 + extra) * fwd["matmul"], "precision": "fp32",
                       "disk_bytes": {"results/scores.npz": scored * len(set(names)) * 8},
                       # no-grad: weights + a batch's few live activations (input, output, shortcut)
                       "peak_memory_gib": (params5 * 4 + 3 * eval_batch *
                                           _classifier_activation_bytes(c.arch, num_classes, cfg.data.image_size,
                                                                        c.width, largest=True)) / gib}
    out["data"] = {"work": {"splits": len(counts)}, "conv": 0, "matmul": 0, "precision": "fp32",
                   "disk_bytes": {}, "peak_memory_gib": 0.0}
    return out


@lru_cache(maxsize=8)
def _classifier_params(arch: str, num_classes: int, width: int) -> int:
    import torch

    from .models.resnet import build_classifier

    with torch.device("meta"):
        return sum(p.numel() for p in build_classifier(arch, num_classes, width).parameters())


@lru_cache(maxsize=8)
def _classifier_activation_bytes(arch: str, num_classes: int, image: int, width: int,
                                 largest: bool = False) -> int:
    """Bytes a training forward keeps for the backward, per image (fp32); ``largest``: its biggest."""
    import torch

    from .models.resnet import build_classifier

    return saved_activation_bytes(lambda: build_classifier(arch, num_classes, width).train(),
                                  lambda: (torch.zeros(1, 3, image, image),), largest=largest)


# ----------------------------------------------------------------------------- preflight
def _preflight(cfg: ExperimentConfig, disk_needed: int, data_ok_problems: list[str]) -> list[str]:
    from . import diffusion

    problems = list(data_ok_problems)
    problem = diffusion.pipeline_problem(cfg.diffusion)
    if problem:
        problems.append(problem)
    c = cfg.classifier
    if c.pretrained and not Path(c.pretrained).exists():
        problems.append(f"classifier.pretrained={c.pretrained} does not exist (see data/README.md, "
                        f"\"ImageNet-100 classifier initialisation\")")
    if c.outliers == "folder" and not (c.outlier_folder and Path(c.outlier_folder).is_dir()):
        problems.append(f"classifier.outliers=folder needs classifier.outlier_folder (a folder of images); "
                        f"got {c.outlier_folder!r}")
    out = Path(cfg.run.out)
    if out.exists() and not out.is_dir():
        problems.append(f"run.out={out} is a file, not a folder: choose another --out")
    else:
        existing = out
        while not existing.exists():
            existing = existing.parent
        if not os.access(existing, os.W_OK):
            problems.append(f"the output folder {out} cannot be written (no write permission on {existing})")
        else:
            free = shutil.disk_usage(existing).free
            if free < disk_needed:
                problems.append(f"the output folder {out} needs ≈ {disk_needed / 2**30:.1f} GiB but "
                                f"{existing} has {free / 2**30:.1f} GiB free")
    return problems


def sampler_matmul_flops(cfg: ExperimentConfig, method: str, stages: dict, num_classes: int) -> float:
    """FLOPs of a sampler's own computation (its ``OutlierMethod.flops`` hook; 0 without one)."""
    from . import outliers

    m = outliers.get_method(method)
    if m.flops is None:
        return 0.0
    per_class = stages["embed"]["work"]["images"] * (1 - cfg.cvpn.holdout_fraction) / max(1, num_classes)
    dim = pipeline_configs(cfg)[0]["text_encoder"].get("hidden_size", 768)
    return float(num_classes * m.flops(outliers.method_params(m, cfg.sample.method_args), int(per_class), dim))


# ----------------------------------------------------------------------------- the plan
def _compare_work(cfg: ExperimentConfig, counts: dict, classes: list[str], methods: list[str],
                  seeds: list[int]) -> dict:
    """``compare``'s work on top of the run: other methods' samples and renders, trainings, evaluations."""
    from dataclasses import replace

    from . import outliers

    stages = stage_work(cfg, counts, classes)
    images = [m for m in methods if outliers.get_method(m).produces != outliers.NOTHING]
    renders = sum(1 for m in images if m != cfg.sample.method)
    sampling = sum(sampler_matmul_flops(cfg, m, stages, len(classes)) for m in images if m != cfg.sample.method)
    conv = renders * stages["generate"]["conv"]
    mm = renders * stages["generate"]["matmul"] + sampling
    parts = {"generate": conv + mm - sampling, "sample": sampling}
    trainings = 0
    own_seed = cfg.classifier.seed if cfg.classifier.seed is not None else cfg.run.seed
    for method in methods:
        without = outliers.get_method(method).produces == outliers.NOTHING
        per = stages["classifier"] if not without else stage_work(
            replace(cfg, classifier=replace(cfg.classifier, outliers=method)), counts, classes)["classifier"]
        # the run's own stage 5 is copied, not trained again (compare.stage5_twin)
        n = sum(1 for seed in seeds if not (method == cfg.classifier.outliers and seed == own_seed))
        trainings += n
        # the VAE reconstructions are cached once per run: count them for none of the copies
        conv += n * per["conv"] - (n * per.get("recon_conv", 0))
        mm += n * per["matmul"] - (n * per.get("recon_matmul", 0))
    parts["classifier"] = conv + mm - parts["generate"] - sampling
    evaluations = len(methods) * len(seeds)
    conv += evaluations * stages["evaluate"]["conv"]
    mm += evaluations * stages["evaluate"]["matmul"]
    parts["evaluate"] = evaluations * (stages["evaluate"]["conv"] + stages["evaluate"]["matmul"])
    return {"parts": parts, "work": {"renders": renders, "images_rendered": renders * stages["generate"]["work"]["images"],
                     "trainings": trainings, "evaluations": evaluations},
            "conv": conv, "matmul": mm, "precision": cfg.classifier.precision,
            "disk_bytes": {"outliers_<method>/*.png": renders * sum(stages["generate"]["disk_bytes"].values()),
                           "compare/*": trainings * sum(stages["classifier"]["disk_bytes"].values())},
            "peak_memory_gib": max(stages["generate"]["peak_memory_gib"], stages["classifier"]["peak_memory_gib"])}


def plan(cfg: ExperimentConfig, card: str = "h100", fraction: float = 0.4, gpus: int = 1,
         compare: tuple[list[str], list[int]] | None = None) -> dict:
    """The cost projection and preflight of ``cfg``.

    Args:
        card: a :data:`CARDS` key or ``NAME:TFLOPS``.
        fraction: the assumed fraction of the card's rate reached (1.0 for the measured ``cpu``).
        gpus: processes under ``accelerate``; the sharded stages (1, 4, 5) divide their hours by it.
        compare: ``(methods, seeds)`` of a ``compare`` run on the same folder, planned as one more row.

    Returns:
        ``{"stages": {...}, "total": {...}, "preflight": {"ok", "problems"}, "assumptions": {...}}``.
    """
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: need at least 1")
    key, device = parse_card(card)
    if device.measured:
        fraction = 1.0
    counts, classes, data_problems = dataset_counts(cfg)
    stages = stage_work(cfg, counts, classes)
    order = ["data", "embed", "cvpn", "sample", "generate", "classifier", "evaluate"]
    if compare is not None:
        stages["compare"] = _compare_work(cfg, counts, classes, *compare)
        order.append("compare")
    report_stages = {}
    regime = "sd14" if _params(pipeline_configs(cfg)[0]["unet"], "unet") > 1e8 else "small"
    for name in order:
        st = stages[name]
        flops = st["conv"] + st["matmul"]
        if device.stage_tflops:  # measured per stage: the stage's own rate on this machine
            rates = device.stage_tflops[regime]
            parts = st.get("parts", {name: flops})
            hours = sum(f / (rates.get(part, device.fp32) * 1e12) for part, f in parts.items()) / 3600
        else:
            hours = _hours(st["conv"], st["matmul"], st["precision"], device, fraction)
        per_process = hours / gpus if name in _SHARDED else hours
        report_stages[name] = {
            "work": st["work"], "flops": flops, "precision": st["precision"],
            "gpu_hours": hours, "hours_per_process": per_process,
            "gpu_hours_bf16": _hours(st["conv"], st["matmul"], "bf16", device, fraction),
            "disk_bytes": st["disk_bytes"],
            "peak_memory_gib": st["peak_memory_gib"] - st.get("activation_gib", 0) * (1 - 1 / gpus),
        }
    disk = sum(v for st in report_stages.values() for v in st["disk_bytes"].values())
    problems = list(dict.fromkeys(_preflight(cfg, disk, data_problems)))
    if not device.measured and math.isfinite(device.memory_gib):
        for name, st in report_stages.items():
            if st["peak_memory_gib"] * MEMORY_MARGIN > device.memory_gib:
                problems.append(f"stage {name} needs ≈ {st['peak_memory_gib']:.0f} GiB (× {MEMORY_MARGIN:g} margin), "
                                f"more than the {device.memory_gib:g} GiB of one {device.name}" + _memory_hint(name))
    total = {"flops": sum(s["flops"] for s in report_stages.values()),
             "gpu_hours": sum(s["gpu_hours"] for s in report_stages.values()),
             "hours_per_process": sum(s["hours_per_process"] for s in report_stages.values()),
             "disk_bytes": disk,
             "peak_memory_gib": max(s["peak_memory_gib"] for s in report_stages.values())}
    _, source = pipeline_configs(cfg)
    return {
        "preset": cfg.run.preset, "card": device.name, "card_key": key, "fraction": fraction,
        "gpus": gpus, "stages": report_stages, "total": total,
        "preflight": {"ok": not problems, "problems": problems},
        "assumptions": {
            "rates": f"measured per stage on this project's CPU machine ({regime} models)" if device.measured else
                     f"datasheet: bf16 {device.bf16:g}, tf32 {device.tf32:g}, fp32 {device.fp32:g} TFLOP/s",
            "fraction": f"{fraction:.0%} of those rates (assumed)" if not device.measured else "1 (measured rates)",
            "fp32": "convolutions at the TF32 rate, matrix products at the fp32 rate (PyTorch defaults)",
            "counts": "from the datasets on disk" if not data_problems else
                      "nominal sizes for the datasets not found",
            "models": f"component configs from {source}",
            "png": f"PNG ≈ {_PNG_RATIO:.0%} of raw RGB bytes",
        },
    }


def _memory_hint(stage: str) -> str:
    return {"embed": ": set embed.micro_batch (images per UNet call; the result does not change)",
            "classifier": ": lower classifier.batch_size / outlier_batch_size or use more processes",
            "generate": ": lower generate.batch_size"}.get(stage, "")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:.2f} h"


def format_plan(report: dict) -> str:
    """The plan as a markdown table plus the preflight's verdict."""
    gpus = report["gpus"]
    lines = [f"Plan for preset **{report['preset']}** on {report['card']} at {report['fraction']:.0%} of its "
             f"rate{f', {gpus} processes' if gpus > 1 else ''}.", "",
             "| stage | work | precision | FLOPs | hours | per process | disk | peak memory |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, st in report["stages"].items():
        work = ", ".join(f"{k.replace('_', ' ')} {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                         else f"{k.replace('_', ' ')} {v}" for k, v in st["work"].items())
        lines.append(f"| {name} | {work} | {st['precision']} | {st['flops']:.3g} | {_duration(st['gpu_hours'])} | "
                     f"{_duration(st['hours_per_process'])} | {_size(sum(st['disk_bytes'].values()))} | "
                     f"{st['peak_memory_gib']:.1f} GiB |")
    t = report["total"]
    lines.append(f"| **total** | | | {t['flops']:.3g} | {_duration(t['gpu_hours'])} | "
                 f"{_duration(t['hours_per_process'])} | {_size(t['disk_bytes'])} | {t['peak_memory_gib']:.1f} GiB |")
    lines += ["", "Assumptions: " + "; ".join(f"{k}: {v}" for k, v in report["assumptions"].items()) + ".", ""]
    pre = report["preflight"]
    if pre["ok"]:
        lines.append("Preflight: ok — the run could start.")
    else:
        lines.append(f"Preflight: {len(pre['problems'])} problem(s) — the run could not start:")
        lines += [f"- {p}" for p in pre["problems"]]
    return "\n".join(lines) + "\n"
