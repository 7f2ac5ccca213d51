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
