"""Stage 5: train the classifier with synthetic outliers (METHOD.md §5).

Loss per step, over one forward pass through the joint batch of ID and outlier images:

    L = CE(f(x_in), y_in) + w · CE(φ(s(x)), b),   s(x) = logsumexp_k f_k(x),  b = 1 (ID) / 0 (outlier)

SGD with Nesterov momentum, a cosine schedule per step from ``lr`` to ``final_lr``, an epoch = one pass
over ID while the outlier loader cycles. ``outliers: none`` drops the energy term (the plain
cross-entropy baseline, scored with the energy score at test time).

Outlier sources (``classifier.outliers``, a registered outlier method or ``folder``): stage 3's method
(``sample.method``, ``ncis`` by default) — the run's ``outliers/`` tree from stage 4; any other method
with images — the tree ``outliers_<method>/`` of the run (rendered by ``compare``), or
``classifier.outlier_folder`` when set; a method without outliers (``none``) — no energy term;
``folder`` — any folder of images (``classifier.outlier_folder``); see
:func:`ncis_core.runs.outlier_image_folder`.

Reproducible and resumable: every epoch draws its shuffling and augmentation from generators seeded
by ``(seed, epoch)`` (``classifier.seed``, else ``run.seed``), and a checkpoint (``classifier/last.safetensors`` + ``last.json``) is
written after each epoch, so an interrupted run continues where it stopped and reaches the state of
an uninterrupted one. ``accelerate`` shards the batches across processes (``accelerate launch``).

Example (not run by the doctests: it needs a run folder with stage 4's outlier images, unless
``classifier.outliers=none``, and trains a ResNet for epochs; ``tests/test_train_classifier.py``
trains smoke ones):
    >>> run_dir = RunDir.open("outputs/demo")  # doctest: +SKIP
    >>> history = run(run_dir.cfg, run_dir)    # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..progress import bar_options
from ..config import ExperimentConfig
from ..data import get_split, list_images, with_transform
from ..data.base import DataError, ImageDataset, Subset
from ..data.folders import ImageFolderFiles
from ..data.transforms import (Compose, Normalize, RandomChoiceResize, RandomCrop,
                               RandomHorizontalFlip, RandomResizedCrop, ToTensor)
from ..checkpoints import (ClassifierBundle, load_classifier, load_training_state,  # noqa: F401 (stage 5's reader)
                           save_classifier, save_training_state)
from ..device import resolve_device
from ..models.resnet import MEMORY_FORMAT, EnergyHead, build_classifier, remap_ood_checkpoint
from ..runs import (STAGES, MissingArtefactError, RunDir, atomic_path, atomic_write_json,
                    outlier_image_folder, stage_inputs)

__all__ = [
    "train_transforms",
    "head_slope",
    "training_loader",
    "outlier_dataset",
    "decoded_images",
    "id_generated_dataset",
    "energy_loss",
    "cosine_lr",
    "mixed_precision",
    "train",
    "run",
    "main",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data
def train_transforms(cfg: ExperimentConfig) -> tuple[Compose, Compose]:
    """(ID transform, outlier transform) of METHOD.md §5 for the preset's image size.

    32 × 32 (CIFAR, demo): RandomCrop(32, pad 4) + HFlip + Normalize; outliers first get resized
    to 32 with a random choice of nearest or bilinear. 224 (ImageNet-100): RandomResizedCrop(224)
    + HFlip + Normalize for both.
    """
    size, c = cfg.data.image_size, cfg.classifier
    tail = [RandomHorizontalFlip(), ToTensor(), Normalize(c.mean, c.std)]
    if size <= 64:
        crop = RandomCrop(size, padding=size // 8)
        return Compose([crop, *tail]), Compose([RandomChoiceResize(size), crop, *tail])
    crop = RandomResizedCrop(size)
    return Compose([crop, *tail]), Compose([crop, *tail])


class _Tensors(Dataset):
    """An :class:`ImageDataset` whose transform ends in a tensor, as a torch ``Dataset``."""

    def __init__(self, images: ImageDataset):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, label = self.images[i]
        return image, label


class _BatchToTensor:
    """The collate of :func:`training_loader`: a batch of ``uint8`` ``H × W × C`` arrays (with their
    labels) → ``ToTensor`` then ``normalize`` applied to the stacked ``N × C × H × W`` batch at
    once. Both act on each value alone, so the batch is the one the per-image transforms and
    torch's default collate give, bit for bit, at a fraction of their Python cost."""

    def __init__(self, normalize: Normalize | None):
        self.normalize = normalize

    def __call__(self, items):
        arrays, labels = zip(*items)
        batch = np.stack([np.asarray(a) for a in arrays])
        if batch.dtype != np.uint8:
            raise TypeError(f"ToTensor expects uint8 arrays, got {batch.dtype}")
        if batch.ndim == 3:
            batch = batch[..., None]  # grey H × W
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)
        return (self.normalize(x) if self.normalize is not None else x), torch.as_tensor(labels)


def training_loader(images: ImageDataset, transform, batch_size: int, generator: torch.Generator,
                    num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A shuffled loader over ``images`` with ``transform`` (one of :func:`train_transforms`),
    drawing its order from ``generator``: stage 5's loaders. A transform ending in ``ToTensor()`` (+ ``Normalize``) keeps its random array
    transforms per image — the same draws from torch's generator, in the same order — and converts
    each batch at once (:class:`_BatchToTensor`); the batches equal those of the per-image
    transform (``tests/test_train_classifier.py``). The per-image conversions were a third of the
    data cost of the demo's training steps."""
    steps = list(transform.transforms) if isinstance(transform, Compose) else None
    normalize = None
    if steps and isinstance(steps[-1], Normalize):
        normalize = steps.pop()
    if steps and isinstance(steps[-1], ToTensor):
        steps.pop()
        data, collate = with_transform(images, Compose(steps)), _BatchToTensor(normalize)
    else:
        data, collate = _Tensors(with_transform(images, transform)), None
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers,
                      drop_last=drop_last and len(data) > batch_size, collate_fn=collate)


def _outlier_folder(cfg: ExperimentConfig, run_dir: RunDir) -> Path | None:
    """The folder of ``classifier.outliers``'s images (None for a method without outliers)."""
    try:
        return outlier_image_folder(cfg, run_dir)
    except FileNotFoundError as exc:
        if isinstance(exc, MissingArtefactError):
            raise
        raise DataError(str(exc)) from None


# Above this many decoded bytes the outliers are read from their files at each access (ImageNet-size
# generations in the tens of thousands); below it they are decoded once into the run's cache.
DECODE_CACHE_MAX_BYTES = 4 << 30


def decoded_images(folder: Path, paths: list[Path], run_dir: RunDir | None) -> ImageDataset | None:
    """The images ``paths`` of ``folder`` decoded once per run into one ``N × H × W × 3`` uint8 array,
    kept in ``RUN/cache/outlier_images/`` under a :func:`~ncis_core.runs.cache_key` of the folder's
    content hash and the file list (PNG decoding per access was most of stage 5's data wait).

    Items are the arrays :class:`ImageFolderFiles` returns (the same decoder), labelled -1. None
    (read the files instead) without a run folder, when the images differ in size, or above
    :data:`DECODE_CACHE_MAX_BYTES`.
    """
    from ..data.base import ArrayDataset
    from ..runs import cache_key, cache_path, content_hash

    if run_dir is None or not paths:
        return None
    folder = Path(folder)
    files = [Path(p).resolve().relative_to(folder.resolve()).as_posix() for p in paths]
    key = cache_key({"images": content_hash(folder)}, {"files": files}, versions=("pillow", "numpy"))
    cache = cache_path(run_dir.root, "outlier_images", key, ".npy")
    if not cache.exists():
        reader = ImageFolderFiles(paths, [-1] * len(paths), None, skip_unreadable=False)
        first = reader[0][0]
        if first.nbytes * len(paths) > DECODE_CACHE_MAX_BYTES:
            return None
        decoded = np.empty((len(paths), *first.shape), np.uint8)
        for i in range(len(paths)):
            image = reader[i][0]
            if image.shape != first.shape:
                log.info("outlier images of %s differ in size (%s, %s): read from the files", folder,
                         first.shape, image.shape)
                return None
            decoded[i] = image
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, decoded)
        log.info("decoded %d outlier images of %s into %s", len(paths), folder, cache)
    array = np.load(cache, mmap_mode="r")
    if array.nbytes <= 64 << 20:  # small: in memory; larger ones stay mapped (shared between trainings)
        array = np.array(array)
    return ArrayDataset(array, np.full(len(array), -1))


def outlier_dataset(cfg: ExperimentConfig, run_dir: RunDir) -> ImageDataset | None:
    """The outlier images of ``classifier.outliers`` (None for ``none``), cut to ``num_outliers``.

    With ``data.skip_unreadable`` unreadable files are dropped and counted, as in every data set of the
    kit; when that leaves fewer images than ``num_outliers``, the readable ones are used (warned).

    Raises:
        DataError: no (readable) images; or more outliers asked for than exist (both counts in the
            message) unless ``outliers_with_replacement``.
    """
    c = cfg.classifier
    folder = _outlier_folder(cfg, run_dir)
    if folder is None:
        return None
    paths, skipped = list_images(folder), []
    if cfg.data.skip_unreadable:
        checked = ImageFolderFiles(paths, [-1] * len(paths), None, skip_unreadable=True)
        paths, skipped = checked.paths, checked.skipped
    if not paths:
        raise DataError(f"no {'readable ' if skipped else ''}images in the outlier folder {folder} "
                        f"(classifier.outliers={c.outliers})")
    images = decoded_images(folder, paths, run_dir) or \
        ImageFolderFiles(paths, [-1] * len(paths), None, skip_unreadable=False)
    wanted = c.num_outliers
    if skipped and wanted is not None and len(paths) < wanted <= len(paths) + len(skipped) \
            and not c.outliers_with_replacement:
        log.warning("classifier.num_outliers=%d, but %d of the images in %s are unreadable and skipped "
                    "(data.skip_unreadable): training with %d outliers", wanted, len(skipped), folder,
                    len(paths))
        wanted = len(paths)
    if wanted is None or wanted == len(paths):
        return images
    rng = np.random.default_rng(c.seed if c.seed is not None else cfg.run.seed)
    if wanted > len(paths):
        if not c.outliers_with_replacement:
            raise DataError(f"classifier.num_outliers={wanted} but {folder} holds {len(paths)} images; "
                            f"lower num_outliers, generate more, or set "
                            f"classifier.outliers_with_replacement=true")
        return Subset(images, rng.choice(len(paths), size=wanted, replace=True))
    return Subset(images, np.sort(rng.choice(len(paths), size=wanted, replace=False)))


def _vae_reconstructions(cfg: ExperimentConfig, images: np.ndarray, progress: bool) -> np.ndarray:
    """The generator's VAE round trip (posterior mode → decode) of ``N × H × W × 3`` uint8 images."""
    from .. import diffusion
    from ..data.transforms import to_model_range

    device = resolve_device(cfg.run.device)
    pipe = diffusion.load_pipeline(cfg.diffusion, device, seed=cfg.run.seed)
    vae = pipe.vae
    out = []
    for i in tqdm(range(0, len(images), 64), desc="VAE reconstructions of ID images", leave=False,
                  **bar_options(progress)):
        x = to_model_range(images[i:i + 64]).to(device, vae.dtype)
        size = x.shape[-1]
        side = max(8, cfg.embed.resolution)  # the resolution the generator works at
        if size != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        with torch.no_grad():
            rec = diffusion.vae_reconstruct(vae, x).float()
        if size != side:
            rec = F.interpolate(rec, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def id_generated_dataset(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True
                         ) -> ImageDataset | None:
    """Generated-looking images for the ID side of the energy loss (``classifier.id_generated``).

    ``vae_recon``: the generator's VAE reconstructions of the ID training images (cached in
    ``id_generated/vae_recon.npz``, keyed by the data and diffusion config); ``idgen``: the
    plain-prompt generations of ``outliers_idgen/`` (rendered by ``compare``), labelled with their
    class. Either way "generated vs real" stops being a shortcut the energy head can learn.
    """
    from dataclasses import asdict

    from ..data.base import ArrayDataset
    from ..runs import cache_key, cache_path

    kind = cfg.classifier.id_generated
    if kind == "none":
        return None
    if kind == "idgen":
        folder = run_dir.path("method_outliers_dir", method="idgen")
        if not (folder / "index.json").exists():
            raise DataError(f"classifier.id_generated=idgen needs the plain-prompt generations in {folder}; "
                            f"render them with `python -m ncis_core compare --methods idgen,...`")
        index = json.loads((folder / "index.json").read_text())["images"]
        return ImageFolderFiles([folder / im["file"] for im in index], [im["class"] for im in index], None)
    key = cache_key({}, [asdict(cfg.data), asdict(cfg.diffusion), cfg.embed.resolution],
                    versions=("torch", "diffusers"))
    cache = cache_path(run_dir.root, "id_generated", f"vae_recon-{key}", ".npz")
    if cache.exists():
        with np.load(cache) as f:
            return ArrayDataset(f["images"], f["labels"])
    split = get_split(cfg.data, "id-train")
    images = np.stack([split.dataset[i][0] for i in range(len(split.dataset))])
    labels = np.asarray(split.dataset.labels)
    recons = _vae_reconstructions(cfg, images, progress)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=recons, labels=labels)
    return ArrayDataset(recons, labels)


# ----------------------------------------------------------------------------- loss, schedule
def energy_loss(logits: torch.Tensor, is_id: torch.Tensor, head: EnergyHead) -> torch.Tensor:
    """``CE(φ(logsumexp f(x)), b)`` over the joint batch, b = 1 for ID and 0 for outliers."""
    return F.cross_entropy(head(torch.logsumexp(logits, dim=1)), is_id.long())


def cosine_lr(step: int, total: int, lr: float, final_lr: float) -> float:
    """Cosine annealing per step from ``lr`` (step 0) to ``final_lr`` (step ``total``)."""
    return final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


# ----------------------------------------------------------------------------- training
_DREAM_OOD_INIT = ("Dream-OOD's cross-entropy-trained ImageNet-100 ResNet-34 checkpoint (CIFAR stem, "
                   "DataParallel keys module.encoder.* plus its 100-class module.fc.*; see data/README.md, "
                   "\"ImageNet-100 classifier initialisation\")")


def _read_pretrained(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``classifier.pretrained``, unwrapped from ``{"state_dict": …}`` / ``{"model": …}``
    and renamed to the kit's layout by :func:`remap_ood_checkpoint` (``module.`` / ``encoder.`` dropped,
    ``shortcut`` → ``downsample``). Read with ``weights_only=True``: a third-party file runs no code."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors span many lines: keep the first
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"classifier.pretrained={path} cannot be read as a state dict "
                         f"(torch.load weights_only=True): {first}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"classifier.pretrained={path} holds a {type(state).__name__}, not a state dict")
    return remap_ood_checkpoint({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def _init_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The stage-5 network, initialised from ``classifier.pretrained`` when set (METHOD.md §5).

    The ImageNet-100 preset follows the original: the CIFAR-stem ResNet-34 starts from Dream-OOD's
    CE-trained ImageNet-100 checkpoint of the same network, ``fc`` included (the same 100 classes in
    the same sorted-wnid order). An ``fc`` of another class count is dropped (logged) and trained
    anew; every other weight must be in the file.

    Raises:
        FileNotFoundError: the file is missing (the message says which file the original uses).
        DataError: a torchvision ImageNet ResNet (7 × 7 stem) given to a CIFAR-stem network.
        ValueError: an unreadable file, or weights that do not fit ``classifier.arch``.
    """
    c = cfg.classifier
    model = build_classifier(c.arch, num_classes, c.width)
    if not c.pretrained:
        return model
    path = Path(c.pretrained)
    if not path.exists():
        raise FileNotFoundError(f"classifier.pretrained={path} does not exist; the imagenet100 preset "
                                f"initialises from {_DREAM_OOD_INIT}: save it as {path} or point "
                                f"classifier.pretrained at it")
    state = _read_pretrained(path)
    ours = model.state_dict()
    theirs_stem, ours_stem = state.get("conv1.weight"), ours.get("conv1.weight")
    if theirs_stem is not None and ours_stem is not None and theirs_stem.shape[-2:] == (7, 7) \
            and ours_stem.shape[-2:] != (7, 7):
        # the likeliest mistake (the preset's file name reads like one): a torchvision ImageNet-1k
        # ResNet cannot initialise the CIFAR-stem network the original trains
        fc = state.get("fc.weight")
        what = f"7×7 stem conv1 {list(theirs_stem.shape)}"
        what += f", {fc.shape[0]}-class fc" if fc is not None else ""
        raise DataError(f"classifier.pretrained={path} is a torchvision-layout ImageNet ResNet ({what}), "
                        f"but classifier.arch={c.arch} is the CIFAR-stem ResNet (3×3 stem) that the original "
                        f"trains on ImageNet-100, initialised from {_DREAM_OOD_INIT}; use that file, or set "
                        f"classifier.arch=resnet34_imagenet to fine-tune the torchvision network")
    fc_keys = [k for k in state if k.startswith("fc.")]
    if fc_keys and any(state[k].shape != ours.get(k, torch.empty(0)).shape for k in fc_keys):
        log.info("classifier.pretrained: the file's fc has %d outputs, the run has %d classes: fc is "
                 "dropped and trained from a fresh initialisation",
                 state["fc.weight"].shape[0] if "fc.weight" in state else -1, num_classes)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    elif not fc_keys:
        log.info("classifier.pretrained: the file has no fc: fc is trained from a fresh initialisation")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes: keep the first mismatch, on one line
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise ValueError(f"classifier.pretrained={path} does not fit classifier.arch={c.arch}: "
                         f"{first.strip()}") from None
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"classifier.pretrained={path} does not fit classifier.arch={c.arch}: "
                         f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    log.info("classifier initialised from %s (%d tensors%s)", path, len(state),
             ", fc included" if any(k.startswith("fc.") for k in state) else "")
    return model


def mixed_precision(precision: str, device: torch.device) -> str:
    """``accelerate``'s ``mixed_precision`` for ``classifier.precision`` on ``device``: ``fp32`` (the
    original) trains in float32 everywhere; ``bf16`` autocasts on CUDA only, where it pays.

    Example:
        >>> mixed_precision("fp32", torch.device("cuda")), mixed_precision("bf16", torch.device("cuda"))
        ('no', 'bf16')
    """
    return "bf16" if precision == "bf16" and torch.device(device).type == "cuda" else "no"


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _quantiles(chunks: list[torch.Tensor]) -> list[float]:
    """The 5/25/50/75/95 % quantiles of the training-time energy scores (augmented images)."""
    return torch.quantile(torch.cat(chunks).float(), torch.tensor(QUANTILES)).tolist()


def head_slope(head: EnergyHead, quantiles_id: list[float]) -> float:
    """The energy head's slope where the run's ID scores lie: over the 5–95 % range of an epoch's
    ID training scores (``score_quantiles_id``). A linear head's slope is one number; an MLP
    head's (ImageNet-100) depends on the score, and only its value where ID images fall decides
    which way ``evaluate.energy_sign=auto`` ranks."""
    return float(head.slope(torch.linspace(quantiles_id[0], quantiles_id[-1], 101)))


def _cycle(loader: DataLoader, generator: torch.Generator, epoch: int, seed: int):
    """The outlier loader, restarted with a new seeded order each time it runs out (seeded by
    epoch and round, so a resumed run draws the outliers an uninterrupted one would)."""
    round_ = 0
    while True:
        generator.manual_seed(seed * 7919 + epoch * 131 + round_)
        yield from loader
        round_ += 1


def train(cfg: ExperimentConfig, run_dir: RunDir, folder: Path | None = None,
          progress: bool = True, stop_after: int | None = None,
          stop_after_steps: int | None = None) -> dict | None:
    """Train (or resume) the stage-5 classifier into ``folder`` (default ``classifier/``).

    Args:
        stop_after: train at most this many epochs in this call, then return None (time-boxing
            long runs; the next call resumes). None: train to the end.
        stop_after_steps: stop after this many optimizer steps and return None without writing
            a checkpoint (a rehearsal of the step at full shapes, ``benchmarks/rehearse_paper.py``).

    Returns:
        The history dict (also written as ``history.json``), or None when stopped early.
    """
    from accelerate import Accelerator

    c = cfg.classifier
    folder = Path(folder or run_dir.path("classifier_dir"))
    device = resolve_device(cfg.run.device)
    # split_batches: classifier.batch_size is the global batch, divided between processes, so a
    # multi-process run follows the single-process schedule (steps per epoch, learning rates)
    accelerator = Accelerator(cpu=device.type == "cpu", split_batches=True,
                              mixed_precision=mixed_precision(c.precision, device))
    seed = c.seed if c.seed is not None else cfg.run.seed
    torch.manual_seed(seed)

    split = get_split(cfg.data, "id-train")
    id_tf, out_tf = train_transforms(cfg)
    outliers = outlier_dataset(cfg, run_dir)
    id_generated = id_generated_dataset(cfg, run_dir, progress) if outliers is not None else None
    model = _init_model(cfg, len(split.classes))
    head = EnergyHead(c.energy_head, c.head_hidden)
    model = model.to(memory_format=MEMORY_FORMAT)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                          weight_decay=c.weight_decay)

    def loader(images: ImageDataset, transform, batch_size: int, seed_offset: int, drop_last: bool):
        """A shuffled loader over ``images`` with its own seeded generator (reseeded per epoch)."""
        gen = torch.Generator().manual_seed(seed + seed_offset)
        return training_loader(images, transform, batch_size, gen, c.num_workers, drop_last), gen

    # the ID loader keeps its last partial batch unless classifier.drop_last (the original keeps it:
    # 196 steps per CIFAR-100 epoch); the cycling loaders always drop theirs, so every step pairs a
    # full batch of outliers with the ID batch
    id_loader, id_gen = loader(split.dataset, id_tf, c.batch_size, 0, c.drop_last)
    out_loader, out_gen = loader(outliers, out_tf, c.outlier_batch_size, 1, True) if outliers is not None \
        else (None, None)
    # as many generated-looking ID images per step as outliers, with the ID augmentation
    gen_loader, gen_gen = loader(id_generated, id_tf, c.outlier_batch_size, 2, True) \
        if id_generated is not None else (None, None)
    model, head, opt, id_loader = accelerator.prepare(model, head, opt, id_loader)
    if out_loader is not None:
        out_loader = accelerator.prepare(out_loader)
    if gen_loader is not None:
        gen_loader = accelerator.prepare(gen_loader)
    steps_per_epoch = len(id_loader)
    total = steps_per_epoch * c.epochs

    # the resumable training state (checkpoints.save_training_state): weights, head, SGD momentum
    objects = {"model": accelerator.unwrap_model(model), "head": accelerator.unwrap_model(head),
               "optimizer": opt}
    epoch0, step, history = 0, 0, []
    state = load_training_state(folder, "last", objects)
    if state is not None:
        epoch0, step, history = state["epoch"], state["step"], state["history"]
        log.info("resuming stage 5 from epoch %d of %d", epoch0, c.epochs)

    last = c.epochs if stop_after is None else min(c.epochs, epoch0 + stop_after)
    for epoch in range(epoch0, last):
        # per-epoch seeds: a resumed run draws exactly what an uninterrupted one would
        torch.manual_seed(seed * 1_000_003 + epoch)
        id_gen.manual_seed(seed * 1_000_033 + epoch)
        outlier_iter = _cycle(out_loader, out_gen, epoch, seed) if out_loader is not None else None
        generated_iter = _cycle(gen_loader, gen_gen, epoch, seed + 17) if gen_loader is not None else None
        model.train(), head.train()
        sums = {"ce": 0.0, "energy": 0.0, "correct": 0, "seen": 0}
        scores_id, scores_out = [], []  # logsumexp per image: the energy distributions of the epoch
        bar = tqdm(id_loader, desc=f"classifier epoch {epoch + 1}/{c.epochs}", leave=False,
                   **bar_options(progress and accelerator.is_main_process))
        for x_in, y_in in bar:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, c.lr, c.final_lr)
            x, n_id = x_in, len(x_in)  # n_id: images on the ID side of the energy loss
            if generated_iter is not None:
                x_gen, _ = next(generated_iter)
                x, n_id = torch.cat([x, x_gen]), n_id + len(x_gen)
            if outlier_iter is not None:
                x_out, _ = next(outlier_iter)
                x = torch.cat([x, x_out])
            x = x.contiguous(memory_format=MEMORY_FORMAT)
            with accelerator.autocast():
                logits = model(x)
                ce = F.cross_entropy(logits[: len(x_in)], y_in)
                loss = ce
                if outlier_iter is not None:
                    is_id = torch.zeros(len(x), device=x.device)
                    is_id[:n_id] = 1
                    e_loss = energy_loss(logits.float(), is_id, head)
                    loss = ce + c.energy_weight * e_loss
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            step += 1
            if stop_after_steps is not None and step >= stop_after_steps:
                return None
            with torch.no_grad():
                s = torch.logsumexp(logits.float(), dim=1)
                sums["ce"] += ce.item() * len(x_in)
                sums["correct"] += (logits[: len(x_in)].argmax(1) == y_in).sum().item()
                sums["seen"] += len(x_in)
                scores_id.append(s[: len(x_in)].cpu())
                if outlier_iter is not None:
                    sums["energy"] += e_loss.item() * len(x_in)
                    scores_out.append(s[n_id:].cpu())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        quantiles_id = _quantiles(scores_id)
        slope = head_slope(accelerator.unwrap_model(head), quantiles_id)
        n = max(sums["seen"], 1)
        history.append({
            "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "ce": sums["ce"] / n,
            "energy_loss": sums["energy"] / n if outliers is not None else None,
            "train_acc": sums["correct"] / n, "slope": slope,
            "score_quantiles_id": quantiles_id,
            "score_quantiles_outlier": _quantiles(scores_out) if scores_out else None,
        })
        if outliers is not None and slope < 0:
            log.warning("epoch %d: the energy head's slope is negative (%.3g): outliers get the higher "
                        "logsumexp; stage 6 scores with sign(slope)·logsumexp", epoch + 1, slope)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_training_state(folder, "last", objects,
                                {"epoch": epoch + 1, "step": step, "history": history})
        log.info("classifier epoch %d: ce %.4f, acc %.3f, slope %.3g", epoch + 1, history[-1]["ce"],
                 history[-1]["train_acc"], slope)

    if last < c.epochs:
        return None
    model, head = accelerator.unwrap_model(model), accelerator.unwrap_model(head)
    slope = head_slope(head, history[-1]["score_quantiles_id"])
    result = {"epochs": history, "slope": slope, "slope_negative": slope < 0,
              "outliers": c.outliers, "num_outliers": len(outliers) if outliers is not None else 0,
              "id_generated": c.id_generated if id_generated is not None else "none",
              "energy_head": c.energy_head, "seed": seed}
    if accelerator.is_main_process:
        meta = {"arch": c.arch, "width": c.width, "num_classes": len(split.classes), "classes": list(split.classes),
                "head": c.energy_head, "head_hidden": c.head_hidden, "slope": slope,
                "outliers": c.outliers, "seed": seed}
        save_classifier(folder / "best.safetensors", model.cpu(), head.cpu(), meta)
        atomic_write_json(folder / "history.json", result)
    accelerator.wait_for_everyone()
    return result


# Stage 5 reads the ID data and its outlier source; it writes the best classifier and its history.
STAGE = STAGES["classifier"]


def run(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True) -> dict:
    """Stage 5 in the run folder: train unless ``classifier/best.safetensors`` is current.

    Stage 5's recorded inputs: the outlier tree of stage 4 for ``outliers=ncis``, the outlier
    folder's content for the other sources, nothing beyond the config for ``none``. Under
    ``accelerate launch`` only the main process keeps the manifest; all processes train.
    """
    import contextlib

    from ..device import broadcast, process_state

    c = cfg.classifier
    state, _ = process_state(cfg.run.device)
    inputs = stage_inputs(cfg, "classifier")
    folder = _outlier_folder(cfg, run_dir)
    extra = (folder,) if folder is not None and "outliers_dir" not in inputs else ()
    with contextlib.ExitStack() as stack:
        rec = stack.enter_context(run_dir.stage("classifier", inputs=inputs, extra=extra)) \
            if state.is_main_process else None
        done, resumable = broadcast(state, [rec.done, rec.resumable] if rec else [None, None])
        if not done:
            if not resumable and state.is_main_process:
                for name in ("last.json", "last.safetensors"):
                    (run_dir.path("classifier_dir") / name).unlink(missing_ok=True)
            state.wait_for_everyone()
            history = train(cfg, run_dir, progress=progress)
            if rec is not None:
                rec.info.update(slope=history["slope"], outliers=history["outliers"],
                                processes=state.num_processes)
    state.wait_for_everyone()
    return json.loads(run_dir.path("classifier_history").read_text())


def main(argv=None) -> int:
    """``python -m ncis_core.stages.train_classifier --preset P --out DIR [--set k=v …]``
    (also under ``accelerate launch``: the batches of each step are split between processes)."""
    from .command import stage_main

    return stage_main(argv, "train_classifier", run)


if __name__ == "__main__":
    raise SystemExit(main())
