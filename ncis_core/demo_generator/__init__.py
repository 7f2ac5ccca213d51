"""The demo world's generator: a small Stable-Diffusion-architecture pipeline the kit trains itself.

Without pretrained weights on the demo machines, NCIS's diffusion stages can only run for real on a
generator trained here. It has SD 1.4's parts and mechanics, only smaller: a diffusers
``AutoencoderKL`` (32 × 32 RGB ↔ 4 × 8 × 8 latents), a ``UNet2DConditionModel`` with cross-attention
on a transformers ``CLIPTextModel``, a ``CLIPTokenizer`` built offline, and a PNDM scheduler with
SD's β schedule. It is saved with ``save_pretrained``, so ``StableDiffusionPipeline.from_pretrained``
loads it exactly as it loads SD 1.4.

Training (on the ID training split only) is two phases, each seeded, checkpointed and resumable:

1. the VAE (L1 reconstruction + a small KL term); then its ``scaling_factor`` is *measured* as
   1 / std of the training latents (SD's 0.18215 belongs to SD's VAE, not to this one);
2. the UNet and the text encoder together on the frozen VAE's latents, with the prompts
   ``cfg.prompts`` ("An image of a {class}") and ``cfg.empty_prompt_prob`` empty prompts so that
   classifier-free guidance works; an EMA of both is what gets shipped.

The quality check (:func:`class_consistency`) trains a small classifier on the real ID images plus
the VAE's reconstructions of them and counts how often it names the class a generated image was
prompted with.

Modules: :mod:`~ncis_core.demo_generator.build` (the parts and loading a trained pipeline),
:mod:`~ncis_core.demo_generator.train` (both phases, resumable) and
:mod:`~ncis_core.demo_generator.quality` (the class-consistency check); their public names are
re-exported here. The pipeline assembly and the offline tokenizer live in :mod:`ncis_core.diffusion`.

Example (the trained generator the package ships, ``data/demo/generator``, prompted for one image
of each of two classes in two denoising steps; training one is the skipped line: seconds on the
``smoke`` preset's toy sizes, about 35 minutes of CPU for the shipped one):
    >>> from ncis_core.assets import path
    >>> pipe = load_pipeline(path("data/demo/generator"))
    >>> type(pipe).__name__, pipe.vae.config.latent_channels, pipe.unet.config.sample_size
    ('StableDiffusionPipeline', 4, 8)
    >>> generate_per_class(pipe, ["bear", "cat"], per_class=1, guidance_scale=3.0, steps=2).shape
    (2, 1, 32, 32, 3)
    >>> from ncis_core.config import load_config
    >>> folder = train_generator(load_config("demo"), out="outputs/my-generator")  # doctest: +SKIP
"""

from .build import DEMO_WORDS, build_text_encoder, build_unet, build_vae, count_parameters, load_pipeline
from .quality import (QualityClassifier, accuracy, class_consistency, generate_per_class, reconstruction_rows,
                      train_quality_classifier)
from .train import measure_scaling_factor, train_generator, train_unet, train_vae, training_images

__all__ = [
    "DEMO_WORDS",
    "build_vae",
    "build_text_encoder",
    "build_unet",
    "count_parameters",
    "training_images",
    "train_vae",
    "measure_scaling_factor",
    "train_unet",
    "train_generator",
    "load_pipeline",
    "generate_per_class",
    "QualityClassifier",
    "train_quality_classifier",
    "class_consistency",
    "accuracy",
    "reconstruction_rows",
]
