"""From ``cfg.dataset`` to the train and test splits, and the cheap availability check.

The availability check looks only at file names, so the CLI can refuse a run whose data is missing
(and download is off) before Hydra creates a run directory or any tensor is loaded.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from amata_runner.data.datasets import (
    ImageSet,
    load_cifar10,
    load_digits,
    load_mnist,
    make_synthetic,
)
from amata_runner.errors import ConfigError

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


def load_splits(cfg: DictConfig) -> tuple[ImageSet, ImageSet]:
    """Load (train, test) as uint8 ImageSets for the configured dataset."""
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
    raise ConfigError(
        "dataset.name", name, "allowed: digits, mnist, fashion_mnist, cifar10, synthetic"
    )
