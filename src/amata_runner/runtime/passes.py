"""Counting the work a method does, so cost compares across machines as well as in seconds.

Counts are per example: one image through one forward pass adds 1 to ``forward``; one backward pass
through the network for one image (whether it yields input or parameter gradients) adds 1 to
``backward``.  Methods and attacks increment the counter right where they call the model, so the
numbers are counted, not estimated from a formula.  Plain Python ints: no device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PassCounter:
    forward: int = 0
    backward: int = 0

    def add(self, examples: int, *, forward: int = 1, backward: int = 1) -> None:
        """Record ``forward`` forward and ``backward`` backward passes over ``examples`` images."""
        self.forward += examples * forward
        self.backward += examples * backward

    def state_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.forward = int(state["forward"])
        self.backward = int(state["backward"])
