"""The validation split: training images held out to choose checkpoints on, never the test set.

``eval.validation.size`` is a number of images (an integer >= 1), a fraction of the training split
(a float strictly between 0 and 1) or 0 (no split). The images are drawn per class in proportion
to the class's share of the training split (stratified: every class's quota is its exact share
rounded down, the images left over go to the classes with the largest remainders), by a generator
seeded with ``eval.validation.seed``: the same split on every machine and in every process of a
torchrun job. They are removed from the training split (no training batch ever holds one) and
evaluated the way the test subset is (no augmentation; the folder sets' resize + center crop).

The split is identified by a hash of the training split's size and the held-out indices and
labels; checkpoints and summary.json record it, and a resumption whose split differs is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from amata_runner.errors import ConfigError

__all__ = [
    "ValidationSplit",
    "check_size",
    "split_hash",
    "stratified_indices",
    "validation_count",
]

SIZE_KEY = "eval.validation.size"
ALLOWED = (
    "a number of training images (an integer >= 1), a fraction of the training split (a float "
    "strictly between 0 and 1), or 0 for no validation split"
)


def check_size(size: Any) -> None:
    """Raise a one-line ConfigError when ``size`` is none of the allowed forms."""
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise ConfigError(SIZE_KEY, size, ALLOWED)
    if isinstance(size, int):
        if size < 0:
            raise ConfigError(SIZE_KEY, size, ALLOWED)
    elif not 0.0 < size < 1.0 and size != 0.0:
        raise ConfigError(SIZE_KEY, size, ALLOWED)


def validation_count(size: Any, num_train: int) -> int:
    """How many of ``num_train`` training images ``size`` holds out (0: no split)."""
    check_size(size)
    if isinstance(size, float):
        count = 0 if size == 0.0 else max(1, round(size * num_train))
    else:
        count = size
    if count >= num_train:
        raise ConfigError(
            SIZE_KEY,
            size,
            f"holds out {count} of the {num_train} training images, leaving none to train on; "
            "use a smaller count or fraction",
        )
    return count


def stratified_indices(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` indices into ``labels``, per class in proportion to its share, sorted.

    Quotas: each class's exact share ``count * n_c / N`` rounded down, then one more for the
    classes with the largest remainders (ties: lower class first) until ``count`` is reached.
    Within a class the images are a seeded random choice; the classes are visited in label order.
    """
    labels = labels.detach().cpu().to(torch.int64)
    if count == 0:
        return torch.empty(0, dtype=torch.int64)
    classes, sizes = torch.unique(labels, sorted=True, return_counts=True)
    total = int(labels.shape[0])
    exact = sizes.to(torch.float64) * count / total
    quota = exact.floor().to(torch.int64)
    left = count - int(quota.sum())
    if left:
        remainder = (exact - quota.to(torch.float64)).numpy()
        order = np.lexsort((np.arange(len(remainder)), -remainder))  # largest first, then label
        quota[torch.as_tensor(order[:left])] += 1
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for label, take in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == label).flatten()
        perm = torch.randperm(members.shape[0], generator=generator)
        chosen.append(members[perm[:take]])
    return torch.cat(chosen).sort().values


def split_hash(num_train: int, indices: torch.Tensor, labels: torch.Tensor) -> str:
    """A short digest naming the split: the training split's size, the indices and their labels."""
    digest = hashlib.sha256()
    digest.update(str(int(num_train)).encode())
    digest.update(indices.cpu().to(torch.int64).numpy().tobytes())
    digest.update(labels.cpu().to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ValidationSplit:
    """Which training images were held out: recorded in checkpoints and summary.json."""

    size: Any  # eval.validation.size as configured
    seed: int
    num_train: int  # the training split before holding out
    indices: torch.Tensor  # sorted indices into that split (int64)
    train_indices: torch.Tensor  # the indices left to train on, in order (int64)
    hash: str

    @property
    def count(self) -> int:
        return int(self.indices.shape[0])

    @staticmethod
    def draw(labels: torch.Tensor, size: Any, seed: int) -> ValidationSplit:
        """The split of a training split with these ``labels``."""
        labels = labels.detach().cpu().to(torch.int64)
        num_train = int(labels.shape[0])
        held = stratified_indices(labels, validation_count(size, num_train), seed)
        keep = torch.ones(num_train, dtype=torch.bool)
        keep[held] = False
        return ValidationSplit(
            size=size,
            seed=int(seed),
            num_train=num_train,
            indices=held,
            train_indices=torch.nonzero(keep).flatten(),
            hash=split_hash(num_train, held, labels[held]),
        )

    def record(self) -> dict[str, Any]:
        """What checkpoints and summary.json keep (the hash stands for the indices)."""
        return {
            "size": self.size,
            "seed": self.seed,
            "examples": self.count,
            "of_train": self.num_train,
            "hash": self.hash,
        }

    def check_resumed(self, saved: dict[str, Any] | None) -> None:
        """Refuse a resumption whose held-out images are not the checkpoint's."""
        if saved is None:
            raise ConfigError(
                "resume",
                True,
                "the checkpoint records no validation split (written before eval.validation "
                "existed); start a fresh run",
            )
        if saved.get("hash") != self.hash:
            raise ConfigError(
                "resume",
                True,
                f"the validation split differs from the checkpoint's (now {self.count} of "
                f"{self.num_train} training images, hash {self.hash}; checkpoint: "
                f"{saved.get('examples')} of {saved.get('of_train')}, hash {saved.get('hash')}): "
                "the training data changed; resume with the same data or start a fresh run",
            )
