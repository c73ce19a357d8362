"""Datasets as whole uint8 tensors, and a loader that batches them on the training device."""

from __future__ import annotations

from amata_runner.data.datasets import (
    ImageSet,
    load_cifar10,
    load_digits,
    load_mnist,
    make_synthetic,
)
from amata_runner.data.loader import Batch, CropFlip, DeviceLoader
from amata_runner.data.registry import check_available, load_splits

__all__ = [
    "Batch",
    "CropFlip",
    "DeviceLoader",
    "ImageSet",
    "check_available",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_splits",
    "make_synthetic",
]
