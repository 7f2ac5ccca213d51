"""The demo world's generator: a small Stable-Diffusion-architecture pipeline the kit trains itself.

:mod:`.build` (the parts, loading), :mod:`.train` (VAE, then UNet + text encoder; resumable) and
:mod:`.quality` (the class-consistency check); public names re-exported here, imported on first use.
"""

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

_MODULE_OF = {"build": ("DEMO_WORDS", "build_vae", "build_text_encoder", "build_unet", "count_parameters",
                        "load_pipeline"),
              "train": ("training_images", "train_vae", "measure_scaling_factor", "train_unet", "train_generator"),
              "quality": ("generate_per_class", "QualityClassifier", "train_quality_classifier",
                          "class_consistency", "accuracy", "reconstruction_rows")}


def __getattr__(name: str):
    if name in __all__:
        import importlib

        module = next(m for m, names in _MODULE_OF.items() if name in names)
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
