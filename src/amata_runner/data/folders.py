"""Caltech256 and ImageNet: folders of image files, decoded per batch by DataLoader workers.

These sets are far too large to keep on the device as uint8 (ImageNet's 1.28M training images are
~190 GB at 224x224), so unlike the small sets they stay on disk and are decoded as batches are
drawn. Workers hand back uint8 tensors: a quarter of the bytes of floats through shared memory and
the pinned host buffer; the division by 255 runs on the device (``streaming.StreamingLoader``).

Layouts:

- ``caltech256``: torchvision's, ``<root>/caltech256/256_ObjectCategories/<NNN.name>/*.jpg``; class
  ``i`` is the ``i``-th folder in sorted order, as in ``torchvision.datasets.Caltech256``. The
  release has no test split: ``split_per_class`` holds out a seeded fraction of every class.
- ``imagenet``: an ImageFolder tree, ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*``,
  classes named by the train/ folders in sorted order (the validation images sorted into one
  folder per class, as ImageFolder needs).

Only the top level of a class folder is read (as torchvision's Caltech256 does: the release keeps
a few stray images in sub-folders such as ``056.dog/greg``).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import pil_to_tensor

from amata_runner.config.names import FOLDER_DATASETS
from amata_runner.errors import ConfigError

__all__ = [
    "CALTECH_DIR",
    "FOLDER_AUGMENTS",
    "FOLDER_DATASETS",
    "EvalImages",
    "FileList",
    "ImageFiles",
    "caltech256_files",
    "check_tree",
    "eval_transform",
    "hold_out",
    "imagenet_files",
    "load_folder_splits",
    "split_per_class",
    "train_transform",
]

# none: the evaluation view (resize + center crop); crop_flip: resize + random crop + flip (the
# Caltech256 reference); random_resized_crop: random-resized crop + flip (the ImageNet standard).
FOLDER_AUGMENTS = ("none", "crop_flip", "random_resized_crop")
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS)
CALTECH_DIR = os.path.join("caltech256", "256_ObjectCategories")


# --------------------------------------------------------------------------------------------------
# Looking at the tree. Every problem is a one-line ConfigError naming dataset.root.
# --------------------------------------------------------------------------------------------------


def _tree_error(root: str, problem: str) -> ConfigError:
    return ConfigError("dataset.root", root, problem)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _has_image(folder: Path) -> bool:
    """Stops at the first image, so checking 1000 ImageNet classes reads a few entries each."""
    with os.scandir(folder) as entries:
        return any(_is_image(e.name) and e.is_file() for e in entries)


def _image_names(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if _is_image(e.name) and e.is_file())


def _classes(root: str, folder: Path, layout: str, num_classes: int | None) -> list[str]:
    """The class folders of ``folder``, each checked to hold at least one image."""
    if not folder.is_dir():
        raise _tree_error(root, f"no folder {folder}: expected {layout}")
    try:
        return _checked_classes(root, folder, layout, num_classes)
    except OSError as err:  # an unreadable folder (permissions, a vanished mount)
        raise _tree_error(root, f"cannot list {err.filename or folder}: {err.strerror}") from err


def _checked_classes(root: str, folder: Path, layout: str, num_classes: int | None) -> list[str]:
    classes = _class_folders(folder)
    if not classes:
        raise _tree_error(root, f"{folder} has no class folders: expected {layout}")
    if num_classes is not None and len(classes) != num_classes:
        raise _tree_error(
            root,
            f"{folder} has {len(classes)} class folders but dataset.num_classes={num_classes}: "
            f"expected {layout}",
        )
    for name in classes:
        if not _has_image(folder / name):
            extensions = ", ".join(IMAGE_EXTENSIONS)
            raise _tree_error(root, f"class folder {folder / name} holds no images ({extensions})")
    return classes


def _caltech_layout(folder: Path) -> str:
    return f"torchvision's Caltech256 layout {folder}/<NNN.class>/*.jpg"


def _imagenet_layout(root: Path) -> str:
    return f"an ImageFolder tree {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"


def _caltech_classes(root: str, num_classes: int | None) -> list[str]:
    folder = Path(root) / CALTECH_DIR
    if not folder.is_dir():
        raise _tree_error(
            root,
            f"no Caltech256 images: expected {_caltech_layout(folder)}; set "
            "dataset.download=true to fetch them with torchvision, or point dataset.root at the "
            "folder that holds caltech256/",
        )
    return _classes(root, folder, _caltech_layout(folder), num_classes)


def _imagenet_classes(root: str, num_classes: int | None) -> tuple[list[str], list[str]]:
    """(train classes, val classes); every val class must be a train class (same labels)."""
    base = Path(root)
    layout = _imagenet_layout(base)
    if not base.is_dir():
        raise _tree_error(root, f"no ImageNet folder: expected {layout}; point dataset.root at it")
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise _tree_error(root, f"no {split}/ folder in {base}: expected {layout}")
    train = _classes(root, base / "train", layout, num_classes)
    val_layout = (
        f"{layout} (the validation images sorted into one folder per class, named as in train/)"
    )
    val = _classes(root, base / "val", val_layout, None)
    known = set(train)
    strangers = [name for name in val if name not in known]
    if strangers:
        raise _tree_error(
            root,
            f"{base / 'val' / strangers[0]} is not a class of {base / 'train'} "
            f"({len(strangers)} such folders): val/ must use train/'s class folder names",
        )
    return train, val


def _no_imagenet_download(cfg: DictConfig) -> None:
    if cfg.download:
        raise ConfigError(
            "dataset.download",
            True,
            "ImageNet has no automatic download (its licence needs a sign-in): fetch ILSVRC2012, "
            f"lay it out as {_imagenet_layout(Path(str(cfg.root)))} and set dataset.download=false",
        )


def check_tree(cfg: DictConfig) -> None:
    """Raise a one-line ConfigError when the tree is missing or malformed, before any run starts.

    Reads folder names and stops at the first image of each class: no image is opened.
    """
    if cfg.name == "caltech256":
        if not cfg.download:
            _caltech_classes(str(cfg.root), cfg.num_classes)
    elif cfg.name == "imagenet":
        _no_imagenet_download(cfg)
        _imagenet_classes(str(cfg.root), cfg.num_classes)
    else:
        raise ConfigError("dataset.name", cfg.name, "allowed: " + ", ".join(FOLDER_DATASETS))


# --------------------------------------------------------------------------------------------------
# File lists and the Caltech256 split.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileList:
    """One split as paths and labels.

    Paths are a numpy bytes array rather than a list of str: forked workers then share it
    untouched, where reading Python strings would copy every page they sit on (refcounts).
    """

    paths: np.ndarray  # bytes, (N,)
    labels: torch.Tensor  # int64, (N,)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def build(paths: Sequence[str], labels: Sequence[int], classes: Sequence[str]) -> FileList:
        encoded = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        return FileList(encoded, torch.tensor(list(labels), dtype=torch.int64), tuple(classes))

    def subset(self, indices: torch.Tensor) -> FileList:
        """The files at ``indices`` (in that order), with the same class names."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return FileList(self.paths[index.numpy()], self.labels[index], self.classes)


def split_per_class(
    names: Sequence[str], class_name: str, test_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, test) names of one class: floor(n * test_fraction) held out, chosen by a seed.

    The generator is seeded by (seed, crc32 of the class name), so a class's split does not depend
    on the other classes' files or on the listing order, and is the same on every machine.
    """
    ordered = sorted(names)
    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode())])
    held = set(rng.permutation(len(ordered))[: int(len(ordered) * test_fraction)].tolist())
    train = [n for i, n in enumerate(ordered) if i not in held]
    test = [n for i, n in enumerate(ordered) if i in held]
    return train, test


def _download_caltech256(root: str) -> None:
    from torchvision.datasets import Caltech256

    try:
        Caltech256(root, download=True)
    except Exception as err:  # network, disk, a truncated archive
        raise ConfigError(
            "dataset.download",
            True,
            f"could not fetch Caltech256 into {Path(root) / CALTECH_DIR} ({err}); copy the "
            "256_ObjectCategories folder there",
        ) from err


def caltech256_files(
    root: str,
    *,
    test_fraction: float,
    split_seed: int,
    num_classes: int | None = None,
    download: bool = False,
) -> tuple[FileList, FileList]:
    """(train, test) file lists: every class split by ``split_per_class``."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            "dataset.test_fraction", test_fraction, "must be strictly between 0 and 1"
        )
    if download and not (Path(root) / CALTECH_DIR).is_dir():
        _download_caltech256(root)
    classes = _caltech_classes(root, num_classes)
    folder = Path(root) / CALTECH_DIR
    train: tuple[list[str], list[int]] = ([], [])
    test: tuple[list[str], list[int]] = ([], [])
    for label, name in enumerate(classes):
        fit, held = split_per_class(_image_names(folder / name), name, test_fraction, split_seed)
        for (paths, labels), chosen in ((train, fit), (test, held)):
            paths += [str(folder / name / f) for f in chosen]
            labels += [label] * len(chosen)
    return FileList.build(*train, classes), FileList.build(*test, classes)


def imagenet_files(root: str, num_classes: int | None = None) -> tuple[FileList, FileList]:
    """(train, val) file lists; val labels follow train/'s class order."""
    train_classes, val_classes = _imagenet_classes(root, num_classes)
    index = {name: i for i, name in enumerate(train_classes)}
    lists = []
    for split, classes in (("train", train_classes), ("val", val_classes)):
        paths: list[str] = []
        labels: list[int] = []
        for name in classes:
            folder = Path(root) / split / name
            files = _image_names(folder)
            paths += [str(folder / f) for f in files]
            labels += [index[name]] * len(files)
        lists.append(FileList.build(paths, labels, train_classes))
    return lists[0], lists[1]


# --------------------------------------------------------------------------------------------------
# Transforms (PIL in, PIL out; the dataset turns the result into uint8 CHW).
# --------------------------------------------------------------------------------------------------

Transform = Callable[[Image.Image], Image.Image]


def _check_sizes(image_size: int, resize_size: int) -> None:
    if image_size < 1:
        raise ConfigError("dataset.image_size", image_size, "must be a positive integer")
    if resize_size < image_size:
        raise ConfigError(
            "dataset.resize_size",
            resize_size,
            f"must be >= dataset.image_size ({image_size}): the crop comes from the resized image",
        )


def eval_transform(image_size: int, resize_size: int) -> Transform:
    """Shorter side to ``resize_size``, then the central ``image_size`` square (256 -> 224)."""
    _check_sizes(image_size, resize_size)
    return T.Compose([T.Resize(resize_size), T.CenterCrop(image_size)])


def train_transform(augment: str, image_size: int, resize_size: int) -> Transform:
    """The training view for ``augment`` (see FOLDER_AUGMENTS)."""
    _check_sizes(image_size, resize_size)
    if augment == "none":
        return eval_transform(image_size, resize_size)
    if augment == "crop_flip":
        return T.Compose(
            [T.Resize(resize_size), T.RandomCrop(image_size), T.RandomHorizontalFlip()]
        )
    if augment == "random_resized_crop":
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()])
    raise ConfigError("dataset.augment", augment, "allowed: " + ", ".join(FOLDER_AUGMENTS))


# --------------------------------------------------------------------------------------------------
# The dataset the workers read, and the test set as the engine sees it.
# --------------------------------------------------------------------------------------------------


class ImageFiles(Dataset[tuple[torch.Tensor, int, int]]):
    """Decodes one image per item: (uint8 (3, H, W), label, dataset index).

    An item can be asked for as ``(index, seed)``: the random transform then draws from the CPU
    generator seeded with ``seed`` (restored afterwards), so an example's augmentation depends on
    (run seed, epoch, index) only — not on which worker decodes it, how many workers there are, or
    whether the epoch was resumed half-way (``streaming.BatchPlan`` hands out the seeds).
    """

    def __init__(self, files: FileList, transform: Transform) -> None:
        self.files = files
        self.transform = transform
        self._labels = files.labels.numpy()  # an array, not a list: shared as is by the workers

    @property
    def labels(self) -> torch.Tensor:
        return self.files.labels

    @property
    def classes(self) -> tuple[str, ...]:
        return self.files.classes

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.fsdecode(self.files.paths[index])

    def decode(self, index: int, seed: int | None = None) -> torch.Tensor:
        path = self.path(index)
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")  # Caltech256 holds greyscale and CMYK JPEGs too
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        if seed is None:
            return pil_to_tensor(self.transform(image))
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(seed)
        try:
            return pil_to_tensor(self.transform(image))
        finally:
            generator.set_state(saved)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        return self.decode(index, seed), int(self._labels[index]), index


def _move(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if device is None:
        return t
    return t.to(device, non_blocking=t.is_pinned())


class EvalImages:
    """A test split that cannot be held in memory: labels at hand, images decoded on demand.

    ``subset(indices)`` gives the fixed evaluation subset as a uint8 tensor (decoded once, a few
    hundred MB at most); ``batches(batch_size)`` streams the whole split for the final evaluation.
    The transform is deterministic (resize + center crop), so both always give the same pixels.
    """

    def __init__(self, data: ImageFiles, *, workers: int = 0, pin_memory: bool = False) -> None:
        if workers < 0:
            raise ConfigError("dataset.workers", workers, "must be a non-negative integer")
        self.data = data
        self.workers = workers
        self.pin_memory = pin_memory

    @property
    def labels(self) -> torch.Tensor:
        return self.data.labels

    @property
    def images(self) -> torch.Tensor:
        raise TypeError(
            "a folder dataset's test split is not held in memory: use subset(indices) or "
            "batches(batch_size)"
        )

    def __len__(self) -> int:
        return len(self.data)

    def batches(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        indices: Sequence[int] | torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 (B, 3, H, W), int64 labels) in index order, decoded by ``workers`` workers."""
        if batch_size < 1:
            raise ConfigError("eval.batch_size", batch_size, "must be a positive integer")
        target = None if device is None else torch.device(device)
        chosen: Dataset[Any] = self.data
        if indices is not None:
            chosen = Subset(self.data, torch.as_tensor(indices, dtype=torch.int64).tolist())
        loader = DataLoader(
            chosen,
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.workers,
            pin_memory=self.pin_memory and target is not None and target.type == "cuda",
            generator=torch.Generator(),  # leaves the global RNG alone (training resumes exactly)
        )
        for x, y, _ in loader:
            yield _move(x, target), _move(y, target)

    def subset(
        self,
        indices: Sequence[int] | torch.Tensor,
        device: torch.device | str | None = None,
        batch_size: int = 64,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The images at ``indices`` (in that order) as one uint8 tensor, with their labels."""
        parts = list(self.batches(batch_size, device, indices))
        if not parts:
            return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


# --------------------------------------------------------------------------------------------------
# From cfg.dataset.
# --------------------------------------------------------------------------------------------------


def hold_out(
    train: ImageFiles, test: EvalImages, held: torch.Tensor, keep: torch.Tensor
) -> tuple[ImageFiles, EvalImages]:
    """(the training images at ``keep``, the ones at ``held`` seen as the test split is seen).

    The held-out images are decoded with the test split's deterministic transform (resize +
    center crop), never the training augmentation.
    """
    kept = ImageFiles(train.files.subset(keep), train.transform)
    validation = ImageFiles(train.files.subset(held), test.data.transform)
    return kept, EvalImages(validation, workers=test.workers, pin_memory=test.pin_memory)


def load_folder_splits(cfg: DictConfig) -> tuple[ImageFiles, EvalImages]:
    """(train images with the training transform, the test split for evaluation)."""
    if cfg.channels != 3:
        raise ConfigError("dataset.channels", cfg.channels, f"{cfg.name} images are RGB: use 3")
    root = str(cfg.root)
    if cfg.name == "caltech256":
        train, test = caltech256_files(
            root,
            test_fraction=float(cfg.test_fraction),
            split_seed=int(cfg.split_seed),
            num_classes=int(cfg.num_classes),
            download=bool(cfg.download),
        )
    elif cfg.name == "imagenet":
        _no_imagenet_download(cfg)
        train, test = imagenet_files(root, int(cfg.num_classes))
    else:
        raise ConfigError("dataset.name", cfg.name, "allowed: " + ", ".join(FOLDER_DATASETS))
    size, resize = int(cfg.image_size), int(cfg.resize_size)
    train_set = ImageFiles(train, train_transform(str(cfg.augment), size, resize))
    test_set = ImageFiles(test, eval_transform(size, resize))
    return train_set, EvalImages(
        test_set, workers=int(cfg.workers), pin_memory=bool(cfg.pin_memory)
    )
