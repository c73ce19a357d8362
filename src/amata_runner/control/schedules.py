"""Annealing schedules: training progress -> the inner loop's control (K_t, alpha_t).

Amata is not a separate algorithm but PGD (or any inner loop) under a schedule that starts weak and
ends strong.  A schedule is a pure function of progress, so it needs no state in a checkpoint and a
resumed run picks up exactly the control an uninterrupted one would use.

Rounding: the paper writes K_t = K_min + (K_max - K_min) * t / T with real-valued K_t; we run
round-half-up(K_t) steps, clamped to [K_min, K_max], and take alpha_t = tau / K_t with the *rounded*
K_t, so that K_t * alpha_t = tau holds for the steps actually taken.  With ``endpoint="paper"``
(Algorithm 1 literally, t = 0..T-1) the first epoch uses K_min and the last uses
round(K_min + (K_max - K_min)(T-1)/T), which is K_max once (K_max - K_min)/T <= 0.5 (e.g. 2 -> 10
over 100 epochs); ``endpoint="inclusive"`` divides by T - 1 so the last epoch always uses K_max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from amata_runner.config import SCHEDULES

if TYPE_CHECKING:
    from torch import nn

# The formulas of training progress below; schedule=adaptive watches the model (adaptive.py).
SCHEDULE_NAMES = tuple(name for name in SCHEDULES if name != "adaptive")


@dataclass(frozen=True)
class Control:
    """The schedule's output for one epoch or iteration, read by each method in its own terms.

    ``steps`` is the integer strength K (PGD/YOPO steps, Free replays, ATTA's reset period),
    ``step_size`` is alpha = tau / K, and ``strength`` is where the schedule stands between its
    weakest (0) and strongest (1) setting, for methods whose knob is a mode (Fast's start).
    """

    steps: int
    step_size: float
    strength: float = 1.0


def anneal_fraction(
    name: str, t: float, total: float, eta: float = 1.0, switch: float = 0.0
) -> float:
    """Where between the weakest (0) and the strongest (1) control the schedule is at time t.

    ``t`` and ``total`` are in epochs (fractional under per-iteration annealing).  ``constant`` is
    always at the strong end: the plain baselines run their full K from the start.  ``step`` is
    weak for the first ``switch`` epochs and strong after (Amata+Fast, Amata+ATTA).
    """
    if name == "constant":
        return 1.0
    if name == "step":
        return 0.0 if t < switch else 1.0
    if total <= 0:
        return 0.0
    if name == "linear":
        fraction = t / total
    elif name == "exponential":  # Appendix B.2, eq. 16
        fraction = (1.0 - math.exp(-eta * t)) / (1.0 - math.exp(-eta * total))
    else:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULE_NAMES)}")
    return min(max(fraction, 0.0), 1.0)


class ControlSchedule(Protocol):
    """What the engine asks of every schedule, the annealing ones and ``schedule=adaptive`` alike.

    One protocol, so the loop never asks which kind it holds: a schedule that keeps nothing
    between calls saves an empty state, reports no metrics, and decides by reading its formula.
    """

    @property
    def per_iteration(self) -> bool:
        """True when the control may change inside an epoch (asked for at every batch)."""
        ...

    def at(self, epoch: int, iteration: int = 0) -> Control:
        """The control in force at (epoch, iteration), without deciding anything."""
        ...

    def decide(self, model: nn.Module, epoch: int, iteration: int = 0) -> Control:
        """The control for this batch; a schedule that measures the model does so here, on the
        train-only clock."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Fields for the next metrics row."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run replays the same controls."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Schedule:
    """K_t and alpha_t for a run of ``epochs`` epochs of ``iters_per_epoch`` iterations."""

    name: str
    k_min: int
    k_max: int
    step_size: float
    epochs: int
    iters_per_epoch: int
    tau: float | None = None
    eta: float = 1.0
    unit: str = "epoch"
    endpoint: str = "paper"
    switch: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        if self.unit not in ("epoch", "iteration") or self.endpoint not in ("paper", "inclusive"):
            raise ValueError(f"bad unit/endpoint {self.unit!r}/{self.endpoint!r}")

    @property
    def per_iteration(self) -> bool:
        """True when the control may change inside an epoch."""
        return self.unit == "iteration" and self.name != "constant"

    def progress(self, epoch: int, iteration: int = 0) -> tuple[float, float]:
        """(t, T) in epochs for the epoch index and the iteration index inside that epoch."""
        if self.unit == "epoch":
            t, last = float(epoch), float(self.epochs - 1)
        else:
            t = epoch + iteration / self.iters_per_epoch
            last = self.epochs - 1.0 / self.iters_per_epoch
        total = last if self.endpoint == "inclusive" else float(self.epochs)
        return t, total

    def k_value(self, epoch: int, iteration: int = 0) -> float:
        """The real-valued K_t of the paper's formula, before rounding."""
        return self.k_min + (self.k_max - self.k_min) * self.fraction(epoch, iteration)

    def fraction(self, epoch: int, iteration: int = 0) -> float:
        t, total = self.progress(epoch, iteration)
        return anneal_fraction(self.name, t, total, self.eta, self.switch)

    def at(self, epoch: int, iteration: int = 0) -> Control:
        k = math.floor(self.k_value(epoch, iteration) + 0.5)
        k = min(max(k, self.k_min), self.k_max)
        # tau = None: the last control equals the baseline's (K_max, step_size) exactly.
        alpha = self.step_size * (self.k_max / k) if self.tau is None else self.tau / k
        return Control(steps=k, step_size=alpha, strength=self.fraction(epoch, iteration))

    def decide(self, model: nn.Module, epoch: int, iteration: int = 0) -> Control:
        """:meth:`at`: a formula of progress looks at no model."""
        del model
        return self.at(epoch, iteration)

    def metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Empty: the control is a pure function of progress, which the checkpoint holds."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def epoch_controls(self) -> list[Control]:
        """The control at the start of every epoch (what `unit=epoch` runs use)."""
        return [self.at(epoch) for epoch in range(self.epochs)]
