"""Original single-file Stable Diffusion checkpoints (``sd-v1-4.ckpt``, ``.safetensors``) load
through the kit's real path — ``ncis_core.diffusion.load_pipeline`` → ``_load`` →
``StableDiffusionPipeline.from_single_file(config=<diffusers folder>)`` — offline and weight for
weight.

A real checkpoint is 4 GB and nothing may be downloaded, so the test makes its own:

1. tiny diffusers components with SD 1.x's *block structure*: the configs of
   ``data/sd14_configs`` with only the widths shrunk (block types, layers per block, attention
   layout, 12 text-encoder layers, 77 positions are SD 1.4's), random weights, the kit's offline
   tokenizer and SD's PNDM scheduler;
2. a *config-only* diffusers folder of them (``save_pretrained`` with the weight files deleted), the
   ``diffusion.single_file_config``: whatever weights the loaded pipeline has must come from the
   checkpoint;
3. the components' state dict in the original CompVis layout (``model.diffusion_model.*``,
   ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``), written by a converter
   this module owns (:func:`to_compvis`; diffusers ships only the opposite direction, in
   ``diffusers.loaders.single_file_utils``), as ``.ckpt`` (``{"state_dict": ...}``, read back
   weights-only) and as ``.safetensors``.

The loaded pipeline must reproduce the source components' UNet, VAE (encode mode, decode) and text
encoder outputs, and its weights, converted back, must be exactly the file's tensors, so a key the
loader skipped or mis-mapped cannot pass. The converter's key names depend on the structure only,
which is checked against full SD-1.4-sized models built on the meta device (no memory, no weights).
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from ncis_core import assets
from ncis_core import diffusion as D
from ncis_core.config import DiffusionConfig

SD14 = assets.path("data/sd14_configs")  # shipped with the package (repository: data/sd14_configs)
PROMPT = "an image of a high quality"

# The tiny widths: everything else comes from SD 1.4's configs. The level widths keep SD's ratios
# 1 : 2 : 4 : 4 (UNet 320/640/1280/1280, VAE 128/256/512/512) because they are not pure widths: a
# ResNet gets a ``conv_shortcut`` key exactly where its width changes, so (32, 64, 64, 64) would
# lack two of SD 1.4's UNet keys (the structure test below catches that). 32 channels still divide
# into SD's 32 GroupNorm groups and the UNet's 8 heads, so norm_num_groups stays SD's.
UNET_WIDTHS = dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, sample_size=8)
VAE_WIDTHS = dict(block_out_channels=(32, 64, 128, 128), sample_size=64)
TEXT_WIDTHS = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)

# Keys a real SD-1.x file carries that no diffusers component consumes: LDM's DDPM schedule
# buffers, the EMA bookkeeping scalars and (from transformers 4.x) the CLIP position-id buffer. The
# test writes them too, so the loader must tolerate them; they are the only keys allowed to be left.
EXTRAS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "model_ema.decay", "model_ema.num_updates",
          "cond_stage_model.transformer.text_model.embeddings.position_ids")

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."


# ----------------------------------------------------------------------------- the converter
def _rename(key: str, table: list[tuple[str, str]]) -> tuple[str, str]:
    """``(new prefix, rest)`` for the one entry of ``table`` (diffusers prefix → CompVis prefix)
    whose diffusers prefix starts ``key``. Every prefix ends with a dot, so ``down_blocks.1.`` can
    never capture ``down_blocks.10.``; a key no entry covers is an error, never silently dropped."""
    hits = [(new, key[len(old):]) for old, new in table if key.startswith(old)]
    if len(hits) != 1:
        raise KeyError(f"the CompVis converter has {len(hits)} rules for {key!r}")
    return hits[0]


# ResNet sub-layers inside a UNet block: diffusers name → LDM's ResBlock name.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_to_compvis(state: dict, config) -> dict:
    """A diffusers ``UNet2DConditionModel`` state dict in LDM's ``openaimodel.UNetModel`` names.

    LDM numbers its layers flat: ``input_blocks.0`` is ``conv_in``, then each down level has
    ``layers_per_block`` (ResBlock, SpatialTransformer) pairs and, except the last level, one
    downsampler; ``output_blocks`` has ``layers_per_block + 1`` pairs per up level, the upsampler
    sitting after the last pair (index 1 without attention, 2 with). Only the structure enters
    (layers per block, which blocks have attention): the same rules name SD 1.4's 860 M UNet.
    The SpatialTransformer insides (``proj_in``, ``transformer_blocks.*``) are named alike in both.
    """
    per = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    table = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i, kind in enumerate(down):
        for j in range(per):
            n = 1 + i * (per + 1) + j
            table.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0."))
            if kind.startswith("CrossAttn"):
                table.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1."))
        if i < len(down) - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv.",
                          f"input_blocks.{(i + 1) * (per + 1)}.0.op."))
    for i, kind in enumerate(up):
        attention = kind.startswith("CrossAttn")
        for j in range(per + 1):
            n = i * (per + 1) + j
            table.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0."))
            if attention:
                table.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1."))
        if i < len(up) - 1:
            table.append((f"up_blocks.{i}.upsamplers.0.",
                          f"output_blocks.{i * (per + 1) + per}.{2 if attention else 1}."))
    out = {}
    for key, value in state.items():
        prefix, rest = _rename(key, table)
        if ".resnets." in key:
            layer, _, tail = rest.partition(".")
            rest = f"{_UNET_RESNET[layer]}.{tail}"
        out[UNET_PREFIX + prefix + rest] = value
    return out


# VAE attention (diffusers ``Attention``) → LDM's ``AttnBlock``, whose q/k/v/proj_out are 1×1 convs.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_compvis(state: dict, config) -> dict:
    """A diffusers ``AutoencoderKL`` state dict in LDM's ``autoencoder.AutoencoderKL`` names.

    LDM's decoder numbers its levels from the bottom (``up.3`` is diffusers' ``up_blocks.0``), its
    mid blocks are ``block_1``/``attn_1``/``block_2``, and its attention projections are 1×1
    convolutions (``[C, C, 1, 1]``), which diffusers stores as linear ``[C, C]`` weights.
    """
    n, per = len(config["down_block_types"]), config["layers_per_block"]
    table = [(k, k) for k in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.",
                              "decoder.conv_out.", "quant_conv.", "post_quant_conv.")]
    table += [("encoder.conv_norm_out.", "encoder.norm_out."),
              ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for i in range(n):
        table += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
                  for j in range(per)]
        table += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.")
                  for j in range(per + 1)]
        if i < n - 1:
            table.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            table.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        table += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
        table.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    out = {}
    for key, value in state.items():
        prefix, rest = _rename(key, table)
        if ".attentions." in key:
            layer, param = rest.rsplit(".", 1)
            rest = f"{_VAE_ATTENTION[layer]}.{param}"
            if param == "weight" and layer != "group_norm":
                value = value[:, :, None, None]  # linear → 1×1 conv, as LDM saved it
        rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        out[VAE_PREFIX + prefix + rest] = value
    return out


def text_to_compvis(state: dict) -> dict:
    """A transformers ``CLIPTextModel`` state dict in LDM's ``FrozenCLIPEmbedder`` names: the
    ``CLIPTextModel`` sits at ``cond_stage_model.transformer``. transformers ≥ 5.6 flattened the
    model (no ``text_model.`` level in its keys); the checkpoint keeps the level, as SD 1.4's has."""
    return {TEXT_PREFIX + k.removeprefix("text_model."): v for k, v in state.items()}


def to_compvis(unet, vae, text_encoder) -> dict:
    """The three models' weights as one CompVis-layout state dict (no extras)."""
    return {**unet_to_compvis(unet.state_dict(), unet.config), **vae_to_compvis(vae.state_dict(), vae.config),
            **text_to_compvis(text_encoder.state_dict())}


# ----------------------------------------------------------------------------- fixtures
def _sd14(component: str, file: str = "config.json") -> dict:
    config = json.loads((SD14 / component / file).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _models(tokenizer=None, device=None):
    """UNet, VAE and text encoder with SD 1.4's structure: the tiny widths with a tokenizer, the
    full SD 1.4 sizes without one (build those on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = _sd14("unet"), _sd14("vae"), _sd14("text_encoder")
    if tokenizer is not None:
        unet_cfg.update(UNET_WIDTHS)
        vae_cfg.update(VAE_WIDTHS)
        text_cfg.update(TEXT_WIDTHS, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device(device or "cpu"):
        return (UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg),
                CLIPTextModel(CLIPTextConfig(**text_cfg)))


def _extras(text_encoder) -> dict:
    """The unconsumed keys of :data:`EXTRAS`, with values like a real SD-1.x file's."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64).square().float()
    alphas = torch.cumprod(1 - betas, 0)
    positions = torch.arange(text_encoder.config.max_position_embeddings)[None]
    return dict(zip(EXTRAS, (betas, alphas, torch.cat([torch.ones(1), alphas[:-1]]), torch.tensor(0.9999),
                             torch.tensor(0, dtype=torch.int32), positions)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny source components, their config-only diffusers folder and the checkpoint files."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from ncis_core.diffusion import build_tokenizer

    tokenizer = build_tokenizer(D.PROMPT_WORDS)  # the kit's offline tokenizer (as build_tiny_pipeline)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, vae, text_encoder = _models(tokenizer)
        with torch.no_grad():
            # Default inits leave GroupNorm/LayerNorm at 1/0 and the VAE's attention biases at 0:
            # shift every tensor, so a weight the loader missed (kept at its init) shows as a mismatch.
            for module in (unet, vae, text_encoder):
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
    for module in (unet, vae, text_encoder):
        module.eval()
    scheduler = PNDMScheduler.from_config(_sd14("scheduler", "scheduler_config.json"))

    root = tmp_path_factory.mktemp("single-file")
    folder = root / "sd14-tiny-configs"
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(folder))
    # Configs and tokenizer only, like a snapshot's config files: loaded weights can only come from
    # the checkpoint under test.
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    assert (folder / "model_index.json").exists() and any((folder / "tokenizer").iterdir())

    state = {**to_compvis(unet, vae, text_encoder), **_extras(text_encoder)}
    # Contiguous copies: the VAE's unsqueezed views would share memory with the models (and
    # safetensors refuses non-contiguous or aliased tensors).
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    ckpt, safetensors_file = root / "sd-tiny.ckpt", root / "sd-tiny.safetensors"
    # What LDM saved, minus pytorch-lightning's pickled objects (see the weights-only test below).
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, ckpt)
    from safetensors.torch import save_file
    save_file(state, str(safetensors_file))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                folder=folder, state=state, files={".ckpt": ckpt, ".safetensors": safetensors_file})


@pytest.fixture(autouse=True)
def offline_and_uncached(monkeypatch):
    """Offline (the kit passes local_files_only when HF_HUB_OFFLINE is set) and a fresh pipeline
    cache per test, so each load really reads its file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    D.clear_pipeline_cache()
    yield
    D.clear_pipeline_cache()


def _load_file(source, suffix: str, pipeline=None):
    """The kit's real path: ``load_pipeline`` of a single-file ``diffusion.pipeline``."""
    return D.load_pipeline(DiffusionConfig(pipeline=str(pipeline or source["files"][suffix]),
                                           single_file_config=str(source["folder"]), dtype="float32"), "cpu")


# ----------------------------------------------------------------------------- tests
def test_converter_names_depend_on_the_structure_not_the_widths(source):
    """The tiny models have exactly the key names of SD-1.4-sized ones (built on the meta device),
    so the converter, which sees names and structure only, gives SD 1.4's CompVis names; diffusers
    recognises the result as an SD v1 checkpoint."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    full = _models(device="meta")
    tiny = (source["unet"], source["vae"], source["text_encoder"])
    for big, small in zip(full, tiny):
        assert list(big.state_dict()) == list(small.state_dict()), type(small).__name__
    # SD 1.4 itself: LDM prints "DiffusionWrapper has 859.52 M params" for it; the key counts
    # (686 UNet, 248 VAE, 196 CLIP tensors, without the position-id buffer) pin the converter's
    # output for SD-1.4 shapes, so a rule that starts to drop or merge keys shows here by number.
    assert round(sum(p.numel() for p in full[0].parameters()) / 1e6, 2) == 859.52
    names = to_compvis(*full)
    assert len(names) == sum(len(m.state_dict()) for m in full)  # a bijection: no two keys collide
    counts = {p: sum(k.startswith(p) for k in names) for p in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)}
    assert counts == {UNET_PREFIX: 686, VAE_PREFIX: 248, TEXT_PREFIX: 196}
    shapes = {k: tuple(v.shape) for k, v in names.items()}
    # Landmarks of the published layout (and the keys diffusers detects an SD-1 file by).
    assert shapes[CHECKPOINT_KEY_NAMES["v1"]] == (320, 640, 1, 1)  # last up ResNet: 320 + 320 skip in
    assert shapes[CHECKPOINT_KEY_NAMES["clip"]] == (77, 768)
    assert shapes[UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes["model.diffusion_model.input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.output_blocks.8.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["first_stage_model.decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias"] == (768,)
    assert infer_diffusers_model_type(source["state"]) == "v1"


def test_diffusers_own_converters_invert_ours_key_for_key(source):
    """diffusers' LDM → diffusers conversion (what from_single_file runs) maps the file back onto
    every original key, each to its own tensor: nothing of the file is dropped or doubled."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    state = source["state"]
    back = {"unet": convert_ldm_unet_checkpoint(state, dict(source["unet"].config)),
            "vae": convert_ldm_vae_checkpoint(state, dict(source["vae"].config)),
            "text_encoder": {k.removeprefix("text_model."): v
                             for k, v in convert_ldm_clip_checkpoint(state).items()}}
    for name, converted in back.items():
        original = source[name].state_dict()
        extra = set(converted) - set(original)
        assert extra <= {"embeddings.position_ids"}, (name, sorted(extra)[:5])  # the CLIP buffer of EXTRAS
        assert set(original) <= set(converted), (name, sorted(set(original) - set(converted))[:5])
        for key, value in original.items():
            assert torch.equal(converted[key].reshape(value.shape), value), (name, key)
    # Every key of the file is a weight of one component or one of the named extras.
    assert len(state) == sum(len(source[n].state_dict()) for n in back) + len(EXTRAS)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_single_file_loads_through_the_kit_weight_for_weight(source, suffix):
    pipe = _load_file(source, suffix)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None
    assert type(pipe.scheduler) is type(source["scheduler"])
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.scheduler.config) == public(source["scheduler"].config)
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert not any(p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())

    # Every tensor of the file was consumed: the loaded weights, converted back, are exactly the
    # file's keys (less the extras no component has) with exactly its values. A weight the loader
    # skipped would keep a random or meta init; one it mis-mapped would sit under another key.
    loaded = to_compvis(pipe.unet, pipe.vae, pipe.text_encoder)
    written = {k: v for k, v in source["state"].items() if k not in EXTRAS}
    assert sorted(loaded) == sorted(written)
    mismatched = [k for k, v in loaded.items() if not torch.equal(v, written[k])]
    assert not mismatched, mismatched[:5]

    # ... and the models compute what the source components compute.
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([1, 981])
    context = torch.randn(2, 77, 32, generator=gen)
    images = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    ids = D.tokenize(pipe.tokenizer, [PROMPT])
    assert torch.equal(ids, D.tokenize(source["tokenizer"], [PROMPT]))
    assert pipe.tokenizer.tokenize(PROMPT) == [w + "</w>" for w in PROMPT.split()]

    def outputs(unet, vae, text_encoder):
        with torch.no_grad():
            z = vae.encode(images).latent_dist.mode()
            return {"unet": unet(latents, timesteps, context).sample, "vae_mode": z,
                    "vae_decode": vae.decode(z).sample, "text": text_encoder(ids).last_hidden_state}

    got = outputs(pipe.unet, pipe.vae, pipe.text_encoder)
    want = outputs(source["unet"], source["vae"], source["text_encoder"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


class _Executed(Exception):
    pass


def _would_run_code():
    raise _Executed("the checkpoint's pickle ran code")


class _NotAWeight:
    """Pickles to a call of :func:`_would_run_code`: what a malicious ``.ckpt`` can carry, and the
    shape of pytorch-lightning's pickled ``ModelCheckpoint`` callbacks in real LDM files."""

    def __reduce__(self):
        return (_would_run_code, ())


def test_ckpt_is_read_weights_only(source, tmp_path):
    """The ``.ckpt`` is unpickled weights-only (diffusers' ``load_state_dict`` passes
    ``weights_only=True``): the test's file loads that way by itself, and one holding an object
    outside the weights-only allow-list is refused unexecuted, with the kit's error. The flip side:
    an LDM file that still carries pytorch-lightning callbacks is refused the same way, and the
    kit's message says to convert it to ``.safetensors``."""
    saved = torch.load(source["files"][".ckpt"], weights_only=True)
    assert set(saved) == {"state_dict", "global_step", "epoch"}
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": source["state"], "callbacks": {"checkpoint": _NotAWeight()}}, evil)
    with pytest.raises(D.PipelineLoadError, match=r"holds pickled objects besides tensors.*\.safetensors") as err:
        _load_file(source, ".ckpt", pipeline=evil)
    chain, exc = [], err.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert not any(isinstance(e, _Executed) for e in chain)
    # Refused for the right reason: the weights-only unpickler rejected the global. (diffusers
    # re-raises it as a bare "Unable to load weights" OSError, so it only shows down the chain.)
    assert any(isinstance(e, pickle.UnpicklingError) and "_would_run_code" in str(e) for e in chain)
