"""FLOP counts of the models the stages run, for ``plan``'s cost projection (nothing is computed).

Two ways to the same numbers:

* :func:`count_flops` builds a model **on the meta device** (shapes only: no memory, no arithmetic)
  and runs it under ``torch.utils.flop_counter.FlopCounterMode``: exact for any config the stages
  can load, forward and backward alike, in about a second for SD 1.4's UNet. ``plan`` uses these.
* :func:`unet_forward_flops` is the same count for a ``UNet2DConditionModel`` forward written out as
  a formula over its config (convolutions, linear layers and the two attention matmuls; norms and
  activations are not matmuls and are not counted, as ``FlopCounterMode`` does not count them).
  It says where the work is and checks the counter (``tests/test_flops.py``).

Convention: one multiply-add = 2 FLOP. Per-unit numbers at SD-1.4 shapes (64 × 64 latents, 77
tokens, batch 1), counted here: UNet forward 0.803 TFLOP; forward + backward with frozen weights
(gradients for the inputs only, as stage 1 needs) 1.669 TFLOP, against 2.41 with weight gradients.

Example:
    >>> unet = {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    ...         "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
    ...         "in_channels": 4, "out_channels": 4, "cross_attention_dim": 32}
    >>> unet_forward_flops(unet, latent=8, tokens=77) > 0
    True
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
        build: makes the module (called under ``torch.device("meta")``).
        inputs: makes the positional inputs (under the meta device too).
        backward: also count a backward pass from the output's sum (frozen weights: only inputs
            that require grad get gradients).
        call: ``call(module, *inputs) -> tensor`` when the output needs unpacking.
        trainable: picks the parameter(s) that get a gradient (e.g. the token-embedding table that
            carries stage 1's rows, or all of a classifier's); every other weight is frozen.

    Returns:
        ``{"forward", "backward", "conv", "matmul"}``: forward and backward FLOPs (backward 0
        unless asked for), and the total of both split into convolutions and matrix products.
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
    """Counted FLOPs split into convolutions and matrix products: on a GPU in fp32 they run at
    different rates (cuDNN convolutions in TF32 by default, matmuls in full fp32)."""
    kinds = {"conv": 0, "matmul": 0}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        kinds["conv" if "convolution" in str(op) else "matmul"] += int(flops)
    return kinds


def _unet(config: Mapping):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(dict(config))


def unet_flops(config: Mapping, latent: int, tokens: int = 77, backward: bool = False) -> dict[str, int]:
    """One UNet call at ``latent × latent``, batch 1, counted on the meta device; with ``backward``
    the input-only backward of stage 1 (gradients reach the prompt context, not the weights)."""
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
    """The CLIP text encoder on one prompt of ``tokens`` tokens (meta device); with ``backward``
    the gradient reaching the input embeddings (stage 1's rows)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    return count_flops(lambda: CLIPTextModel(cfg), lambda: (torch.zeros(1, tokens, dtype=torch.long),),
                       backward=backward, call=lambda m, ids: m(input_ids=ids).last_hidden_state,
                       trainable=(lambda m: m.get_input_embeddings().weight) if backward else None)


def classifier_flops(arch: str, num_classes: int, image: int, width: int = 32,
                     training: bool = False) -> dict[str, int]:
    """One stage-5 network call on one ``image × image`` picture (meta device); ``training``:
    forward + backward with weight gradients (a training step's share per image)."""
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
    """diffusers' ``ResnetBlock2D``: two 3 × 3 convs, the time-embedding projection, a 1 × 1
    shortcut when the width changes."""
    flops = _conv(hw, cin, cout) + _conv(hw, cout, cout) + _linear(1, temb, cout)
    return flops + (_conv(hw, cin, cout, 1) if cin != cout else 0)


def _transformer(hw: int, c: int, tokens: int, ctx: int) -> int:
    """``Transformer2DModel`` with one ``BasicTransformerBlock``: proj in/out, self-attention,
    cross-attention over the prompt, GEGLU feed-forward (inner width 4c)."""
    self_attn = 4 * _linear(hw, c, c) + 2 * (2 * hw * hw * c)           # q k v out, QKᵀ and PV
    cross = 2 * _linear(hw, c, c) + 2 * _linear(tokens, ctx, c) + 2 * (2 * hw * tokens * c)
    ff = _linear(hw, c, 8 * c) + _linear(hw, 4 * c, c)
    return 2 * _linear(hw, c, c) + self_attn + cross + ff


def unet_forward_flops(config: Mapping, latent: int, tokens: int = 77) -> int:
    """The FLOPs of one ``UNet2DConditionModel`` forward at ``latent × latent``, batch 1, from its
    config (the block bookkeeping of diffusers' ``get_down_block`` / ``get_up_block``; SD-1.x
    blocks: ``(CrossAttn)DownBlock2D``, ``(CrossAttn)UpBlock2D``, one transformer layer each)."""
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
