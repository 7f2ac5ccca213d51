"""Image transforms without torchvision (it cannot be installed beside this torch).

Array transforms map ``H × W × 3`` ``uint8`` RGB arrays to arrays, with torchvision's geometry and
PIL's resampling; :class:`ToTensor` then makes a ``float32`` ``C × H × W`` tensor in ``[0, 1]``.
Random transforms draw from torch's generator (global, or the one given as ``generator``).

    >>> train = Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(),
    ...                  Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    >>> train(np.zeros((32, 32, 3), np.uint8)).shape
    torch.Size([3, 32, 32])
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "INTERPOLATIONS",
    "Compose",
    "Resize",
    "CenterCrop",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomChoiceResize",
    "ToTensor",
    "Normalize",
    "eval_transform",
    "to_rgb_uint8",
    "to_model_range",
]

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _resample(name: str) -> Image.Resampling:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation {name!r} is not one of {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as ``(height, width)``; an int means a square."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _resize_exact(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image).resize((width, height), _resample(interpolation))
    return np.asarray(pil)


def _pad(image: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """Zero padding, as ``np.pad(mode="constant")`` but without its overhead."""
    if top == bottom == left == right == 0:
        return image
    h, w = image.shape[:2]
    out = np.zeros((h + top + bottom, w + left + right) + image.shape[2:], dtype=image.dtype)
    out[top:top + h, left:left + w] = image
    return out


def _randint(high: int, generator: torch.Generator | None) -> int:
    """A uniform integer in ``[0, high)`` from torch's generator."""
    return int(torch.randint(0, high, (1,), generator=generator).item())


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator).item())


class Compose:
    """Apply ``transforms`` one after the other."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class Resize:
    """Resize the shorter side to ``size``; the longer becomes ``int(size * long / short)``.

        >>> Resize(32)(np.zeros((64, 96, 3), np.uint8)).shape
        (32, 48, 3)
    """

    def __init__(self, size: int, interpolation: str = "bilinear"):
        if not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"Resize takes a positive int size (the shorter side), got {size!r}")
        _resample(interpolation)
        self.size = int(size)
        self.interpolation = interpolation

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after resizing an image of that size."""
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        return _resize_exact(image, *self.output_size(h, w), self.interpolation)

    def __repr__(self) -> str:
        return f"Resize({self.size}, interpolation={self.interpolation!r})"


class CenterCrop:
    """Crop the centre ``size`` (offsets rounded as torchvision's; a smaller image is zero-padded).

        >>> CenterCrop(2)(np.arange(16, dtype=np.uint8).reshape(4, 4, 1))[..., 0]
        array([[ 5,  6],
               [ 9, 10]], dtype=uint8)
    """

    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        th, tw = self.size
        h, w = image.shape[:2]
        if th > h or tw > w:
            pad_h, pad_w = max(th - h, 0), max(tw - w, 0)
            image = _pad(image, pad_h // 2, (pad_h + 1) // 2, pad_w // 2, (pad_w + 1) // 2)
            h, w = image.shape[:2]
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return image[top:top + th, left:left + tw]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomCrop:
    """Zero-pad every border by ``padding`` pixels, then crop ``size`` at a uniform random place."""

    def __init__(self, size: int | Sequence[int], padding: int = 0,
                 generator: torch.Generator | None = None):
        if padding < 0:
            raise ValueError(f"padding must be ≥ 0, got {padding}")
        self.size = _pair(size)
        self.padding = int(padding)
        self.generator = generator

    def __call__(self, image: np.ndarray) -> np.ndarray:
        p = self.padding
        image = _pad(image, p, p, p, p)
        th, tw = self.size
        h, w = image.shape[:2]
        if th > h or tw > w:
            raise ValueError(f"crop {self.size} is larger than the padded image {(h, w)}")
        # draw nothing when there is nothing to choose, as torchvision
        if (h, w) == (th, tw):
            return image
        top = _randint(h - th + 1, self.generator)
        left = _randint(w - tw + 1, self.generator)
        return image[top:top + th, left:left + tw]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror left–right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p = float(p)
        self.generator = generator

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if torch.rand(1, generator=self.generator).item() < self.p:
            # torch.from_numpy refuses negative strides
            return np.ascontiguousarray(image[:, ::-1])
        return image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResizedCrop:
    """Crop a random area and aspect ratio, then resize it to ``size`` (torchvision's algorithm).

    Args:
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's width / height.
    """

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bilinear",
                 generator: torch.Generator | None = None):
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError(f"scale and ratio must be (min, max), got {scale} and {ratio}")
        _resample(interpolation)
        self.size = _pair(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.interpolation = interpolation
        self.generator = generator

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, crop_height, crop_width)`` for an image of ``height × width``."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(self.scale[0], self.scale[1], self.generator)
            aspect = math.exp(_uniform(log_lo, log_hi, self.generator))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = _randint(height - h + 1, self.generator)
                left = _randint(width - w + 1, self.generator)
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: np.ndarray) -> np.ndarray:
        top, left, h, w = self.get_params(*image.shape[:2])
        crop = np.ascontiguousarray(image[top:top + h, left:left + w])
        return _resize_exact(crop, *self.size, self.interpolation)

    def __repr__(self) -> str:
        return (f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation!r})")


class RandomChoiceResize:
    """Resize to exactly ``size`` with a filter drawn per image (METHOD.md §5's outlier transform)."""

    def __init__(self, size: int | Sequence[int],
                 interpolations: Sequence[str] = ("nearest", "bilinear"),
                 generator: torch.Generator | None = None):
        if not interpolations:
            raise ValueError("interpolations must not be empty")
        for name in interpolations:
            _resample(name)
        self.size = _pair(size)
        self.interpolations = tuple(interpolations)
        self.generator = generator

    def __call__(self, image: np.ndarray) -> np.ndarray:
        choice = self.interpolations[_randint(len(self.interpolations), self.generator)]
        return _resize_exact(image, *self.size, choice)

    def __repr__(self) -> str:
        return f"RandomChoiceResize({self.size}, interpolations={self.interpolations})"


class ToTensor:
    """``uint8`` ``H × W × C`` (or ``H × W``) array → ``float32`` ``C × H × W`` tensor in [0, 1].

    Example:
        >>> ToTensor()(np.full((2, 2, 3), 255, np.uint8)).amax().item()
        1.0
    """

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise TypeError(f"ToTensor expects a uint8 array, got {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return tensor.to(torch.float32).div_(255.0)

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """``(x - mean) / std`` per channel on a ``C × H × W`` (or ``N × C × H × W``) float tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s == 0 for s in std):
            raise ValueError(f"std must be non-zero, got {list(std)}")
        self.mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(device=tensor.device, dtype=tensor.dtype)
        std = self.std.to(device=tensor.device, dtype=tensor.dtype)
        return (tensor - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def eval_transform(resize: int, image_size: int) -> Compose:
    """The evaluation transform of METHOD.md §6: ``Resize(resize)`` then ``CenterCrop(image_size)``."""
    return Compose([Resize(resize), CenterCrop(image_size)])


def to_rgb_uint8(image) -> np.ndarray:
    """A PIL image or a numpy array as an ``H × W × 3`` ``uint8`` RGB array (alpha dropped).

    Arrays: grey is replicated, ``bool`` is 0/255, floats are read as ``[0, 1]``, integers ``[0, 255]``.

        >>> to_rgb_uint8(Image.new("L", (4, 2), 7)).shape
        (2, 4, 3)
    """
    if isinstance(image, Image.Image):
        if image.mode.startswith("I;16"):
            # PIL's convert would clip 16-bit values at 255
            grey = (np.asarray(image, dtype=np.uint32) // 257).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8).copy()
    array = np.asarray(image)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"cannot read an image array of dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"integer image values must lie in [0, 255], got "
                             f"[{array.min()}, {array.max()}]")
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H×W, H×W×1, H×W×3 or H×W×4 image, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """``N × H × W × 3`` uint8 → ``N × 3 × H × W`` float32 in [-1, 1] (the diffusion models' range)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x.div(127.5).sub(1.0)
