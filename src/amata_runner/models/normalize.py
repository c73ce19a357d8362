"""Per-channel normalisation as the model's first step.

Images reach models in [0, 1] so attack budgets (epsilon, step sizes) and clipping stay in pixel
units; putting ``(x - mean) / std`` inside the model keeps that true however the data set is
normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """``forward(x) = net((x - mean) / std)``, with mean/std shaped (1, C, 1, 1).

    mean and std are non-persistent buffers: they follow ``.to(device/dtype)`` but stay out of the
    state dict, so checkpoints of a wrapped and an unwrapped net have the same keys apart from the
    ``net.`` prefix. ``layer_one`` and ``forward_from_layer_one`` are forwarded to ``net`` so
    callers need not care whether a model is wrapped; note that ``layer_one`` then expects
    *normalised* input, i.e. ``forward(x) == forward_from_layer_one(layer_one(normalize(x)))``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} entries but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std entries must be positive, got {list(std)}")
        self.net = net
        shape = (1, len(mean), 1, 1)
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(shape), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(list(std), dtype=torch.float32).view(shape), persistent=False
        )

    @property
    def layer_one(self) -> nn.Module:
        """The wrapped net's first layer (applied to normalised input)."""
        return self.net.layer_one

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels to the normalised input the wrapped net expects."""
        return (x - self.mean) / self.std

    def forward_from_layer_one(self, h: torch.Tensor) -> torch.Tensor:
        """The wrapped net's remainder after ``layer_one``."""
        return self.net.forward_from_layer_one(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
