"""Stage 5's ``classifier.pretrained`` initialisation (the imagenet100 preset, METHOD.md §5 and
"Matching the original exactly"): Dream-OOD's CE-trained ImageNet-100 ResNet-34 is the kit's
CIFAR-stem network saved under DataParallel (``module.encoder.*``, ``shortcut.*``, ``module.fc.*``),
and the original keeps its ``fc``."""

import logging

import pytest
import torch

from ncis_core.config import load_config
from ncis_core.data.base import DataError
from ncis_core.models.resnet import resnet34
from ncis_core.stages import train_classifier as stage5


def _cfg(path, *overrides):
    return load_config("imagenet100", [f"classifier.pretrained={path}", *overrides])


def _dream_ood_layout(state):
    """A state dict written the way Dream-OOD's ResNet_Model (encoder + fc) under DataParallel saves it."""
    out = {}
    for key, value in state.items():
        key = key.replace("downsample.", "shortcut.")
        out["module." + (key if key.startswith("fc.") else "encoder." + key)] = value
    return out


@pytest.fixture(scope="module")
def source():
    """A CIFAR-stem ResNet-34 for 100 classes whose weights differ from a fresh one's everywhere
    (BN statistics and ``num_batches_tracked`` too)."""
    torch.manual_seed(0)
    net = resnet34(100)
    return {k: (v + torch.rand_like(v.float()).to(v.dtype) + 1) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_dream_ood_checkpoint_loads_every_weight_including_fc(tmp_path, source, wrap):
    theirs = _dream_ood_layout(source)
    path = tmp_path / "in100_ce.pt"
    torch.save(theirs if wrap is None else {wrap: theirs, "epoch": 99}, path)
    model = stage5._init_model(_cfg(path), 100)
    loaded = model.state_dict()
    assert set(loaded) == set(source)
    for key, value in source.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("prefix", ["encoder.", "module.", ""])
def test_other_prefixes_load_too(tmp_path, source, prefix):
    theirs = {(k if k.startswith("fc.") else prefix + k): v for k, v in source.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(theirs, path)
    loaded = stage5._init_model(_cfg(path), 100).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items())


def test_another_class_count_gets_a_fresh_fc_and_says_so(tmp_path, source, caplog):
    path = tmp_path / "in100_ce.pt"
    torch.save(_dream_ood_layout(source), path)
    with caplog.at_level(logging.INFO, logger=stage5.__name__):
        model = stage5._init_model(_cfg(path), 10)
    loaded = model.state_dict()
    assert loaded["fc.weight"].shape == (10, 512)
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert "fc has 100 outputs, the run has 10 classes" in caplog.text


def test_torchvision_imagenet_file_gets_one_clear_line(tmp_path):
    # the keys and shapes of torchvision's resnet34 (7x7 stem, 1000-class fc), no encoder. prefix
    theirs = resnet34(1000, stem="imagenet").state_dict()
    assert theirs["conv1.weight"].shape == (64, 3, 7, 7) and "layer1.0.conv1.weight" in theirs
    path = tmp_path / "resnet34-imagenet.pth"
    torch.save(theirs, path)
    with pytest.raises(DataError) as info:
        stage5._init_model(_cfg(path), 100)
    message = str(info.value)
    assert "\n" not in message
    for part in ["torchvision-layout ImageNet ResNet", "[64, 3, 7, 7]", "1000-class fc",
                 "CIFAR-stem", "Dream-OOD", "ImageNet-100 ResNet-34", "module.encoder.*"]:
        assert part in message, part


def test_torchvision_file_still_initialises_the_imagenet_stem_network(tmp_path):
    theirs = resnet34(1000, stem="imagenet").state_dict()
    path = tmp_path / "resnet34-imagenet.pth"
    torch.save(theirs, path)
    loaded = stage5._init_model(_cfg(path, "classifier.arch=resnet34_imagenet"), 100).state_dict()
    assert torch.equal(loaded["conv1.weight"], theirs["conv1.weight"])
    assert loaded["fc.weight"].shape == (100, 512)


def test_missing_file_names_the_checkpoint_the_original_uses(tmp_path):
    with pytest.raises(FileNotFoundError, match="Dream-OOD's cross-entropy-trained ImageNet-100 ResNet-34"):
        stage5._init_model(_cfg(tmp_path / "absent.pt"), 100)


def test_weights_of_another_network_are_refused_on_one_line(tmp_path, source):
    theirs = {k: v for k, v in _dream_ood_layout(source).items() if "layer4" not in k}
    path = tmp_path / "partial.pt"
    torch.save(theirs, path)
    with pytest.raises(ValueError, match="missing .*layer4") as info:
        stage5._init_model(_cfg(path), 100)
    assert "\n" not in str(info.value)
    resized = _dream_ood_layout(source)
    resized["module.encoder.layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(resized, path)
    with pytest.raises(ValueError, match="does not fit classifier.arch=resnet34") as info:
        stage5._init_model(_cfg(path), 100)
    assert "\n" not in str(info.value)
