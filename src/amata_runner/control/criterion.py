"""The optimal-control criterion C of the paper (eq. 14): how far the current control is from the
greedy maximiser of the Pontryagin Hamiltonian.

    H(alpha, K) = || grad_theta mean-CE(h_theta(A_{alpha,K}(x)), y) ||^2 - gamma * K
    C           = max over G u {current} of H  -  H(current)          (>= 0; 0 at the maximiser)

How it is measured, and why:

- **A measurement, not a training step.** The model runs in eval mode (BatchNorm uses its running
  statistics and they are not updated, dropout is off) and in fp32, so H is a deterministic function
  of (theta, control) and measuring it leaves the run untouched: parameter gradients come from
  ``torch.autograd.grad`` and never reach ``.grad`` or the optimiser, no global RNG is drawn from,
  and the model's mode is restored. The update in training sees train-mode BatchNorm; the
  difference is the price of a reproducible, side-effect-free number.
- **Fixed probes.** H is computed on fixed batches of training examples with one fixed random start
  per example (drawn once with the probe's own seeded generator), shared by every control, so
  comparing controls compares only (alpha, K), never two random starts.
- **Scale.** ||g||^2 of a minibatch gradient depends on the batch size (its noise part shrinks as
  1/B), and gamma = 0.04 is set against it, so each probe batch has the run's batch size (the
  gradient the update would take) and H averages the per-batch squared norms. The gradient is the
  loss's only: weight decay is a property of the optimiser, the same for every control.
- **A = PGD as trained.** L-inf PGD of K sign steps of size alpha inside the eps ball, clipped to
  [0,1], from the fixed start: ``attacks.pgd.pgd_iterates``, the loop ``pgd_linf`` trains with.
  Controls that share alpha share the path, so K = 5, 10, 40 cost one 40-step run (exhaustive
  search on a product G).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks.linf import random_delta
from amata_runner.attacks.pgd import attack_mode, pgd_iterates
from amata_runner.control.criterion_config import ControlGrid, InnerControl, control_grid
from amata_runner.errors import ConfigError

# A current control within this relative distance of a member of G *is* that member (a schedule's
# tau / K and a configured alpha may differ in the last bit).
_SAME_ALPHA = 1e-9


@dataclass(frozen=True)
class ProbeBatch:
    """Fixed examples for H: ``x`` in [0,1], labels, and the start perturbation of the attack."""

    x: torch.Tensor
    y: torch.Tensor
    start: torch.Tensor  # inside the eps ball with x + start in [0,1]; zeros without random start


@dataclass(frozen=True)
class CriterionResult:
    """C at one point of training: its value, the maximiser, and every H evaluated."""

    value: float  # C >= 0
    best: InnerControl  # argmax of H over G u {current}
    current: InnerControl
    h_current: float
    h_best: float
    h: dict[InnerControl, float]  # H of every control evaluated (all of G when exhaustive)

    def fields(self, prefix: str = "criterion_") -> dict[str, Any]:
        """Flat fields for a metrics row."""
        return {
            f"{prefix}C": self.value,
            f"{prefix}H_current": self.h_current,
            f"{prefix}H_best": self.h_best,
            f"{prefix}best_K": self.best.steps,
            f"{prefix}best_alpha": self.best.step_size,
            f"{prefix}evaluated": len(self.h),
        }


def make_probes(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batches: int,
    batch_size: int,
    eps: float,
    random_start: bool,
    seed: int,
    device: torch.device,
    key: str = "eval.criterion.probe_batches",
) -> list[ProbeBatch]:
    """``batches`` disjoint batches drawn from uint8 ``images`` with a private generator.

    The generator is a CPU one seeded here, so the global RNG streams (and with them a resumed
    run's data order and attacks) are untouched, and the probes are the same on every device.
    """
    n = int(images.shape[0])
    if batches * batch_size > n:
        raise ConfigError(
            key,
            batches,
            f"probe_batches * probe_batch_size ({batches} * {batch_size}) must be <= the training "
            f"set size ({n})",
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)[: batches * batch_size]
    probes = []
    for b in range(batches):
        index = order[b * batch_size : (b + 1) * batch_size]
        x = images[index.to(images.device)].to(device=device, dtype=torch.float32).div_(255)
        y = labels[index.to(labels.device)].to(device)
        start = random_delta(x, eps, generator) if random_start else torch.zeros_like(x)
        probes.append(ProbeBatch(x=x, y=y, start=start))
    return probes


def grad_sq_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||grad_theta mean-CE(model(x), y)||^2 over the trainable parameters; ``.grad`` untouched."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
    return torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum()


def h_values(
    model: nn.Module,
    probes: Sequence[ProbeBatch],
    controls: Sequence[InnerControl],
    *,
    eps: float,
    gamma: float,
) -> dict[InnerControl, float]:
    """H of each control: mean over probe batches of ||grad||^2, minus gamma * K.

    Controls with the same alpha are read off one PGD path at their K (identical arithmetic to
    separate runs, so the value does not depend on which other controls are asked for).
    """
    by_alpha: dict[float, list[int]] = {}
    for control in controls:
        by_alpha.setdefault(control.step_size, []).append(control.steps)
    sums = {c: 0.0 for c in controls}
    with measuring(model):
        for alpha, ks in by_alpha.items():
            wanted = set(ks)
            for probe in probes:
                iterates = pgd_iterates(
                    model, probe.x, probe.y, probe.start, eps=eps, step_size=alpha, steps=max(ks)
                )
                for k, x_adv in enumerate(iterates):
                    if k in wanted:
                        sums[InnerControl(k, alpha)] += float(grad_sq_norm(model, x_adv, probe.y))
    n = len(probes)
    return {c: sums[c] / n - gamma * c.steps for c in controls}


def criterion(
    model: nn.Module,
    probes: Sequence[ProbeBatch],
    *,
    current: InnerControl | tuple[int, float],
    grid: ControlGrid | Sequence[InnerControl | tuple[int, float]],
    gamma: float,
    eps: float,
    search: str = "exhaustive",
    trials: int = 30,
    seed: int = 0,
) -> CriterionResult:
    """C = max(H over G u {current}) - H(current), searched exhaustively (exact) or by TPE.

    ``current`` and the members of G are (K, alpha). TPE (optuna, the ``criterion`` extra) samples
    ``trials`` controls of G (as (K, alpha) when G is a product, else as a member of G) and C is
    taken over those evaluated: a lower bound of the exhaustive value, and still >= 0.
    """
    if not isinstance(grid, ControlGrid):
        grid = ControlGrid(tuple(InnerControl(int(k), float(a)) for k, a in grid))
    if not grid.controls:
        raise ConfigError("eval.criterion.steps", [], "G must hold at least one control")
    current = _canonical(InnerControl(int(current[0]), float(current[1])), grid.controls)
    if search == "exhaustive":
        wanted = list(dict.fromkeys([current, *grid.controls]))
        h = h_values(model, probes, wanted, eps=eps, gamma=gamma)
    elif search == "tpe":
        h = _tpe(model, probes, current, grid, gamma=gamma, eps=eps, trials=trials, seed=seed)
    else:
        raise ConfigError("eval.criterion.search", search, "allowed: exhaustive, tpe")
    best = max(h, key=lambda c: (h[c], c == current))  # ties go to the current control
    return CriterionResult(
        value=max(h[best] - h[current], 0.0),
        best=best,
        current=current,
        h_current=h[current],
        h_best=h[best],
        h=h,
    )


def _canonical(control: InnerControl, members: Sequence[InnerControl]) -> InnerControl:
    for member in members:
        same_alpha = math.isclose(member.step_size, control.step_size, rel_tol=_SAME_ALPHA)
        if member.steps == control.steps and same_alpha:
            return member
    return control


def _tpe(
    model: nn.Module,
    probes: Sequence[ProbeBatch],
    current: InnerControl,
    grid: ControlGrid,
    *,
    gamma: float,
    eps: float,
    trials: int,
    seed: int,
) -> dict[InnerControl, float]:
    try:
        import optuna
    except ImportError as exc:
        raise ConfigError(
            "eval.criterion.search",
            "tpe",
            "optuna is not installed; pip install 'amata-runner[criterion]' or use "
            "eval.criterion.search=exhaustive",
        ) from exc
    h = h_values(model, probes, [current], eps=eps, gamma=gamma)
    members = set(grid.controls)

    def evaluate(control: InnerControl) -> float:
        if control not in h:
            h.update(h_values(model, probes, [control], eps=eps, gamma=gamma))
        return h[control]

    def objective(trial: Any) -> float:
        if grid.axes is not None:
            steps, sizes = grid.axes
            k = trial.suggest_categorical("K", list(steps))
            alpha = sizes[trial.suggest_categorical("alpha_index", list(range(len(sizes))))]
            control = InnerControl(k, alpha)
        else:
            index = trial.suggest_categorical("control", list(range(len(grid.controls))))
            control = grid.controls[index]
        value = evaluate(control)
        if members <= set(h):  # every control of G is known: more trials cannot change C
            trial.study.stop()
        return value

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        sampler = optuna.samplers.TPESampler(seed=seed)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(objective, n_trials=trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return h


@contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode and fp32 for the duration; the model's mode is restored afterwards."""
    device_type = next(model.parameters()).device.type
    with attack_mode(model, "eval"), torch.autocast(device_type, enabled=False):
        yield


class CriterionProbe:
    """What the engine holds: fixed probe batches and the settings of ``eval.criterion``.

    Built once from the training set; ``measure`` returns the flat fields of a metrics row.
    """

    def __init__(self, node: Any, train_set: Any, device: torch.device) -> None:
        """``node``: a checked ``eval.criterion``; ``train_set``: an ImageSet (uint8 images)."""
        self.gamma = float(node.gamma)
        self.eps = float(node.eps)
        self.search = str(node.search)
        self.trials = int(node.trials)
        self.seed = int(node.seed)
        self.grid = control_grid(node)
        self.probes = make_probes(
            train_set.images,
            train_set.labels,
            batches=int(node.probe_batches),
            batch_size=int(node.probe_batch_size),
            eps=self.eps,
            random_start=bool(node.random_start),
            seed=self.seed,
            device=device,
        )

    def evaluate(
        self, model: nn.Module, control_steps: int, control_step_size: float
    ) -> CriterionResult:
        return criterion(
            model,
            self.probes,
            current=InnerControl(int(control_steps), float(control_step_size)),
            grid=self.grid,
            gamma=self.gamma,
            eps=self.eps,
            search=self.search,
            trials=self.trials,
            seed=self.seed,
        )

    def measure(
        self, model: nn.Module, control_steps: int, control_step_size: float
    ) -> dict[str, Any]:
        """C for the current control (K_t, alpha_t) as metrics-row fields (``criterion_*``)."""
        return self.evaluate(model, control_steps, control_step_size).fields()


def summarise_criterion(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """summary.json's ``criterion`` block: the run's C, the mean of ``criterion_C`` over its rows
    (eq. 13 averages over the training interval; Table 1 gives one C per strategy)."""
    values = [r["criterion_C"] for r in rows if r.get("criterion_C") is not None]
    if not values:
        return None
    return {"C": statistics.fmean(values), "points": len(values), "last_C": values[-1]}
