"""Transforms against hand-computed and PIL-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ncis_core.data.transforms import (CenterCrop, Compose, Normalize, RandomChoiceResize,
                                       RandomCrop, RandomHorizontalFlip, RandomResizedCrop, Resize,
                                       ToTensor, eval_transform, to_rgb_uint8)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def pil_resize(image: np.ndarray, h: int, w: int, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((w, h), resample))


@pytest.mark.parametrize("shape, size, expected", [
    ((64, 96), 32, (32, 48)),    # landscape: height is the shorter side
    ((96, 64), 32, (48, 32)),    # portrait
    ((50, 50), 20, (20, 20)),    # square
    ((33, 50), 32, (32, 48)),    # 32 * 50 / 33 = 48.48…, truncated like torchvision
    ((300, 500), 256, (256, 426)),
])
def test_resize_shape_and_equals_pil(shape, size, expected):
    image = random_image(*shape)
    out = Resize(size)(image)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, pil_resize(image, *expected))


def test_resize_interpolation_and_noop():
    image = random_image(20, 30)
    np.testing.assert_array_equal(Resize(10, "nearest")(image),
                                  pil_resize(image, 10, 15, Image.Resampling.NEAREST))
    assert Resize(20)(image) is image  # shorter side already right: untouched
    with pytest.raises(ValueError):
        Resize((32, 32))
    with pytest.raises(ValueError):
        Resize(32, "cubic-ish")


def test_center_crop_indices():
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    np.testing.assert_array_equal(CenterCrop(3)(image), image[1:4, 2:5])
    # (6 - 3) / 2 = 1.5 rounds half to even → 2, as torchvision's round() does
    image = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    np.testing.assert_array_equal(CenterCrop(3)(image), image[2:5, 2:5])
    np.testing.assert_array_equal(CenterCrop((2, 4))(image), image[2:4, 1:5])


def test_center_crop_pads_small_images():
    image = np.full((2, 2, 3), 9, np.uint8)
    out = CenterCrop(4)(image)
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[1:3, 1:3], image)
    assert out.sum() == image.sum()


def test_random_crop_is_seeded_and_a_padded_slice():
    image = random_image(32, 32)
    outs = [RandomCrop(32, padding=4, generator=torch.Generator().manual_seed(7))(image)
            for _ in range(2)]
    np.testing.assert_array_equal(outs[0], outs[1])
    # The same draws by hand: top then left, uniform in 0..8.
    g = torch.Generator().manual_seed(7)
    top = int(torch.randint(0, 9, (1,), generator=g))
    left = int(torch.randint(0, 9, (1,), generator=g))
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    np.testing.assert_array_equal(outs[0], padded[top:top + 32, left:left + 32])


def test_random_crop_covers_all_offsets_and_seeds_differ():
    image = (np.arange(16, dtype=np.uint8).reshape(4, 4, 1) + 1).repeat(3, axis=2)
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
    crop = RandomCrop(4, padding=1, generator=torch.Generator().manual_seed(0))
    offsets = set()
    for _ in range(200):
        out = crop(image)
        offsets |= {(t, l) for t in range(3) for l in range(3)
                    if np.array_equal(out, padded[t:t + 4, l:l + 4])}
    assert offsets == {(t, l) for t in range(3) for l in range(3)}
    a = RandomCrop(32, 4, torch.Generator().manual_seed(1))(random_image(32, 32))
    b = RandomCrop(32, 4, torch.Generator().manual_seed(2))(random_image(32, 32))
    assert not np.array_equal(a, b)


def test_random_crop_global_generator_follows_manual_seed():
    image = random_image(32, 32)
    torch.manual_seed(3)
    a = RandomCrop(28)(image)
    torch.manual_seed(3)
    np.testing.assert_array_equal(RandomCrop(28)(image), a)


def test_horizontal_flip():
    image = random_image(4, 5)
    flipped = RandomHorizontalFlip(p=1.0)(image)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    assert flipped.flags.c_contiguous
    assert RandomHorizontalFlip(p=0.0)(image) is image
    flips = [not np.array_equal(RandomHorizontalFlip(0.5, torch.Generator().manual_seed(s))(image),
                                image) for s in range(40)]
    assert 0 < sum(flips) < 40


def test_random_resized_crop_matches_its_params_and_pil():
    image = random_image(60, 80)
    rrc = RandomResizedCrop(24, generator=torch.Generator().manual_seed(5))
    out = rrc(image)
    assert out.shape == (24, 24, 3)
    same_draws = RandomResizedCrop(24, generator=torch.Generator().manual_seed(5))
    top, left, h, w = same_draws.get_params(60, 80)
    assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
    expected = pil_resize(np.ascontiguousarray(image[top:top + h, left:left + w]), 24, 24)
    np.testing.assert_array_equal(out, expected)
    again = RandomResizedCrop(24, generator=torch.Generator().manual_seed(5))(image)
    np.testing.assert_array_equal(out, again)


def test_random_resized_crop_area_and_ratio_within_bounds():
    rrc = RandomResizedCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0),
                            generator=torch.Generator().manual_seed(0))
    for _ in range(50):
        _, _, h, w = rrc.get_params(100, 100)
        assert 0.2 <= h * w / 10_000 <= 0.55
        assert 0.45 <= w / h <= 2.2


def test_random_resized_crop_falls_back_to_centre():
    # An area larger than the image never fits: after 10 tries the centre crop, ratio clamped.
    rrc = RandomResizedCrop(8, scale=(1.5, 2.0), generator=torch.Generator().manual_seed(0))
    assert rrc.get_params(100, 400) == (0, 133, 100, 133)   # too wide: w = round(100 * 4/3)
    assert rrc.get_params(400, 100) == (133, 0, 133, 100)   # too tall: h = round(100 / (3/4))
    assert rrc.get_params(100, 110) == (0, 0, 100, 110)     # ratio inside: whole image


def test_random_choice_resize_uses_both_filters():
    image = random_image(64, 64)
    nearest = pil_resize(image, 32, 32, Image.Resampling.NEAREST)
    bilinear = pil_resize(image, 32, 32, Image.Resampling.BILINEAR)
    resize = RandomChoiceResize(32, generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(30):
        out = resize(image)
        assert out.shape == (32, 32, 3)
        if np.array_equal(out, nearest):
            seen.add("nearest")
        elif np.array_equal(out, bilinear):
            seen.add("bilinear")
        else:
            pytest.fail("output matches neither filter")
    assert seen == {"nearest", "bilinear"}
    wide = RandomChoiceResize(32)(random_image(40, 90))
    assert wide.shape == (32, 32, 3)  # exactly size × size, aspect not kept


def test_to_tensor_and_normalize():
    image = np.array([[[0, 51, 255], [102, 204, 153]]], np.uint8)  # 1 × 2 × 3
    tensor = ToTensor()(image)
    assert tensor.shape == (3, 1, 2) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor[:, 0, 0].numpy(), [0.0, 0.2, 1.0], rtol=1e-6)
    np.testing.assert_allclose(tensor[:, 0, 1].numpy(), [0.4, 0.8, 0.6], rtol=1e-6)
    assert ToTensor()(np.zeros((4, 5), np.uint8)).shape == (1, 4, 5)
    with pytest.raises(TypeError):
        ToTensor()(np.zeros((2, 2, 3), np.float32))
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    out = norm(tensor)
    np.testing.assert_allclose(out[:, 0, 0].numpy(), [-1.0, -0.2, 0.5], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(norm(tensor[None])[0].numpy(), out.numpy())  # batches too
    with pytest.raises(ValueError):
        Normalize((0.5,), (0.0,))


def test_compose_and_eval_transform():
    image = random_image(300, 500)
    out = eval_transform(256, 224)(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, CenterCrop(224)(Resize(256)(image)))
    pipeline = Compose([RandomCrop(32, 4, torch.Generator().manual_seed(0)),
                        RandomHorizontalFlip(generator=torch.Generator().manual_seed(0)),
                        ToTensor(), Normalize([0.5] * 3, [0.5] * 3)])
    out = pipeline(random_image(32, 32))
    assert out.shape == (3, 32, 32) and -1.0 <= out.min() and out.max() <= 1.0
    assert "RandomCrop" in repr(pipeline)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "RGB", "CMYK"])
def test_to_rgb_uint8_from_pil_modes(mode):
    base = Image.fromarray(random_image(6, 7))
    out = to_rgb_uint8(base.convert(mode))
    assert out.shape == (6, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(base.convert(mode).convert("RGB")))


def test_to_rgb_uint8_16_bit_and_arrays():
    grey16 = Image.fromarray(np.array([[0, 65535], [257, 514]], dtype=np.uint16))
    out = to_rgb_uint8(grey16)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [1, 2]])
    assert out.shape == (2, 2, 3)
    grey = np.array([[1, 2], [3, 4]], np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(grey)[..., 2], grey)
    np.testing.assert_array_equal(to_rgb_uint8(grey[..., None]), to_rgb_uint8(grey))
    rgba = np.dstack([random_image(3, 3), np.zeros((3, 3), np.uint8)])
    np.testing.assert_array_equal(to_rgb_uint8(rgba), rgba[..., :3])
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[0.0, 1.0]]))[0, :, 0], [0, 255])
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[True, False]]))[0, :, 1], [255, 0])
    with pytest.raises(ValueError):
        to_rgb_uint8(np.array([[300]], np.int32))
    with pytest.raises(ValueError):
        to_rgb_uint8(np.zeros((2, 2, 2), np.uint8))


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (1, 1, 3)])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 2, 3, 0), (4, 4, 4, 4)])
def test_zero_padding_equals_numpy_pad(shape, pads):
    from ncis_core.data.transforms import _pad

    image = np.random.default_rng(0).integers(1, 255, shape, dtype=np.uint8)
    top, bottom, left, right = pads
    expected = np.pad(image, ((top, bottom), (left, right)) + ((0, 0),) * (image.ndim - 2))
    out = _pad(image, *pads)
    assert out.dtype == image.dtype
    np.testing.assert_array_equal(out, expected)


# ----------------------------------------------------------------------------- the stages' composed transforms
# METHOD.md §5: the CIFAR constants; smoke's mean = std = 0.5 would hide a swap of the two.
CIFAR_MEAN = np.array([125.3, 123.0, 113.9]) / 255
CIFAR_STD = np.array([63.0, 62.1, 66.7]) / 255


def _normalised(hwc: np.ndarray, mean, std) -> torch.Tensor:
    """By hand: uint8 H × W × 3 → float C × H × W, (x / 255 − mean) / std per channel (float64)."""
    x = hwc.astype(np.float64) / 255.0
    return torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy())


def _crop_flip(image: np.ndarray, g: torch.Generator, pad: int = 4, size: int = 32) -> tuple[np.ndarray, bool]:
    """By hand: RandomCrop(size, padding=pad) then HFlip(0.5), drawing top, left, flip from ``g``."""
    padded = np.zeros((image.shape[0] + 2 * pad, image.shape[1] + 2 * pad, 3), np.uint8)
    padded[pad:pad + image.shape[0], pad:pad + image.shape[1]] = image
    top = int(torch.randint(0, padded.shape[0] - size + 1, (1,), generator=g))
    left = int(torch.randint(0, padded.shape[1] - size + 1, (1,), generator=g))
    crop = padded[top:top + size, left:left + size]
    flip = bool(torch.rand(1, generator=g) < 0.5)
    return (crop[:, ::-1] if flip else crop), flip


@pytest.fixture
def cifar(tmp_path):
    from data_fixtures import write_tiny_cifar100

    from ncis_core.config import load_config

    rows = write_tiny_cifar100(tmp_path / "cifar", n_train=6, n_test=4, seed=3)
    return load_config("cifar100", [f"data.root={tmp_path / 'cifar'}"]), rows


def _hwc(row: np.ndarray) -> np.ndarray:
    return row.reshape(3, 32, 32).transpose(1, 2, 0)  # the archive's rows: R, G, B planes of 32 × 32


def test_stage5_cifar_id_transform_is_crop_flip_normalize_by_hand(cifar):
    """Stage 5's ID augmentation on the CIFAR-100 split, as stage 5 composes it: RandomCrop(32, pad 4)
    + HFlip (drawn third from torch's generator, p = 0.5) + Normalize(CIFAR mean, CIFAR std)."""
    from ncis_core.data import get_split, with_transform
    from ncis_core.stages.train_classifier import train_transforms

    cfg, rows = cifar
    assert np.allclose(cfg.classifier.mean, CIFAR_MEAN) and np.allclose(cfg.classifier.std, CIFAR_STD)
    id_tf, _ = train_transforms(cfg)
    data = with_transform(get_split(cfg.data, "id-train").dataset, id_tf)
    flips = []
    for seed in range(60):
        i = seed % len(data)
        torch.manual_seed(seed)  # stage 5 seeds torch's global generator per epoch; workers reseed it
        got, label = data[i]
        expected, flip = _crop_flip(_hwc(rows["train"][0][i]), torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got.double(), _normalised(expected, CIFAR_MEAN, CIFAR_STD), rtol=0, atol=1e-5)
        assert label == rows["train"][1][i]
        flips.append(flip)
    assert 0.3 < np.mean(flips) < 0.7  # p = 0.5: both branches exercised


def test_stage5_cifar_outlier_transform_resizes_with_a_random_filter_then_crop_flip_normalize():
    from ncis_core.config import load_config
    from ncis_core.stages.train_classifier import train_transforms

    _, out_tf = train_transforms(load_config("cifar100"))
    image = random_image(64, 64, seed=5)
    filters = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        choice = int(torch.randint(0, 2, (1,), generator=g))  # nearest or bilinear, drawn first
        filters.append(choice)
        small = pil_resize(image, 32, 32, [Image.Resampling.NEAREST, Image.Resampling.BILINEAR][choice])
        expected, _ = _crop_flip(small, g)
        torch.manual_seed(seed)
        torch.testing.assert_close(out_tf(image).double(), _normalised(expected, CIFAR_MEAN, CIFAR_STD),
                                   rtol=0, atol=1e-5)
    assert set(filters) == {0, 1}


def test_stage5_imagenet_transform_is_random_resized_crop_flip_normalize():
    from ncis_core.config import load_config
    from ncis_core.stages.train_classifier import train_transforms

    cfg = load_config("imagenet100")
    id_tf, out_tf = train_transforms(cfg)
    image = random_image(300, 400, seed=6)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    flips = []
    for seed in range(16):
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = RandomResizedCrop(224, generator=g).get_params(300, 400)
        crop = pil_resize(np.ascontiguousarray(image[top:top + h, left:left + w]), 224, 224)
        flip = bool(torch.rand(1, generator=g) < 0.5)
        flips.append(flip)
        expected = _normalised(crop[:, ::-1] if flip else crop, mean, std)
        for tf in (id_tf, out_tf):
            torch.manual_seed(seed)
            torch.testing.assert_close(tf(image).double(), expected, rtol=0, atol=1e-5)
    assert any(flips) and not all(flips)


class _Capture:
    """A stand-in score that keeps the batches stage 6 feeds it."""

    name = "capture"

    def __init__(self):
        self.batches = []

    def __call__(self, model, images):
        self.batches.append(images)
        return torch.zeros(len(images))


def test_stage6_evaluation_transform_with_the_cifar_constants(cifar, tmp_path):
    """Stage 6's input path (split's Resize + CenterCrop, then ToTensor + Normalize with the
    classifier's constants): no flip, no crop offset, the same mean and std as training."""
    from dataclasses import replace

    from ncis_core.data import get_split
    from ncis_core.stages.evaluate import score_split

    cfg, rows = cifar
    capture = _Capture()
    score_split(None, capture, get_split(cfg.data, "id-test"), cfg, torch.device("cpu"), progress=False)
    got = torch.cat(capture.batches).double()
    expected = torch.stack([_normalised(_hwc(r), CIFAR_MEAN, CIFAR_STD) for r in rows["test"][0]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # a non-square OOD image: Resize(32) on the shorter side (40 × 48 → 32 × 38), centre crop 32
    folder = tmp_path / "dtd" / "banded"
    folder.mkdir(parents=True)
    image = random_image(40, 48, seed=8)
    Image.fromarray(image).save(folder / "a.png")
    data = replace(cfg.data, ood_sets=["textures"], ood_roots={"textures": str(tmp_path / "dtd")},
                   ood_subset_size=None)
    capture = _Capture()
    score_split(None, capture, get_split(data, "textures"), replace(cfg, data=data), torch.device("cpu"),
                progress=False)
    resized = pil_resize(image, 32, 38)
    torch.testing.assert_close(capture.batches[0][0].double(),
                               _normalised(resized[:, 3:35], CIFAR_MEAN, CIFAR_STD), rtol=0, atol=1e-5)
