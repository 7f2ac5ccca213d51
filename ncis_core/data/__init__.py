"""The data layer: datasets, class lists, transforms and the named splits of an experiment.

Nothing is imported here: the names below are read from their module on first use.
"""

__all__ = [
    # splits
    "ID_SPLITS", "build_splits", "get_split", "first_per_class", "with_transform",
    # shared types
    "ROLES", "DataError", "ImageDataset", "ArrayDataset", "Subset", "Split",
    "seeded_subset_indices",
    # datasets
    "CIFAR100", "ImageNet100", "ImageFolderFiles", "list_images", "SVHN", "OOD_SETS", "OODSpec",
    "ood_split",
    # class lists
    "CIFAR100_SHORT", "CIFAR100_LONG", "IMAGENET100_WNIDS", "IMAGENET100_NAMES",
    "IMAGENET100_PROMPT_NAMES", "DEMO_ID_CLASSES", "DEMO_NEAR_CLASSES",
    # transforms
    "Compose", "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop",
    "RandomChoiceResize", "ToTensor", "Normalize", "eval_transform", "to_rgb_uint8",
]

_MODULE_OF = {
    "splits": ("ID_SPLITS", "build_splits", "get_split", "first_per_class", "with_transform"),
    "base": ("ROLES", "DataError", "ImageDataset", "ArrayDataset", "Subset", "Split", "seeded_subset_indices"),
    "cifar100": ("CIFAR100",),
    "imagenet": ("ImageNet100",),
    "folders": ("ImageFolderFiles", "list_images"),
    "ood": ("SVHN", "OOD_SETS", "OODSpec", "ood_split"),
    "classes": ("CIFAR100_SHORT", "CIFAR100_LONG", "IMAGENET100_WNIDS", "IMAGENET100_NAMES",
                "IMAGENET100_PROMPT_NAMES", "DEMO_ID_CLASSES", "DEMO_NEAR_CLASSES"),
    "transforms": ("Compose", "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop",
                   "RandomChoiceResize", "ToTensor", "Normalize", "eval_transform", "to_rgb_uint8"),
}


def __getattr__(name: str):
    if name in __all__:
        import importlib

        module = next(m for m, names in _MODULE_OF.items() if name in names)
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
