"""The demo generator's parts: SD 1.4's architecture, smaller, shaped by the ``generator`` config.

    >>> from ncis_core.config import load_config
    >>> gcfg = load_config("smoke").generator
    >>> vae, unet = build_vae(gcfg), build_unet(gcfg)
    >>> count_parameters(vae), count_parameters(unet), count_parameters(vae, unet)
    (62463, 437028, 499491)
    >>> vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape
    torch.Size([1, 4, 8, 8])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data.classes import DEMO_ID_CLASSES, DEMO_NEAR_CLASSES

if TYPE_CHECKING:
    from ..config import GeneratorConfig

__all__ = ["DEMO_WORDS", "build_vae", "build_text_encoder", "build_unet", "count_parameters", "load_pipeline"]

#: Words the tokenizer keeps whole: every demo class (ID and near-OOD) and the prompts' words.
DEMO_WORDS: tuple[str, ...] = tuple(DEMO_ID_CLASSES) + tuple(DEMO_NEAR_CLASSES) + (
    "an", "image", "of", "a", "the", "high", "quality")


def build_vae(gcfg: "GeneratorConfig"):
    """The ``AutoencoderKL``: ``len(vae_channels)`` levels, so 32 px → 32 / 2^(levels-1) latents."""
    from diffusers import AutoencoderKL

    levels = len(gcfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=gcfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(gcfg.vae_channels), layers_per_block=gcfg.vae_layers_per_block,
        norm_num_groups=gcfg.norm_groups, sample_size=gcfg.image_size)


def build_text_encoder(gcfg: "GeneratorConfig", tokenizer):
    """A ``CLIPTextModel`` over the tokenizer's vocabulary (width ``text_width``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=gcfg.text_width, intermediate_size=4 * gcfg.text_width,
        num_hidden_layers=gcfg.text_layers, num_attention_heads=gcfg.text_heads,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=gcfg.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu")
    return CLIPTextModel(config)


def build_unet(gcfg: "GeneratorConfig"):
    """The ``UNet2DConditionModel``: cross-attention on every level, like SD's but smaller."""
    from diffusers import UNet2DConditionModel

    levels = len(gcfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=gcfg.image_size // 2 ** (len(gcfg.vae_channels) - 1),
        in_channels=gcfg.latent_channels, out_channels=gcfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=tuple(gcfg.unet_channels), layers_per_block=gcfg.unet_layers_per_block,
        cross_attention_dim=gcfg.text_width, attention_head_dim=gcfg.attention_head_dim,
        norm_num_groups=gcfg.norm_groups)


def count_parameters(*modules: nn.Module) -> int:
    """Total number of parameters of ``modules``."""
    return sum(p.numel() for m in modules for p in m.parameters())


def load_pipeline(folder: str | Path, device: str | torch.device = "cpu", progress: bool = False):
    """``StableDiffusionPipeline.from_pretrained(folder)`` in float32 on ``device``, offline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32,
                                                   local_files_only=True)
    if not progress:  # otherwise leave tqdm's own default, so TQDM_DISABLE=1 still silences it
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
