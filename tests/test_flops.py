"""FLOP counts for ``plan``: the UNet formula against a counted forward, meta-device counts against
real ones, and SD 1.4's per-unit numbers."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ncis_core import assets, flops

SD14 = assets.path("data/sd14_configs")  # shipped with the package (repository: data/sd14_configs)

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8)
# SD 1.x's block structure (3 cross-attention levels, 2 layers per block) at small widths
SD_LIKE_UNET = {**json.loads((SD14 / "unet" / "config.json").read_text()),
                "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 48, "norm_num_groups": 16}


def _counted(model_call):
    """FLOPs of a real CPU call. The math attention backend: the fused CPU kernel is not one of
    the ops FlopCounterMode counts, the math path's matmuls are."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model_call()
    return counter.get_total_flops()


@pytest.mark.parametrize("config", [TINY_UNET, SD_LIKE_UNET], ids=["tiny", "sd-structure"])
@pytest.mark.parametrize("latent", [8, 16])
def test_unet_formula_equals_a_counted_forward(config, latent):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    z = torch.randn(1, 4, latent, latent)
    ctx = torch.randn(1, 77, config["cross_attention_dim"])
    with torch.no_grad():
        counted = _counted(lambda: unet(z, torch.tensor([10]), encoder_hidden_states=ctx))
    assert flops.unet_forward_flops(config, latent) == counted
    assert flops.unet_flops(config, latent)["forward"] == counted  # the meta device counts the same


def test_sd14_per_unit_numbers():
    """METHOD.md / gpu_check's constants: forward 0.80, input-only forward+backward 1.67 TFLOP."""
    unet = json.loads((SD14 / "unet" / "config.json").read_text())
    assert flops.unet_forward_flops(unet, 64) == pytest.approx(0.8033e12, rel=1e-3)
    counted = flops.unet_flops(unet, 64, backward=True)
    assert counted["forward"] == flops.unet_forward_flops(unet, 64)
    assert counted["forward"] + counted["backward"] == pytest.approx(1.669e12, rel=1e-3)


def test_meta_counts_equal_real_counts_for_the_other_models():
    from transformers import CLIPTextConfig, CLIPTextModel

    from ncis_core.models.resnet import build_classifier

    torch.manual_seed(0)
    for arch, width in [("small", 8), ("resnet18", 32)]:
        net = build_classifier(arch, 6, width).eval()
        with torch.no_grad():
            real = _counted(lambda: net(torch.randn(1, 3, 32, 32)))
        assert flops.classifier_flops(arch, 6, 32, width)["forward"] == real
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77)
    model = CLIPTextModel(CLIPTextConfig(**text)).eval()
    with torch.no_grad():
        real = _counted(lambda: model(input_ids=torch.zeros(1, 77, dtype=torch.long)))
    assert flops.text_encoder_flops(text)["forward"] == real
