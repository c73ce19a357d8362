"""``schedule=adaptive``: the inner loop's strength chosen online by the maximum principle.

The paper's Section 2.4 scores a control u = (K, alpha) at time t by
H(u) = ||grad_theta loss(A_u(x))||^2 - gamma * K (the first term of its criterion C, eq. 14) and
notes that an approximately optimal schedule follows greedily from maximising it; its conclusion
leaves such adaptive schedules to future work. This schedule does exactly that: every
``schedule.every`` epochs (or iterations), on a few fixed probe batches, it evaluates H for every
candidate K in G (alpha = tau / K, as Amata's family) and trains with the maximiser until the next
decision. ``mode=monotone`` never lowers K (Amata's shape, K only grows); ``mode=free`` may.

Why it is built this way:
- It is a schedule, so it drives any method that reads a ``Control`` (PGD's K, Free's replays m,
  YOPO's outer steps, ...) exactly as Amata's linear schedule does. H is always measured with PGD
  of (K, tau/K): it scores the *strength* the control stands for, with cost gamma * K.
- The probe is training work: the engine calls :meth:`decide` with the train-only clock running,
  and its forward/backward passes are counted, so any speed-up it shows is net of its overhead.
- Decisions are keyed by (epoch, iteration) and kept in the checkpoint, so a resumed run neither
  repeats nor skips a decision and replays the uninterrupted run's controls exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from amata_runner.criterion import h_values, make_probes
from amata_runner.criterion_config import InnerControl
from amata_runner.passes import PassCounter
from amata_runner.schedules import Control

ADAPTIVE_MODES = ("monotone", "free")


@dataclass(frozen=True)
class Decision:
    """One decision: where it was taken, the H of every candidate considered, and the choice."""

    epoch: int
    iteration: int
    h: dict[int, float]  # candidate K -> H(K, tau / K)
    chosen: int


def choose(h: dict[int, float], current: int | None, mode: str) -> int:
    """argmax_K H over the allowed candidates; ties go to the smaller (cheaper) K.

    In monotone mode candidates below the current K are not allowed (when none is at or above it,
    the current K is kept).
    """
    allowed = {k: v for k, v in h.items() if mode == "free" or current is None or k >= current}
    if not allowed:
        assert current is not None
        return current
    return max(sorted(allowed), key=lambda k: allowed[k])


class AdaptiveSchedule:
    """The controls of ``schedule=adaptive``; holds the probes, the current K and the decisions."""

    def __init__(
        self,
        *,
        candidates: Sequence[int],
        tau: float,
        gamma: float,
        eps: float,
        every: int,
        unit: str,
        mode: str,
        probes: list[Any],
        iters_per_epoch: int,
        counter: PassCounter | None = None,
    ) -> None:
        if mode not in ADAPTIVE_MODES:
            raise ValueError(f"mode must be one of {ADAPTIVE_MODES}, got {mode!r}")
        self.candidates = sorted(set(int(k) for k in candidates))
        self.tau = tau
        self.gamma = gamma
        self.eps = eps
        self.every = every
        self.unit = unit
        self.mode = mode
        self.probes = probes
        self.iters_per_epoch = iters_per_epoch
        self.counter = counter
        self.current: int = self.candidates[0]
        self.last: Decision | None = None
        self._decided_at: tuple[int, int] = (-1, -1)
        self._fresh = False  # a decision not yet reported in a metrics row

    @property
    def per_iteration(self) -> bool:
        return self.unit == "iteration"

    # ------------------------------------------------------------------ controls
    def control(self, k: int) -> Control:
        span = self.candidates[-1] - self.candidates[0]
        strength = 1.0 if span == 0 else (k - self.candidates[0]) / span
        return Control(steps=k, step_size=self.tau / k, strength=strength)

    def at(self, epoch: int, iteration: int = 0) -> Control:
        """The control in force (no decision is taken here; see :meth:`decide`)."""
        del epoch, iteration
        return self.control(self.current)

    def due(self, epoch: int, iteration: int) -> bool:
        """A decision point not taken yet: every ``every`` epochs (at their first batch) or every
        ``every`` iterations (counted over the run)."""
        if (epoch, iteration) <= self._decided_at:
            return False
        if self.unit == "epoch":
            return iteration == 0 and epoch % self.every == 0
        return (epoch * self.iters_per_epoch + iteration) % self.every == 0

    # ------------------------------------------------------------------ the decision
    def h_of_candidates(self, model: nn.Module) -> dict[int, float]:
        """H(K, tau/K) for each candidate on the probe batches, counting the probe's passes."""
        controls = [InnerControl(k, self.tau / k) for k in self.candidates]
        h = h_values(model, self.probes, controls, eps=self.eps, gamma=self.gamma)
        if self.counter is not None:
            for k in self.candidates:  # K attack steps + one parameter-gradient pass each
                for probe in self.probes:
                    self.counter.add(int(probe.x.shape[0]), forward=k + 1, backward=k + 1)
        return {c.steps: value for c, value in h.items()}

    def decide(self, model: nn.Module, epoch: int, iteration: int = 0) -> Control:
        """Take the decision due at (epoch, iteration), if any, and return the control in force."""
        if self.due(epoch, iteration):
            h = self.h_of_candidates(model)
            self.current = choose(h, None if self.last is None else self.current, self.mode)
            self.last = Decision(epoch, iteration, h, self.current)
            self._decided_at = (epoch, iteration)
            self._fresh = True
        return self.control(self.current)

    def metrics(self) -> dict[str, Any]:
        """Fields for a metrics row: the latest decision's H values (once per decision)."""
        if self.last is None or not self._fresh:
            return {}
        self._fresh = False
        fields: dict[str, Any] = {f"H_K{k}": v for k, v in self.last.h.items()}
        fields["adaptive_choice"] = self.last.chosen
        fields["adaptive_decided_at_epoch"] = self.last.epoch
        return fields

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "current": self.current,
            "decided_at": list(self._decided_at),
            "fresh": self._fresh,
        }
        if self.last is not None:
            state["last"] = {
                "epoch": self.last.epoch,
                "iteration": self.last.iteration,
                "h": {str(k): v for k, v in self.last.h.items()},
                "chosen": self.last.chosen,
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = int(state["current"])
        self._decided_at = (int(state["decided_at"][0]), int(state["decided_at"][1]))
        self._fresh = bool(state.get("fresh", False))
        last = state.get("last")
        self.last = None
        if last is not None:
            h = {int(k): float(v) for k, v in last["h"].items()}
            self.last = Decision(int(last["epoch"]), int(last["iteration"]), h, int(last["chosen"]))


def build_adaptive(
    cfg: Any, train_set: Any, device: torch.device, iters_per_epoch: int, counter: PassCounter
) -> AdaptiveSchedule:
    """From a checked run config (``schedule.*`` of ``schedule=adaptive``) and the training set."""
    s = cfg.schedule
    k_max = int(s.k_max)
    tau = float(cfg.method.step_size) * k_max if s.tau is None else float(s.tau)
    candidates = list(s.candidates) if s.candidates else list(range(int(s.k_min), k_max + 1))
    eps = float(cfg.method.get("eps", cfg.dataset.threat.eps))
    probes = make_probes(
        train_set.images,
        train_set.labels,
        batches=int(s.probe_batches),
        batch_size=int(s.probe_batch_size or cfg.batch_size),
        eps=eps,
        random_start=True,
        seed=int(s.probe_seed),
        device=device,
        key="schedule.probe_batches",
    )
    return AdaptiveSchedule(
        candidates=candidates,
        tau=tau,
        gamma=float(s.gamma),
        eps=eps,
        every=int(s.every),
        unit=str(s.unit),
        mode=str(s.mode),
        probes=probes,
        iters_per_epoch=iters_per_epoch,
        counter=counter,
    )
