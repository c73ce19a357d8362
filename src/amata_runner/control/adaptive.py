"""``schedule=adaptive``: the inner loop's strength chosen online, on probe batches.

The paper's Section 2.4 notes that an approximately optimal schedule follows greedily from its
criterion C (eq. 14); its conclusion leaves adaptive schedules to future work. Two rules are built
here, both over Amata's family of controls (K steps of alpha = tau / K, one tau for every K):

- ``rule=adequacy`` (the default) measures g(K) = ||grad_theta loss(A_{tau/K,K}(x))||^2 and
  trains with the *smallest* K whose g reaches (1 - epsilon) of the largest g measured. epsilon is
  a relative tolerance, so it means the same on every model and dataset: a cheap attack is kept
  for as long as it is nearly as informative for the weights as the strongest one.
- ``rule=hamiltonian`` (the first design) takes argmax_K H = g(K) - gamma * K. Its gamma is
  compared with a gradient norm whose scale changes with model, data and stage of training, which
  is why it needs tuning and lost to Amata (README, "Beyond the paper").

Why it is built this way:
- It is a schedule, so it drives any method that reads a ``Control`` (PGD's K, Free's replays m,
  YOPO's outer steps, ...) exactly as Amata's linear schedule does; g is always measured with PGD
  of (K, tau/K): it scores the *strength* the control stands for.
- The adequacy probe searches upwards: g(K_max) first (the strongest attack of the family, the
  reference), then the candidates from the current K up, stopping at the first adequate one. In
  monotone mode K never falls, so the candidates below the current K are never paid for; the cost
  of a decision that keeps K is (K_max + 1) + (K + 1) passes per probe image.
- ``every=auto`` spaces decisions by cost, not by a count: the next decision comes once training
  has done ``1 / budget`` times the passes the last probe cost, so the probe is at most ``budget``
  of the training passes on every model and dataset.
- The probe is training work: the engine calls :meth:`decide` with the train-only clock running,
  and its forward/backward passes are counted, so any speed-up it shows is net of its overhead.
- Decisions are kept in the checkpoint (with the pass count they are spaced by), so a resumed run
  neither repeats nor skips a decision and replays the uninterrupted run's controls exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from amata_runner.config import ADAPTIVE_MODES, ADAPTIVE_RULES
from amata_runner.control.criterion import h_values, make_probes
from amata_runner.control.criterion_config import InnerControl
from amata_runner.control.schedules import Control
from amata_runner.methods.registry import method_spec
from amata_runner.runtime.passes import PassCounter


@dataclass(frozen=True)
class Decision:
    """One decision: where it was taken, the score of every candidate probed, and the choice.

    The score is g(K) under ``rule=adequacy`` and H(K) = g(K) - gamma * K under the hamiltonian.
    """

    epoch: int
    iteration: int
    h: dict[int, float]  # candidate K -> its score
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
    """The controls of ``schedule=adaptive``; holds the probes, the current K and the decisions.

    A :class:`~amata_runner.control.schedules.ControlSchedule`, like the annealing schedules: the
    engine drives both through :meth:`decide`, :meth:`metrics` and the state dict alone.
    """

    def __init__(
        self,
        *,
        candidates: Sequence[int],
        tau: float,
        eps: float,
        every: int | None,
        unit: str,
        mode: str,
        probes: list[Any],
        iters_per_epoch: int,
        rule: str,
        gamma: float = 0.0,
        epsilon: float = 0.0,
        budget: float = 1.0,
        counter: PassCounter | None = None,
    ) -> None:
        if mode not in ADAPTIVE_MODES:
            raise ValueError(f"mode must be one of {ADAPTIVE_MODES}, got {mode!r}")
        if rule not in ADAPTIVE_RULES:
            raise ValueError(f"rule must be one of {ADAPTIVE_RULES}, got {rule!r}")
        if every is None and counter is None:
            raise ValueError("every=None (decisions spaced by cost) needs the pass counter")
        self.candidates = sorted(set(int(k) for k in candidates))
        self.tau = tau
        self.rule = rule
        self.gamma = gamma
        self.epsilon = epsilon
        self.budget = budget
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
        self._next_at_passes = 0  # every=None: the training passes at which the next one is due
        self.probe_passes = 0  # forward + backward passes of every probe so far

    @property
    def per_iteration(self) -> bool:
        return self.unit == "iteration" or self.every is None

    # ------------------------------------------------------------------ controls
    def control(self, k: int) -> Control:
        span = self.candidates[-1] - self.candidates[0]
        strength = 1.0 if span == 0 else (k - self.candidates[0]) / span
        return Control(steps=k, step_size=self.tau / k, strength=strength)

    def at(self, epoch: int, iteration: int = 0) -> Control:
        """The control in force (no decision is taken here; see :meth:`decide`)."""
        del epoch, iteration
        return self.control(self.current)

    def _passes(self) -> int:
        assert self.counter is not None
        return self.counter.forward + self.counter.backward

    def due(self, epoch: int, iteration: int) -> bool:
        """A decision point not taken yet: every ``every`` epochs (at their first batch), every
        ``every`` iterations (counted over the run), or, with ``every=None``, once training has
        done 1 / budget times the passes of the last probe."""
        if (epoch, iteration) <= self._decided_at:
            return False
        if self.every is None:
            return self._passes() >= self._next_at_passes
        if self.unit == "epoch":
            return iteration == 0 and epoch % self.every == 0
        return (epoch * self.iters_per_epoch + iteration) % self.every == 0

    # ------------------------------------------------------------------ the probe
    def _scores(self, model: nn.Module, ks: Sequence[int], gamma: float) -> dict[int, float]:
        """g(K) - gamma * K for each K on the probe batches, counting the probe's passes."""
        controls = [InnerControl(k, self.tau / k) for k in ks]
        h = h_values(model, self.probes, controls, eps=self.eps, gamma=gamma)
        if self.counter is not None:
            for k in ks:  # K attack steps + one parameter-gradient pass each
                for probe in self.probes:
                    self.counter.add(int(probe.x.shape[0]), forward=k + 1, backward=k + 1)
        n = sum(int(probe.x.shape[0]) for probe in self.probes)
        self.probe_passes += 2 * n * sum(k + 1 for k in ks)
        return {c.steps: value for c, value in h.items()}

    def h_of_candidates(self, model: nn.Module) -> dict[int, float]:
        """H(K, tau/K) = g(K) - gamma * K for every candidate (the hamiltonian rule)."""
        return self._scores(model, self.candidates, self.gamma)

    def adequacy_search(self, model: nn.Module, lowest: int) -> tuple[dict[int, float], int]:
        """g(K_max), then g(K) upwards from ``lowest`` until one is adequate: (the g's, choice)."""
        g = self._scores(model, [self.candidates[-1]], 0.0)
        for k in (c for c in self.candidates if c >= lowest):
            if k not in g:
                g.update(self._scores(model, [k], 0.0))
            if g[k] >= (1.0 - self.epsilon) * max(g.values()):
                return g, k
        raise AssertionError("unreachable: K_max is adequate against itself")

    def decide(self, model: nn.Module, epoch: int, iteration: int = 0) -> Control:
        """Take the decision due at (epoch, iteration), if any, and return the control in force."""
        if self.due(epoch, iteration):
            before = self.probe_passes
            first = self.last is None
            if self.rule == "adequacy":
                lowest = self.candidates[0] if self.mode == "free" else self.current
                scores, self.current = self.adequacy_search(model, lowest)
            else:
                scores = self.h_of_candidates(model)
                self.current = choose(scores, None if first else self.current, self.mode)
            self.last = Decision(epoch, iteration, scores, self.current)
            self._decided_at = (epoch, iteration)
            self._fresh = True
            if self.every is None:
                spent = self.probe_passes - before
                self._next_at_passes = self._passes() + int(spent / self.budget)
        return self.control(self.current)

    def metrics(self) -> dict[str, Any]:
        """Fields for a metrics row: the latest decision's scores (once per decision) and the
        probe's share of the passes so far."""
        fields: dict[str, Any] = {}
        if self.counter is not None and self.probe_passes:
            fields["adaptive_probe_fraction"] = self.probe_passes / max(self._passes(), 1)
        if self.last is None or not self._fresh:
            return fields
        self._fresh = False
        prefix = "g_K" if self.rule == "adequacy" else "H_K"
        fields.update({f"{prefix}{k}": v for k, v in sorted(self.last.h.items())})
        fields["adaptive_choice"] = self.last.chosen
        fields["adaptive_decided_at_epoch"] = self.last.epoch
        return fields

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "current": self.current,
            "decided_at": list(self._decided_at),
            "fresh": self._fresh,
            "next_at_passes": self._next_at_passes,
            "probe_passes": self.probe_passes,
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
        self._next_at_passes = int(state.get("next_at_passes", 0))
        self.probe_passes = int(state.get("probe_passes", 0))
        last = state.get("last")
        self.last = None
        if last is not None:
            h = {int(k): float(v) for k, v in last["h"].items()}
            self.last = Decision(int(last["epoch"]), int(last["iteration"]), h, int(last["chosen"]))


def build_adaptive(
    cfg: Any, train_set: Any, device: torch.device, iters_per_epoch: int, counter: PassCounter
) -> AdaptiveSchedule:
    """From a checked run config (``schedule.*`` of ``schedule=adaptive``) and the training set.

    ``k_min: auto`` starts at the smallest candidate (1 unless ``candidates`` says otherwise) and
    lets the rule raise it; a number starts there, and no smaller K is ever a candidate.
    """
    s = cfg.schedule
    spec = method_spec(cfg.method.name)
    k_max, tau = spec.k_max(cfg), spec.tau(cfg)
    k_min = 1 if s.k_min == "auto" else int(s.k_min)
    candidates = list(s.candidates) if s.candidates else list(range(k_min, k_max + 1))
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
        rule=str(s.rule),
        gamma=float(s.gamma),
        epsilon=float(s.epsilon),
        budget=float(s.budget),
        eps=eps,
        every=None if s.every == "auto" else int(s.every),
        unit=str(s.unit),
        mode=str(s.mode),
        probes=probes,
        iters_per_epoch=iters_per_epoch,
        counter=counter,
    )
