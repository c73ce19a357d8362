"""The contract every network in this package keeps: the first layer can be split off.

YOPO (a later method) treats the first layer separately from the rest of the network: it
recomputes only the first layer's output for each inner attack step and reuses the gradient of the
loss with respect to that output. That only works if ``net(x) == net.forward_from_layer_one(
net.layer_one(x))`` holds exactly, so each network's ``forward`` is written literally in that shape
and this protocol lets callers type against it without caring which network they hold.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class SplitAtLayerOne(Protocol):
    """A network whose forward is ``forward_from_layer_one(layer_one(x))``."""

    @property
    def layer_one(self) -> nn.Module:
        """The first layer; its output is what ``forward_from_layer_one`` consumes."""
        ...

    def forward_from_layer_one(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after ``layer_one``: maps its output to raw logits."""
        ...
