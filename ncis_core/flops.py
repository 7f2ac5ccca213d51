"""FLOP counts of the models the stages run, for ``plan`` (one multiply-add = 2 FLOP).

:func:`count_flops` counts a model on the meta device (``FlopCounterMode``); :func:`unet_forward_flops`
is the UNet forward's count as a formula over its config, which checks it.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

__all__ = ["count_flops", "unet_forward_flops", "unet_flops", "vae_flops", "text_encoder_flops",
           "classifier_flops"]


def count_flops(build: Callable[[], torch.nn.Module], inputs: Callable[[], tuple], *,
                backward: bool = False, call: Callable | None = None,
                trainable: Callable[[torch.nn.Module], object] | None = None) -> dict[str, int]:
    """FLOPs of one call of a model built on the meta device.

    Args:
        build, inputs: make the module and its positional inputs (called on the meta device).
        backward: also count a backward pass from the output's sum.
        call: ``call(module, *inputs) -> tensor`` when the output needs unpacking.
        trainable: picks the parameter(s) that get a gradient; every other weight is frozen.

    Returns:
        ``{"forward", "backward", "conv", "matmul"}`` (the last two split the total).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = build().eval().requires_grad_(False)
        if trainable is not None:
            chosen = trainable(module)
            for p in chosen if isinstance(chosen, (list, tuple)) else [chosen]:
                p.requires_grad_(True)
        args = inputs()
    call = call or (lambda m, *a: m(*a))
    with FlopCounterMode(display=False) as counter:
        out = call(module, *args)
        forward = _by_kind(counter)
        if backward:
            out.float().sum().backward()
    total = _by_kind(counter)
    backward_kinds = {k: total[k] - forward[k] for k in total}
    return {"forward": sum(forward.values()), "backward": sum(backward_kinds.values()),
            "conv": total["conv"], "matmul": total["matmul"]}


def _by_kind(counter) -> dict[str, int]:
    """Counted FLOPs split into convolutions and matrix products (fp32 GPU rates differ)."""
    kinds = {"conv": 0, "matmul": 0}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        kinds["conv" if "convolution" in str(op) else "matmul"] += int(flops)
    return kinds


def _unet(config: Mapping):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(dict(config))


def unet_flops(config: Mapping, latent: int, tokens: int = 77, backward: bool = False) -> dict[str, int]:
    """One UNet call at ``latent × latent``, batch 1; ``backward``: stage 1's input-only backward."""
    width = config.get("cross_attention_dim", 768)

    def inputs():
        ctx = torch.zeros(1, tokens, width, requires_grad=backward)
        return torch.zeros(1, config.get("in_channels", 4), latent, latent), torch.tensor([500]), ctx

    return count_flops(lambda: _unet(config), inputs, backward=backward,
                       call=lambda m, z, t, ctx: m(z, t, encoder_hidden_states=ctx).sample)


def vae_flops(config: Mapping, image: int) -> dict[str, int]:
    """The VAE on one ``image × image`` picture: ``{"encode": …, "decode": …}`` (meta device)."""
    from diffusers import AutoencoderKL

    factor = 2 ** (len(config["block_out_channels"]) - 1)
    latent = image // factor
    enc = count_flops(lambda: AutoencoderKL.from_config(dict(config)),
                      lambda: (torch.zeros(1, config.get("in_channels", 3), image, image),),
                      call=lambda m, x: m.encode(x).latent_dist.mode())
    dec = count_flops(lambda: AutoencoderKL.from_config(dict(config)),
                      lambda: (torch.zeros(1, config.get("latent_channels", 4), latent, latent),),
                      call=lambda m, z: m.decode(z).sample)
    return {"encode": enc, "decode": dec}


def text_encoder_flops(config: Mapping, tokens: int = 77, backward: bool = False) -> dict[str, int]:
    """The CLIP text encoder on one prompt; ``backward``: down to the input embeddings (stage 1)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    return count_flops(lambda: CLIPTextModel(cfg), lambda: (torch.zeros(1, tokens, dtype=torch.long),),
                       backward=backward, call=lambda m, ids: m(input_ids=ids).last_hidden_state,
                       trainable=(lambda m: m.get_input_embeddings().weight) if backward else None)


def classifier_flops(arch: str, num_classes: int, image: int, width: int = 32,
                     training: bool = False) -> dict[str, int]:
    """One stage-5 network call on one picture; ``training``: forward + backward with weight gradients."""
    from .models.resnet import build_classifier

    return count_flops(lambda: build_classifier(arch, num_classes, width),
                       lambda: (torch.zeros(1, 3, image, image),), backward=training,
                       trainable=(lambda m: list(m.parameters())) if training else None)


# ----------------------------------------------------------------------------- the UNet as a formula
def _conv(hw: int, cin: int, cout: int, k: int = 3) -> int:
    return 2 * hw * cin * cout * k * k


def _linear(n: int, din: int, dout: int) -> int:
    return 2 * n * din * dout


def _resnet(hw: int, cin: int, cout: int, temb: int) -> int:
    """diffusers' ``ResnetBlock2D``: two 3 × 3 convs, time projection, a 1 × 1 shortcut if needed."""
    flops = _conv(hw, cin, cout) + _conv(hw, cout, cout) + _linear(1, temb, cout)
    return flops + (_conv(hw, cin, cout, 1) if cin != cout else 0)


def _transformer(hw: int, c: int, tokens: int, ctx: int) -> int:
    """``Transformer2DModel``, one block: proj in/out, self-, cross-attention, GEGLU feed-forward (4c)."""
    self_attn = 4 * _linear(hw, c, c) + 2 * (2 * hw * hw * c)           # q k v out, QKᵀ and PV
    cross = 2 * _linear(hw, c, c) + 2 * _linear(tokens, ctx, c) + 2 * (2 * hw * tokens * c)
    ff = _linear(hw, c, 8 * c) + _linear(hw, 4 * c, c)
    return 2 * _linear(hw, c, c) + self_attn + cross + ff


def unet_forward_flops(config: Mapping, latent: int, tokens: int = 77) -> int:
    """FLOPs of one SD-1.x ``UNet2DConditionModel`` forward at ``latent × latent``, batch 1, by formula."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    ctx = config.get("cross_attention_dim", 768)
    temb = 4 * channels[0]
    flops = _linear(1, channels[0], temb) + _linear(1, temb, temb)      # the time embedding
    side = latent
    flops += _conv(side * side, config.get("in_channels", 4), channels[0])
    skips = [channels[0]]
    out = channels[0]
    for i, kind in enumerate(config["down_block_types"]):
        cin, out = out, channels[i]
        for j in range(layers):
            flops += _resnet(side * side, cin if j == 0 else out, out, temb)
            if kind.startswith("CrossAttn"):
                flops += _transformer(side * side, out, tokens, ctx)
            skips.append(out)
        if i < len(channels) - 1:
            side //= 2
            flops += _conv(side * side, out, out)                      # stride-2 downsampler
            skips.append(out)
    c = channels[-1]                                                   # mid block at the bottom
    flops += 2 * _resnet(side * side, c, c, temb) + _transformer(side * side, c, tokens, ctx)
    reversed_channels = channels[::-1]
    out = reversed_channels[0]
    for i, kind in enumerate(config["up_block_types"]):
        prev, out = out, reversed_channels[i]
        for j in range(layers + 1):
            skip = skips.pop()
            flops += _resnet(side * side, (prev if j == 0 else out) + skip, out, temb)
            if kind.startswith("CrossAttn"):
                flops += _transformer(side * side, out, tokens, ctx)
        if i < len(channels) - 1:
            side *= 2
            flops += _conv(side * side, out, out)                      # upsampler conv at 2×
    return flops + _conv(side * side, channels[0], config.get("out_channels", 4))
