"""Batches drawn from a dataset that lives on the training device.

A host-side DataLoader spends most of its time collating and copying small images; for datasets
that fit in device memory it is faster to copy the uint8 tensor over once and do the indexing,
shuffling and augmentation with batched tensor ops where the model runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from amata_runner.data.datasets import ImageSet
from amata_runner.errors import ConfigError

__all__ = ["AUGMENTATIONS", "Batch", "CropFlip", "DeviceLoader"]

AUGMENTATIONS = ("none", "crop_flip")


def _check_args(batch_size: int, augment: str, padding: int) -> None:
    if augment not in AUGMENTATIONS:
        raise ConfigError("dataset.augment", augment, f"allowed: {', '.join(AUGMENTATIONS)}")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be a positive integer")
    if padding < 0:
        raise ConfigError("dataset.padding", padding, "must be a non-negative integer")


@dataclass(frozen=True)
class CropFlip:
    """The crop offsets and flips drawn for one batch.

    Kept so that state stored per example in the un-augmented frame (ATTA's perturbations) can be
    moved into the augmented frame with ``apply`` and back with ``invert``.
    """

    top: torch.Tensor  # (B,) offsets into the zero-padded image
    left: torch.Tensor  # (B,)
    flip: torch.Tensor  # (B,) bool: horizontal flip after the crop
    padding: int

    @staticmethod
    def draw(b: int, padding: int, generator: torch.Generator, device: torch.device) -> CropFlip:
        span = 2 * padding + 1
        top = torch.randint(0, span, (b,), generator=generator, device=device)
        left = torch.randint(0, span, (b,), generator=generator, device=device)
        flip = torch.randint(0, 2, (b,), generator=generator, device=device).bool()
        return CropFlip(top, left, flip, padding)

    def _grid(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.top.device
        rows = self.top[:, None] + torch.arange(h, device=device)  # (B, H)
        cols = self.left[:, None] + torch.arange(w, device=device)  # (B, W)
        return rows, cols

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Crop each zero-padded example at its offset and flip it where drawn (two gathers)."""
        b, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        rows, cols = self._grid(h, w)
        # Reading the window's columns backwards is the same as flipping the crop.
        cols = torch.where(self.flip[:, None], cols.flip(1), cols)
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
        return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))

    def invert(self, augmented: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """Write augmented values back to their un-augmented positions.

        Pixels that the crop cut off keep their value from ``original``; pixels the crop took
        from the zero padding are dropped.
        """
        b, c, h, w = original.shape
        p = self.padding
        unflipped = torch.where(self.flip[:, None, None, None], augmented.flip(3), augmented)
        padded = F.pad(original, (p, p, p, p))
        width = w + 2 * p
        rows, cols = self._grid(h, w)
        flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(b, 1, h * w)
        padded = padded.reshape(b, c, -1).scatter(
            2, flat.expand(b, c, h * w), unflipped.reshape(b, c, -1)
        )
        return padded.reshape(b, c, h + 2 * p, width)[:, :, p : p + h, p : p + w]


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-example random crop of the zero-padded batch plus a random horizontal flip."""
    return CropFlip.draw(x.shape[0], padding, generator, x.device).apply(x)


@dataclass(frozen=True)
class Batch:
    """One training batch: images in [0,1], labels, dataset indices and the augmentation drawn."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    crop: CropFlip | None = None


class DeviceLoader:
    """Batches from a uint8 ImageSet held on the training device; shuffling and augmentation run
    there too.

    All randomness comes from one generator on the device, so a run is reproducible from its seed.
    ``state_dict`` records the generator as it was when the current epoch began and how many
    batches of it were handed out, so a run stopped mid-epoch resumes with exactly the batches the
    uninterrupted run would have drawn next (the skipped batches' draws are replayed, not built).
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        device: torch.device | str,
        *,
        shuffle: bool,
        drop_last: bool,
        augment: str = "none",
        seed: int = 0,
        padding: int = 4,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        _check_args(batch_size, augment, padding)
        if batch_size % world:
            raise ConfigError(
                "batch_size", batch_size, f"the global batch must divide into {world} processes"
            )
        # Under torchrun every rank draws the same global batches (same generator) and keeps its
        # contiguous 1/world of each; the last, smaller batch is dropped so the slices are equal.
        self.rank, self.world = rank, world
        drop_last = drop_last or world > 1
        self.device = torch.device(device)
        # uint8 on the device: a quarter of the memory of a float copy; floats exist per batch only.
        self._images = data.images.to(self.device).contiguous()
        self._labels = data.labels.to(self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.padding = padding
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._epoch_start: torch.Tensor | None = None  # generator state when this epoch began
        self.position = 0  # batches of the current epoch handed out
        self._skip = 0  # batches to replay without yielding (set by load_state_dict)

    @property
    def num_examples(self) -> int:
        return int(self._labels.shape[0])

    def __len__(self) -> int:
        n, bs = self.num_examples, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def _order(self) -> torch.Tensor:
        n = self.num_examples
        if self.shuffle:
            return torch.randperm(n, generator=self.generator, device=self.device)
        return torch.arange(n, device=self.device)

    def _batch(self, idx: torch.Tensor) -> Batch:
        crop = None
        if self.augment == "crop_flip":  # drawn for the global batch: every rank draws alike
            crop = CropFlip.draw(idx.shape[0], self.padding, self.generator, self.device)
        if self.world > 1:
            part = idx.shape[0] // self.world
            rows = slice(self.rank * part, (self.rank + 1) * part)
            idx = idx[rows]
            if crop is not None:
                crop = CropFlip(crop.top[rows], crop.left[rows], crop.flip[rows], crop.padding)
        x = self._images.index_select(0, idx).to(torch.float32).div_(255.0)
        if crop is not None:
            x = crop.apply(x)
        return Batch(x, self._labels.index_select(0, idx), idx, crop)

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0
        self._epoch_start = self.generator.get_state()
        self.position = 0
        order = self._order()
        bs = self.batch_size
        # Batch boundaries are host ints, so slicing never waits on the device.
        for start in range(0, len(self) * bs, bs):
            self.position += 1
            if self.position <= skip:
                if self.augment == "crop_flip":  # consume the same draws the batch made
                    b = min(bs, self.num_examples - start)
                    CropFlip.draw(b, self.padding, self.generator, self.device)
                continue
            yield self._batch(order[start : start + bs])
        self.position = 0
        self._epoch_start = None

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Between epochs: the generator. Mid-epoch: its state at the epoch's start + position."""
        if self._epoch_start is not None and 0 < self.position < len(self):
            return {"generator": self._epoch_start, "position": self.position}
        return {"generator": self.generator.get_state(), "position": 0}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        generator = state["generator"]
        assert isinstance(generator, torch.Tensor)
        self.generator.set_state(generator.cpu())
        self._skip = int(state.get("position", 0))
