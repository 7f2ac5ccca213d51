"""The demo generator's quality check: how often a small classifier names the prompted class.

    >>> from ncis_core.assets import path
    >>> from ncis_core.demo_generator import load_pipeline
    >>> classes = ["bear", "cat"]
    >>> generated = generate_per_class(load_pipeline(path("data/demo/generator")), classes,
    ...                                per_class=2, guidance_scale=3.0, steps=2)
    >>> generated.shape, generated.dtype
    ((2, 2, 32, 32, 3), dtype('uint8'))
    >>> always_bear = lambda x: torch.tensor([[1.0, 0.0]]).expand(len(x), 2)
    >>> report = class_consistency(always_bear, generated, classes)
    >>> report["class_consistency"], report["per_class"], report["confusion"]
    (0.5, {'bear': 1.0, 'cat': 0.0}, [[2, 0], [2, 0]])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..diffusion import vae_reconstruct
from ..progress import bar_options
from .train import training_images

if TYPE_CHECKING:
    from ..config import ExperimentConfig

__all__ = ["generate_per_class", "QualityClassifier", "train_quality_classifier", "class_consistency", "accuracy",
           "reconstruction_rows"]


@torch.no_grad()
def generate_per_class(pipe, classes: Sequence[str], per_class: int, guidance_scale: float,
                       steps: int = 25, seed: int = 0, prompt: str = "An image of a {}",
                       batch_size: int = 64) -> np.ndarray:
    """``per_class`` images per class from ``prompt``, as ``C × per_class × H × W × 3`` uint8.

    Seeded: image ``j`` of every class starts from the same noise, so rows of a montage compare."""
    images = []
    for c in classes:
        row = []
        for start in range(0, per_class, batch_size):
            n = min(batch_size, per_class - start)
            g = torch.Generator().manual_seed(seed + start)
            out = pipe([prompt.format(c)] * n, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=g, output_type="np").images
            row.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        images.append(np.concatenate(row))
    return np.stack(images)


class QualityClassifier(nn.Module):
    """A small CNN for 32 × 32 silhouettes, only used to judge the generator."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def train_quality_classifier(x: torch.Tensor, y: np.ndarray, num_classes: int, epochs: int = 4,
                             seed: int = 0, progress: bool = True) -> QualityClassifier:
    """Train :class:`QualityClassifier` on ``x`` (``N × 3 × 32 × 32`` in [-1, 1]) with flips and shifts."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = QualityClassifier(num_classes)
    y_t = torch.as_tensor(y)
    steps = epochs * math.ceil(len(x) / 128)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc="quality classifier", **bar_options(progress))
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, (dy, dx), (2, 3))
            loss = F.cross_entropy(model(xb), y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    return model.eval()


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)]).numpy()


def class_consistency(classifier: nn.Module, generated: np.ndarray, classes: Sequence[str]) -> dict:
    """How often ``classifier`` names the class each generated image was prompted with.

    ``generated``: ``C × n × H × W × 3`` uint8, row ``c`` prompted with ``classes[c]``.
    """
    c, n = generated.shape[:2]
    pred = _predict(classifier, _to_tensor(generated.reshape(c * n, *generated.shape[2:]))).reshape(c, n)
    confusion = np.zeros((c, c), dtype=int)
    for i in range(c):
        np.add.at(confusion[i], pred[i], 1)
    per_class = {name: float((pred[i] == i).mean()) for i, name in enumerate(classes)}
    return {"class_consistency": float((pred == np.arange(c)[:, None]).mean()),
            "per_class": per_class, "confusion": confusion.tolist()}


def accuracy(classifier: nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``classifier`` on uint8 ``N × H × W × 3`` images (or a [-1, 1] tensor)."""
    x = images if torch.is_tensor(images) else _to_tensor(images)
    return float((_predict(classifier, x) == np.asarray(labels)).mean())


@torch.no_grad()
def reconstruction_rows(pipe, cfg: ExperimentConfig, per_class: int = 8) -> tuple[list[str], list[list[np.ndarray]]]:
    """Real ID training images and their VAE reconstructions, two rows per class (for a montage)."""
    x, labels, classes = training_images(cfg)
    k = min(per_class, int(np.bincount(labels).min()))
    pick = np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(len(classes))])
    with torch.no_grad():
        recon = vae_reconstruct(pipe.vae, x[pick])

    def to_uint8(t: torch.Tensor) -> np.ndarray:
        return ((t.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)

    real, rec = to_uint8(x[pick]), to_uint8(recon)
    names, rows = [], []
    for c, name in enumerate(classes):
        names += [name, f"{name} (VAE)"]
        rows += [list(real[c * k:(c + 1) * k]), list(rec[c * k:(c + 1) * k])]
    return names, rows
