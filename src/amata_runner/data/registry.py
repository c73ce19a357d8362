"""From ``cfg.dataset`` to the train and test splits, and the cheap availability check.

The availability check looks only at file names, so the CLI can refuse a run whose data is missing
(and download is off) before Hydra creates a run directory or any tensor is loaded.

Small sets come back as uint8 ``ImageSet``s that live on the device (``DeviceLoader``); the folder
sets (Caltech256, ImageNet) as ``ImageFiles`` for training (``StreamingLoader``) and ``EvalImages``
for testing. ``make_train_loader``, ``eval_subset`` and ``eval_batches`` take either kind, so the
engine need not tell them apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from amata_runner.config.names import DATASETS
from amata_runner.data.datasets import (
    ImageSet,
    load_cifar10,
    load_digits,
    load_mnist,
    make_synthetic,
)
from amata_runner.data.folders import (
    FOLDER_DATASETS,
    EvalImages,
    ImageFiles,
    check_tree,
    hold_out,
    load_folder_splits,
)
from amata_runner.data.loader import DeviceLoader
from amata_runner.data.streaming import StreamingLoader
from amata_runner.data.validation import ValidationSplit
from amata_runner.errors import ConfigError

__all__ = [
    "RunData",
    "TestData",
    "TrainData",
    "check_available",
    "eval_batches",
    "eval_subset",
    "load_run_data",
    "load_splits",
    "make_train_loader",
    "split_validation",
]

TrainData = ImageSet | ImageFiles
TestData = ImageSet | EvalImages


# Files torchvision needs on disk for each downloadable dataset, relative to dataset.root.
_REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "mnist": ("MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-images-idx3-ubyte"),
    "fashion_mnist": (
        "FashionMNIST/raw/train-images-idx3-ubyte",
        "FashionMNIST/raw/t10k-images-idx3-ubyte",
    ),
    "cifar10": ("cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"),
}


def check_available(cfg: DictConfig) -> None:
    """Raise a one-line ConfigError when the dataset is neither on disk nor allowed to download."""
    if cfg.name in FOLDER_DATASETS:
        check_tree(cfg)
        return
    required = _REQUIRED_FILES.get(cfg.name)
    if required is None or cfg.download:
        return
    root = Path(cfg.root)
    missing = [name for name in required if not (root / name).is_file()]
    if missing:
        raise ConfigError(
            "dataset.root",
            str(root),
            f"{cfg.name} not found (no {root / missing[0]}); "
            "set dataset.download=true to fetch it with torchvision, or point dataset.root at it",
        )


def load_splits(cfg: DictConfig) -> tuple[TrainData, TestData]:
    """(train, test): uint8 ImageSets for the small sets; ImageFiles, EvalImages for the folders."""
    name = cfg.name
    if name == "digits":
        return load_digits(cfg.test_fraction, cfg.split_seed, cfg.image_size)
    if name in ("mnist", "fashion_mnist"):
        check_available(cfg)
        return load_mnist(cfg.root, cfg.download, fashion=name == "fashion_mnist")
    if name == "cifar10":
        check_available(cfg)
        return load_cifar10(cfg.root, cfg.download)
    if name == "synthetic":
        return make_synthetic(
            cfg.num_train, cfg.num_test, cfg.channels, cfg.image_size, cfg.num_classes, cfg.seed
        )
    if name in FOLDER_DATASETS:
        return load_folder_splits(cfg)
    raise ConfigError("dataset.name", name, "allowed: " + ", ".join(DATASETS))


@dataclass
class RunData:
    """What a run trains and evaluates on: the training split less the validation images, those
    images (None without a split), the test split, and which images were held out."""

    train: TrainData
    validation: TestData | None
    test: TestData
    split: ValidationSplit


def split_validation(
    train_set: TrainData, test_set: TestData, size: Any, seed: int
) -> tuple[TrainData, TestData | None, ValidationSplit]:
    """Hold ``eval.validation.size`` training images out (see ``data.validation``)."""
    split = ValidationSplit.draw(train_set.labels, size, seed)
    if split.count == 0:
        return train_set, None, split
    held, keep = split.indices, split.train_indices
    if isinstance(train_set, ImageFiles):
        assert isinstance(test_set, EvalImages)
        train, validation = hold_out(train_set, test_set, held, keep)
        return train, validation, split
    kept = ImageSet(train_set.images[keep], train_set.labels[keep])
    return kept, ImageSet(train_set.images[held], train_set.labels[held]), split


def load_run_data(cfg: DictConfig) -> RunData:
    """The splits of a run (``cfg``: the whole run config, for dataset and eval.validation)."""
    train_set, test_set = load_splits(cfg.dataset)
    validation = cfg.eval.validation
    train, held, split = split_validation(
        train_set, test_set, validation.size, int(validation.seed)
    )
    return RunData(train=train, validation=held, test=test_set, split=split)


def make_train_loader(
    train_set: TrainData,
    cfg: DictConfig,
    batch_size: int,
    device: torch.device | str,
    *,
    seed: int,
    rank: int = 0,
    world: int = 1,
) -> DeviceLoader | StreamingLoader:
    """The shuffled training loader for either kind of training split (``cfg``: cfg.dataset).

    ``batch_size`` is the global batch; under torchrun (``world`` > 1) each rank loads its share.
    """
    if isinstance(train_set, ImageFiles):
        if batch_size % world:
            raise ConfigError(
                "batch_size", batch_size, f"the global batch must divide into {world} processes"
            )
        return StreamingLoader(
            train_set,
            batch_size // world,
            device,
            rank=rank,
            world_size=world,
            shuffle=True,
            drop_last=bool(cfg.drop_last),
            seed=seed,
            workers=int(cfg.workers),
            pin_memory=bool(cfg.pin_memory),
            persistent_workers=bool(cfg.persistent_workers),
            prefetch_factor=int(cfg.prefetch_factor),
        )
    return DeviceLoader(
        train_set,
        batch_size,
        device,
        shuffle=True,
        drop_last=False,
        augment=cfg.augment,
        seed=seed,
        rank=rank,
        world=world,
    )


def eval_subset(
    test_set: TestData, indices: Sequence[int] | torch.Tensor, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test examples at ``indices`` as (uint8 images, labels) on ``device``."""
    if isinstance(test_set, EvalImages):
        return test_set.subset(indices, device)
    index = torch.as_tensor(indices, dtype=torch.int64)
    return test_set.images[index].to(device), test_set.labels[index].to(device)


def eval_batches(
    test_set: TestData, batch_size: int, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole test split in order, as (uint8 images, labels) chunks on ``device``."""
    if isinstance(test_set, EvalImages):
        yield from test_set.batches(batch_size, device)
        return
    images, labels = test_set.images.to(device), test_set.labels.to(device)
    for start in range(0, len(labels), batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]
