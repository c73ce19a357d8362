"""Image datasets as whole uint8 tensors.

Every loader returns the complete split as one uint8 tensor rather than a per-example Dataset: the
sets used here fit in device memory, and keeping them uint8 until a batch is drawn costs a quarter
of the memory of float copies (see ``loader.DeviceLoader``).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

from amata_runner.errors import ConfigError

__all__ = ["ImageSet", "load_cifar10", "load_digits", "load_mnist", "make_synthetic"]


@dataclass
class ImageSet:
    """One split of a dataset, stored compactly so it can live on the training device."""

    images: torch.Tensor  # uint8, (N, C, H, W), contiguous
    labels: torch.Tensor  # int64, (N,)

    def __post_init__(self) -> None:
        # Catching layout mistakes here keeps them from surfacing later as silent garbage batches.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------------------------------
# scikit-learn digits: the embedded default, so a run works with no files and no network.
# --------------------------------------------------------------------------------------------------


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Quantise [0, 1] floats the same way image files are stored, so all datasets look alike."""
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8)


def _split_indices(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation, so the same seed names the same test set on every machine and run."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    num_test = round(n * test_fraction)
    return perm[: n - num_test], perm[n - num_test :]


def load_digits(
    test_fraction: float = 0.2, split_seed: int = 0, image_size: int = 28
) -> tuple[ImageSet, ImageSet]:
    """Real handwritten digits that ship inside scikit-learn, upsampled to a model-friendly size."""
    from sklearn.datasets import load_digits as sk_load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            "dataset.test_fraction", test_fraction, "must be strictly between 0 and 1"
        )
    if image_size < 1:
        raise ConfigError("dataset.image_size", image_size, "must be a positive integer")
    raw = sk_load_digits()
    pixels = torch.from_numpy(np.asarray(raw.images, dtype=np.float32)).unsqueeze(1) / 16.0
    if image_size != pixels.shape[-1]:
        pixels = F.interpolate(
            pixels, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    images = _to_uint8(pixels)
    labels = torch.from_numpy(np.asarray(raw.target, dtype=np.int64))
    train_idx, test_idx = _split_indices(len(labels), test_fraction, split_seed)
    return (
        ImageSet(images[train_idx].contiguous(), labels[train_idx].contiguous()),
        ImageSet(images[test_idx].contiguous(), labels[test_idx].contiguous()),
    )


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST via torchvision.
# --------------------------------------------------------------------------------------------------


def _download_failed(name: str, folder: str, err: BaseException) -> ConfigError:
    """A failed fetch is fixable by hand (copy the files in), so say where they belong."""
    return ConfigError(
        "dataset.download",
        True,
        f"could not fetch {name} into {folder} ({err}); copy the files there",
    )


def _mnist_split(cls: type[MNIST], root: str, train: bool, download: bool) -> ImageSet:
    """Load one split, turning torchvision's generic errors into a one-line config error."""
    name = cls.__name__
    folder = os.path.join(root, name, "raw")
    try:
        ds = cls(root, train=train, download=download)
    except RuntimeError as err:
        if download:
            raise _download_failed(name, folder, err) from err
        raise ConfigError(
            "dataset.root",
            root,
            f"no {name} files under {folder}; set dataset.download=true to fetch them with "
            "torchvision",
        ) from err
    except (AssertionError, TypeError, ValueError, KeyError, OSError) as err:
        # torchvision's IDX reader reports bad headers with asserts and type checks.
        raise ConfigError(
            "dataset.root", root, f"malformed {name} IDX files under {folder}: {err!r}"
        ) from err
    images = ds.data.to(torch.uint8).unsqueeze(1).contiguous()
    labels = ds.targets.to(torch.int64)
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(
            "dataset.root",
            root,
            f"{name} files under {folder} disagree: {images.shape[0]} images, "
            f"{labels.shape[0]} labels",
        )
    return ImageSet(images, labels)


def load_mnist(root: str, download: bool, fashion: bool = False) -> tuple[ImageSet, ImageSet]:
    """MNIST or Fashion-MNIST as (N, 1, 28, 28) uint8, read from torchvision's on-disk layout."""
    cls: type[MNIST] = FashionMNIST if fashion else MNIST
    return (
        _mnist_split(cls, root, train=True, download=download),
        _mnist_split(cls, root, train=False, download=download),
    )


# --------------------------------------------------------------------------------------------------
# CIFAR-10 via torchvision.
# --------------------------------------------------------------------------------------------------


class _CIFAR10(CIFAR10):
    """torchvision's CIFAR-10, but trusting existing files when not downloading.

    The md5 check guards a download against truncation; for files the user placed there it only
    rejects legitimate re-encodings and small test fixtures, so without ``download`` we check that
    the files exist and let unpickling catch real damage. With ``download`` nothing changes.
    """

    def __init__(self, root: str, train: bool, download: bool) -> None:
        if not download:
            # check_integrity(path, None) only tests that the file exists.
            self.train_list = [[name, None] for name, _ in CIFAR10.train_list]
            self.test_list = [[name, None] for name, _ in CIFAR10.test_list]
            self.meta = {**CIFAR10.meta, "md5": None}
        super().__init__(root, train=train, download=download)


def _cifar_file_names() -> list[str]:
    return [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [
        str(CIFAR10.meta["filename"])
    ]


def _cifar_file_problem(path: str) -> str | None:
    """Why one CIFAR pickle cannot be used, so the error can name the culprit file."""
    try:
        with open(path, "rb") as f:
            entry: Any = pickle.load(f, encoding="latin1")
    except Exception as err:
        return f"cannot unpickle ({err!r})"
    if not isinstance(entry, dict):
        return f"expected a dict, got {type(entry).__name__}"
    if os.path.basename(path) == CIFAR10.meta["filename"]:
        return None if CIFAR10.meta["key"] in entry else f"no {CIFAR10.meta['key']!r} key"
    if "data" not in entry or not ("labels" in entry or "fine_labels" in entry):
        return f"needs 'data' and 'labels' keys, has {sorted(map(str, entry))}"
    data = np.asarray(entry["data"])
    labels = entry.get("labels", entry.get("fine_labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        return f"'data' must be uint8 (n, 3072), got {data.dtype} {data.shape}"
    if len(labels) != data.shape[0]:
        return f"{data.shape[0]} images but {len(labels)} labels"
    return None


def _malformed_cifar(root: str, folder: str, err: BaseException) -> ConfigError:
    """Re-read the files one by one to say which one is broken, not just that loading failed."""
    for name in _cifar_file_names():
        path = os.path.join(folder, name)
        problem = _cifar_file_problem(path)
        if problem is not None:
            return ConfigError("dataset.root", root, f"malformed CIFAR-10 file {path}: {problem}")
    return ConfigError("dataset.root", root, f"malformed CIFAR-10 files under {folder}: {err!r}")


def _cifar_split(root: str, train: bool, download: bool) -> ImageSet:
    folder = os.path.join(root, CIFAR10.base_folder)
    try:
        ds = _CIFAR10(root, train=train, download=download)
    except RuntimeError as err:
        if download:
            raise _download_failed("CIFAR-10", folder, err) from err
        raise _malformed_cifar(root, folder, err) from err
    except Exception as err:
        # Unpickling arbitrary bytes can fail with almost any exception type.
        raise _malformed_cifar(root, folder, err) from err
    data = np.asarray(ds.data)
    if data.dtype != np.uint8 or len(ds.targets) != data.shape[0]:
        raise _malformed_cifar(root, folder, ValueError("bad dtype or label count"))
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.int64))


def load_cifar10(root: str, download: bool) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 as (N, 3, 32, 32) uint8 from the python-pickle release torchvision uses."""
    folder = os.path.join(root, CIFAR10.base_folder)
    if not download:
        missing = [n for n in _cifar_file_names() if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise ConfigError(
                "dataset.root",
                root,
                f"no CIFAR-10 files under {folder} (missing {', '.join(missing)}); "
                "set dataset.download=true to fetch them with torchvision",
            )
    return _cifar_split(root, True, download), _cifar_split(root, False, download)


# --------------------------------------------------------------------------------------------------
# Synthetic data for benchmarks and tests.
# --------------------------------------------------------------------------------------------------


def _prototypes(
    num_classes: int, channels: int, image_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Smooth random class patterns: coarse noise upsampled, so small crops and shifts keep the
    class recognisable (as with real images under crop_flip augmentation)."""
    coarse = max(2, image_size // 4)
    base = torch.rand(num_classes, channels, coarse, coarse, generator=generator)
    return F.interpolate(base, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _noisy_examples(
    prototypes: torch.Tensor, n: int, generator: torch.Generator, noise: float
) -> ImageSet:
    num_classes = prototypes.shape[0]
    # Cycle through classes before shuffling so every class appears whenever n >= num_classes.
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    x = prototypes[labels] + noise * torch.randn((n, *prototypes.shape[1:]), generator=generator)
    return ImageSet(_to_uint8(x.clamp_(0.0, 1.0)), labels.to(torch.int64))


def make_synthetic(
    num_train: int,
    num_test: int,
    channels: int,
    image_size: int,
    num_classes: int,
    seed: int = 0,
) -> tuple[ImageSet, ImageSet]:
    """Learnable, reproducible images of any shape, for benchmarks and tests without real data."""
    for key, value in (
        ("dataset.num_train", num_train),
        ("dataset.num_test", num_test),
        ("dataset.channels", channels),
        ("dataset.image_size", image_size),
        ("dataset.num_classes", num_classes),
    ):
        if value < 1:
            raise ConfigError(key, value, "must be a positive integer")
    generator = torch.Generator().manual_seed(seed)
    protos = _prototypes(num_classes, channels, image_size, generator)
    train = _noisy_examples(protos, num_train, generator, noise=0.15)
    test = _noisy_examples(protos, num_test, generator, noise=0.15)
    return train, test
