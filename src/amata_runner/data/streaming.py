"""Training batches decoded from files by DataLoader workers, behind the DeviceLoader interface.

The engine sees the same object either way: ``len`` (batches per epoch), iteration yielding
``Batch(x, y, index)`` on the device with x in [0, 1], ``num_examples`` and a ``state_dict`` that
lets a run stopped mid-epoch continue with exactly the batches it would have drawn next.

Everything random is a function of (seed, epoch): the order is a permutation drawn from
``numpy.random.default_rng([seed, epoch])``, and every example gets its own augmentation seed from
the same stream (``folders.ImageFiles`` seeds its transform with it). So resuming needs only the
epoch and the number of batches already handed out, the skipped batches are never decoded (the
sampler simply starts at the right offset), and the pixels do not depend on the worker count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from amata_runner.data.folders import ImageFiles
from amata_runner.data.loader import Batch
from amata_runner.errors import ConfigError

__all__ = ["BatchPlan", "StreamingLoader"]


class BatchPlan(Sampler[list[tuple[int, int]]]):
    """One epoch's batches of (dataset index, augmentation seed), from batch ``start`` on.

    With ``world_size`` > 1 each rank takes every ``world_size``-th example of the shared
    permutation, padded by wrapping around so that all ranks get the same number (as
    DistributedSampler does); every rank draws the same permutation because it is seeded by
    (seed, epoch) alone.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_examples / self.world_size)

    def __len__(self) -> int:
        n, bs = self.per_rank, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's dataset indices for ``epoch`` and their augmentation seeds."""
        n = self.num_examples
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        seeds = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)  # indexed by dataset index
        total = self.per_rank * self.world_size
        if total > n:
            perm = np.concatenate([perm, np.resize(perm, total - n)])
        mine = perm[self.rank : total : self.world_size]
        return mine, seeds[mine]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices, seeds = self.order(self.epoch)
        bs = self.batch_size
        for b in range(self.start, len(self)):
            chunk = slice(b * bs, (b + 1) * bs)
            yield list(zip(indices[chunk].tolist(), seeds[chunk].tolist(), strict=True))


class StreamingLoader:
    """DeviceLoader's interface over ``ImageFiles`` decoded by ``workers`` DataLoader workers.

    ``drop_last``: drop each epoch's last, smaller batch, so every step has the same shape
    (steadier cudnn.benchmark and CUDA-graph reuse, and Free's carried perturbation always fits);
    the dropped examples differ from epoch to epoch. Off, every example is seen once per epoch.
    ``pin_memory`` takes effect only on a CUDA device; ``persistent_workers`` keeps the workers
    (and their file-system caches) alive across epochs.
    """

    def __init__(
        self,
        data: ImageFiles,
        batch_size: int,
        device: torch.device | str,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be a positive integer")
        if workers < 0:
            raise ConfigError("dataset.workers", workers, "must be a non-negative integer")
        if prefetch_factor < 1:
            raise ConfigError("dataset.prefetch_factor", prefetch_factor, "must be >= 1")
        self.data = data
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.workers = workers
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self.persistent_workers = persistent_workers and workers > 0
        self.prefetch_factor = prefetch_factor
        self.plan = BatchPlan(
            len(data),
            batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        self.epoch = 0  # the epoch being drawn (= epochs completed, between epochs)
        self.position = 0  # batches of it handed out: the next __iter__ starts there
        self._loader: DataLoader | None = None  # built on first use: constructing forks nothing

    @property
    def num_examples(self) -> int:
        return len(self.data)

    @property
    def drop_last(self) -> bool:
        return self.plan.drop_last

    def __len__(self) -> int:
        return len(self.plan)

    def _data_loader(self) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(
                self.data,
                batch_sampler=self.plan,
                num_workers=self.workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.persistent_workers,
                prefetch_factor=self.prefetch_factor if self.workers > 0 else None,
                # DataLoader draws its workers' base seed from this generator at every new
                # iterator; the default would take it from the global RNG, whose stream a resumed
                # run must find exactly as the uninterrupted run left it. (The seed is unused:
                # augmentation is seeded per example.)
                generator=torch.Generator(),
            )
        return self._loader

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.pin_memory)

    def __iter__(self) -> Iterator[Batch]:
        """Continue the data order where it stands: batch ``position`` of epoch ``epoch``."""
        if self.position >= len(self) > 0:  # an epoch handed out in full, its loop left early
            self.epoch, self.position = self.epoch + 1, 0
        self.plan.set_epoch(self.epoch, start=self.position)
        for x, y, index in self._data_loader():
            self.position += 1
            yield Batch(
                self._to_device(x).float().div_(255.0), self._to_device(y), self._to_device(index)
            )
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        """The next batch to draw: (epoch, position); position 0 between epochs."""
        epoch, position = self.epoch, self.position
        if position >= len(self) > 0:
            epoch, position = epoch + 1, 0
        return {
            "seed": self.plan.seed,
            "num_examples": self.num_examples,
            "epoch": epoch,
            "position": position,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next ``__iter__`` starts at the saved batch; skipped batches are never decoded."""
        saved = int(state["num_examples"])
        if saved != self.num_examples:
            raise ConfigError(
                "resume",
                True,
                f"the checkpoint's data order is for {saved} training images, the tree now holds "
                f"{self.num_examples}: resume with the same files",
            )
        self.plan.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state.get("position", 0))

    def close(self) -> None:
        """Stop persistent workers now rather than when the loader is garbage-collected."""
        self._loader = None
