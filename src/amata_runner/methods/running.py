"""Per-example measurements summed on the device and read as means at evaluation points.

Methods that report what their inner loop did (FOSC's criterion value, the steps early-stopped
examples needed) add to these sums every batch without a host sync; ``read`` syncs once, at an
evaluation point, and starts the next window.  The sums are part of the method's checkpoint state,
so a resumed run's next metrics row equals the uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from amata_runner.methods.base import Method


class RunningMeans:
    def __init__(self, device: torch.device, *names: str) -> None:
        self._sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in names}
        self._seen = 0

    def add(self, examples: int, **sums: torch.Tensor) -> None:
        """Add per-batch sums (device tensors) over ``examples`` examples."""
        for name, value in sums.items():
            self._sums[name] += value
        self._seen += examples

    def read(self) -> dict[str, float | None]:
        """The means since the last read (None before any example), then reset."""
        seen = self._seen
        means = {name: total.item() / seen if seen else None for name, total in self._sums.items()}
        for total in self._sums.values():
            total.zero_()
        self._seen = 0
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.detach().cpu() for k, v in self._sums.items()}, "seen": self._seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state["sums"].items():
            self._sums[name].copy_(value)
        self._seen = int(state["seen"])


class MeasuredMethod(Method):
    """A method whose metrics rows report ``self.means`` (set up in the subclass's __init__)."""

    means: RunningMeans

    def metrics(self) -> dict[str, Any]:
        """Means since the last call (one host sync, at evaluation points only)."""
        return self.means.read()

    def state_dict(self) -> dict[str, Any]:
        """The measurements not yet logged, so a resumed run's next row matches."""
        return {"means": self.means.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.means.load_state_dict(state["means"])
