"""Datasets from local files, the offline digits default, normalisation, augmentation, on-device loading.

Nothing here downloads anything. ``get_dataset(name, data_dir, split)`` is the entry point; every loader
returns an :class:`ImageSet` of ``(N, 3, H, W)`` images and ``int64`` labels.
"""

from .augment import RandomCropFlip, crop_flip, random_crop_flip
from .datasets import (
    CIFAR10_CLASSES,
    CIFAR10C_CORRUPTIONS,
    CIFAR10C_EXTRA_CORRUPTIONS,
    DATASETS,
    ImageSet,
    digits,
    get_dataset,
    load_cifar10,
    load_cifar10c,
    load_cifar100,
    load_svhn,
    load_tiny_imagenet,
)
from .loader import TensorLoader
from .normalize import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_STD_LEGACY,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
)

__all__ = [
    "CIFAR10C_CORRUPTIONS",
    "CIFAR10C_EXTRA_CORRUPTIONS",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_STD_LEGACY",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageSet",
    "Normalize",
    "RandomCropFlip",
    "TensorLoader",
    "crop_flip",
    "digits",
    "get_dataset",
    "load_cifar10",
    "load_cifar10c",
    "load_cifar100",
    "load_svhn",
    "load_tiny_imagenet",
    "random_crop_flip",
]
