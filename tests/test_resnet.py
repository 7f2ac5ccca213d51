"""Classifier networks and the energy head (stage 5's models)."""

import pytest
import torch

from ncis_core.models.resnet import (EnergyHead, build_classifier, remap_ood_checkpoint,
                                     resnet18, resnet34)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_torchvision_and_the_cifar_variant():
    # torchvision's published counts: resnet34 21,797,672 and resnet18 11,689,512 (1000 classes)
    assert _count(resnet34(1000, stem="imagenet")) == 21_797_672
    assert _count(resnet18(1000, stem="imagenet")) == 11_689_512
    # CIFAR stem (3x3 conv instead of 7x7) and a 100-way fc
    assert _count(resnet34(100)) == 21_797_672 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64 - 513_000 + 51_300


@pytest.mark.parametrize("arch, size, classes", [("resnet34", 32, 100), ("resnet18", 32, 10),
                                                 ("small", 32, 6), ("resnet34_imagenet", 64, 100)])
def test_output_and_feature_shapes(arch, size, classes):
    net = build_classifier(arch, classes).eval()
    logits, feats = net(torch.randn(2, 3, size, size), return_features=True)
    assert logits.shape == (2, classes) and feats.shape == (2, net.feature_dim)
    assert torch.allclose(net.fc(feats), logits)


def test_unknown_arch_lists_the_valid_ones():
    with pytest.raises(ValueError, match="resnet34, resnet18"):
        build_classifier("vgg", 10)


def test_cifar_stem_keeps_32x32_resolution_into_layer1():
    net = resnet18(10)
    x = net.maxpool(net.bn1(net.conv1(torch.zeros(1, 3, 32, 32))))
    assert x.shape[-1] == 32


def test_torchvision_layout_keys():
    keys = set(resnet34(1000, stem="imagenet").state_dict())
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.running_var", "layer4.2.bn2.weight", "fc.weight", "fc.bias"]:
        assert key in keys


def test_ood_checkpoint_layout_loads_after_remapping():
    net = resnet34(100)
    ours = net.state_dict()
    theirs = {}
    for key, value in ours.items():  # write a checkpoint the way the OOD literature lays it out
        k = key.replace("downsample.", "shortcut.")
        theirs["module." + (k if k.startswith("fc.") else "encoder." + k)] = value.clone() + 1
    other = resnet34(100)
    other.load_state_dict(remap_ood_checkpoint(theirs))
    for key, value in other.state_dict().items():
        assert torch.equal(value, ours[key] + 1), key


@pytest.mark.parametrize("kind, hidden", [("linear", 0), ("linear", 16), ("monotone", 0), ("monotone", 16)])
def test_energy_head_shapes_gradients_and_loss(kind, hidden):
    torch.manual_seed(0)
    head = EnergyHead(kind, hidden)
    s = torch.randn(8, requires_grad=True)
    out = head(s)
    assert out.shape == (8, 2)
    # the binary CE over the two logits is the logistic loss of the margin (ID = 1)
    b = torch.tensor([1, 0] * 4)
    ce = torch.nn.functional.cross_entropy(out, b)
    direct = torch.nn.functional.binary_cross_entropy_with_logits(head.margin(s), b.float())
    assert torch.allclose(ce, direct, atol=1e-6)
    ce.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("hidden", [0, 16])
def test_monotone_head_is_non_decreasing_even_after_adversarial_training(hidden):
    torch.manual_seed(0)
    head = EnergyHead("monotone", hidden)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    s = torch.randn(64)
    labels = (s < 0).long()  # ID has LOWER scores: a free head would learn a negative slope
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(s), labels).backward()
        opt.step()
    grid = torch.linspace(-5, 5, 101)
    assert (head.margin(grid).diff() >= -1e-6).all()
    assert head.slope() >= 0


def test_linear_head_slope_can_go_negative_and_is_reported():
    torch.manual_seed(0)
    head = EnergyHead("linear")
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    s = torch.randn(64)
    labels = (s < 0).long()
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(s), labels).backward()
        opt.step()
    w = head.net.weight[:, 0]
    assert torch.isclose(head.slope(), w[1] - w[0]) and head.slope() < 0
