"""Datasets and training loaders.

Small sets are whole uint8 tensors batched on the training device (``DeviceLoader``); the folder
sets (Caltech256, ImageNet) are image files decoded by DataLoader workers (``StreamingLoader``).
"""

from __future__ import annotations

from amata_runner.data.datasets import (
    ImageSet,
    load_cifar10,
    load_digits,
    load_mnist,
    make_synthetic,
)
from amata_runner.data.folders import FOLDER_AUGMENTS, FOLDER_DATASETS, EvalImages, ImageFiles
from amata_runner.data.loader import Batch, CropFlip, DeviceLoader
from amata_runner.data.registry import (
    RunData,
    TestData,
    TrainData,
    check_available,
    eval_batches,
    eval_subset,
    load_run_data,
    load_splits,
    make_train_loader,
    split_validation,
)
from amata_runner.data.streaming import StreamingLoader
from amata_runner.data.validation import ValidationSplit

__all__ = [
    "FOLDER_AUGMENTS",
    "FOLDER_DATASETS",
    "Batch",
    "CropFlip",
    "DeviceLoader",
    "EvalImages",
    "ImageFiles",
    "ImageSet",
    "RunData",
    "StreamingLoader",
    "TestData",
    "TrainData",
    "ValidationSplit",
    "check_available",
    "eval_batches",
    "eval_subset",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_run_data",
    "load_splits",
    "make_synthetic",
    "make_train_loader",
    "split_validation",
]
