"""Classifiers for stage 5: CIFAR- and ImageNet-stem ResNet-18/34, a small demo network, and the
energy head φ, in torchvision's state-dict layout. Every network returns logits (and, with
``return_features=True``, the penultimate features).

    >>> net = resnet34(num_classes=100)
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BasicBlock",
    "ResNet",
    "resnet18",
    "resnet34",
    "SmallNet",
    "build_classifier",
    "EnergyHead",
    "remap_ood_checkpoint",
    "MEMORY_FORMAT",
]

# NHWC everywhere (stages 5 and 6): NCHW's arithmetic up to rounding, faster on GPUs and CPUs
MEMORY_FORMAT = torch.channels_last


class BasicBlock(nn.Module):
    """Two 3 × 3 convolutions with a residual connection (ResNet-18/34's block).

    A 1 × 1 projection (``downsample``) matches the shortcut when ``stride`` or width change it.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """A ResNet of :class:`BasicBlock` stages with widths 64/128/256/512 (METHOD.md §5).

    Args:
        blocks: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-34.
        stem: ``"cifar"`` (3 × 3 conv, no max-pool) or ``"imagenet"`` (torchvision's 7 × 7 + max-pool).
    """

    def __init__(self, blocks: tuple[int, ...], num_classes: int, stem: str = "cifar"):
        super().__init__()
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(64)
        planes, layers = 64, []
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(planes, width, stride)] + [BasicBlock(width, width) for _ in range(count - 1)]
            layers.append(nn.Sequential(*stage))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)
        self.feature_dim = 512
        for m in self.modules():
            # METHOD.md §5: Kaiming-normal (fan_out) convolutions, BN γ = 1, β = 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (after global average pooling), ``B × 512``."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.features(x)
        logits = self.fc(feats)
        return (logits, feats) if return_features else logits


def resnet18(num_classes: int, stem: str = "cifar") -> ResNet:
    """ResNet-18: blocks (2, 2, 2, 2)."""
    return ResNet((2, 2, 2, 2), num_classes, stem)


def resnet34(num_classes: int, stem: str = "cifar") -> ResNet:
    """ResNet-34: blocks (3, 4, 6, 3) — the paper's classifier."""
    return ResNet((3, 4, 6, 3), num_classes, stem)


class SmallNet(nn.Module):
    """A small, fast CNN for the 32 × 32 demo world: three conv–BN–ReLU stages of ``width`` × 1, 2, 4."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        chans = (3, width, 2 * width, 4 * width)
        stages = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            stages += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.body = nn.Sequential(*stages)
        self.fc = nn.Linear(chans[-1], num_classes)
        self.feature_dim = chans[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, ``B × 4·width``."""
        return torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.features(x)
        logits = self.fc(feats)
        return (logits, feats) if return_features else logits


def build_classifier(arch: str, num_classes: int, width: int = 32) -> nn.Module:
    """``resnet34`` / ``resnet18`` (CIFAR stem), ``resnet34_imagenet`` (torchvision stem) or ``small``
    (``width`` channels in its first stage)."""
    builders = {
        "resnet34": lambda: resnet34(num_classes),
        "resnet18": lambda: resnet18(num_classes),
        "resnet34_imagenet": lambda: resnet34(num_classes, stem="imagenet"),
        "small": lambda: SmallNet(num_classes, width),
    }
    if arch not in builders:
        raise ValueError(f"unknown classifier.arch {arch!r}; use one of {', '.join(builders)}")
    return builders[arch]()


class EnergyHead(nn.Module):
    """φ: the energy score s(x) = logsumexp of the logits → 2 logits (outlier, ID) (METHOD.md §5).

    Args:
        kind: ``"linear"`` (the paper's; its slope can turn negative) or ``"monotone"`` (slope > 0).
        hidden: 0 for the single linear layer; 512 for the ImageNet-100 head.

        >>> head = EnergyHead("monotone")
        >>> head(torch.tensor([0.5, 2.0])).shape, bool(head.slope() > 0)
        (torch.Size([2, 2]), True)
    """

    def __init__(self, kind: str = "linear", hidden: int = 0):
        super().__init__()
        if kind not in ("linear", "monotone"):
            raise ValueError(f"energy_head must be 'linear' or 'monotone', got {kind!r}")
        self.kind, self.hidden = kind, hidden
        if kind == "linear":
            self.net = nn.Linear(1, 2) if hidden == 0 else nn.Sequential(
                nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        elif hidden == 0:
            self.rho = nn.Parameter(torch.zeros(()))  # a = softplus(ρ); softplus(0) = 0.69 > 0
            self.bias = nn.Parameter(torch.zeros(()))
        else:
            # positive weights on both layers around a ReLU: a non-decreasing function of s
            self.rho_in = nn.Parameter(torch.randn(hidden) * 0.1)
            self.bias_in = nn.Parameter(torch.randn(hidden))
            self.rho_out = nn.Parameter(torch.full((hidden,), -3.0))
            self.bias_out = nn.Parameter(torch.zeros(()))

    def margin(self, s: torch.Tensor) -> torch.Tensor:
        """ID-logit minus outlier-logit as a function of the score s (shape of ``s``)."""
        s = s.reshape(-1, 1)
        if self.kind == "linear":
            out = self.net(s)
            return out[:, 1] - out[:, 0]
        if self.hidden == 0:
            return (F.softplus(self.rho) * s + self.bias).squeeze(1)
        h = F.relu(F.softplus(self.rho_in) * s + self.bias_in)
        return h @ F.softplus(self.rho_out) + self.bias_out

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.net(s.reshape(-1, 1))
        margin = self.margin(s)
        return torch.stack([torch.zeros_like(margin), margin], dim=1)

    @torch.no_grad()
    def slope(self, at: torch.Tensor | None = None) -> torch.Tensor:
        """d margin / d s (an MLP head's: the mean over ``at``); negative = ranks backwards."""
        if self.hidden == 0 and self.kind == "linear":
            w = self.net.weight[:, 0]
            return w[1] - w[0]
        if self.hidden == 0:
            return F.softplus(self.rho)
        at = torch.linspace(-20, 20, 401) if at is None else at.flatten().float()
        eps = 1e-2
        return ((self.margin(at + eps) - self.margin(at - eps)) / (2 * eps)).mean()


_OOD_KEY = re.compile(r"^(?:module\.)?(?:encoder\.)?(.*)$")


def remap_ood_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the OOD literature's CIFAR ResNet keys to torchvision's layout (which passes unchanged).

        >>> sorted(remap_ood_checkpoint({"module.encoder.layer2.0.shortcut.1.weight": torch.ones(1)}))
        ['layer2.0.downsample.1.weight']
    """
    out = {}
    for key, value in state.items():
        key = _OOD_KEY.match(key).group(1)
        key = re.sub(r"\.shortcut\.(\d)\.", r".downsample.\1.", key)
        out[key] = value
    return out
