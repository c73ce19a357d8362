"""The inner-maximisation loss landscape of Figure 1 / Figure 5 (Appendix C).

Around a test example x^0 the adversarial loss is drawn over a plane in input space,

    L(a, b) = CE(h_theta(clip_[0,1](x^0 + a * d1 + b * d2)), y),

and PGD trajectories are projected on it. Following Appendix C:

- d1 is the first principal component of the PGD-40 perturbations {x^k - x^0 : k = 1..K} (PCA as in
  Li et al. 2018: centred; when centring leaves nothing, e.g. K = 1, the uncentred direction),
  oriented so that the final perturbation projects positively;
- d2 is a Rademacher (+-1) vector as in Shafahi et al. 2019, made orthogonal to d1;
- both are scaled to unit L-inf norm, so a coordinate c moves no pixel by more than |c|: the
  plane's axes are in the same pixel units as eps, and the Rademacher axis is exactly Shafahi's
  per-pixel shift before orthogonalisation.

Trajectory points are projected by least squares on (d1, d2) (the plane is orthogonal), and the
legend gives the loss actually reached by each trajectory's last iterate (the paper's numbers). By
default the trajectories start at x^0, the plane's origin, as the paper's eq. 14 writes the inner
loop ("starting from x"); a shared random start is an option. The paper's PGD step size is 0.01 for
PGD-40 and PGD-2; its Amata (K_min = 2 -> K_max = 40) runs the K of the checkpoint's epoch with
alpha = tau / K (Algorithm 1), which is why its legend names K. Evaluation is a measurement: eval
mode, fp32, parameters frozen, a private generator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks.linf import random_delta
from amata_runner.attacks.pgd import pgd_iterates
from amata_runner.control.criterion import measuring
from amata_runner.control.schedules import Schedule
from amata_runner.errors import ConfigError

_PGD_NAME = re.compile(r"^pgd(\d+)$")


@dataclass(frozen=True)
class TrajectorySpec:
    """One inner loop to draw: ``name`` as typed (pgd40, amata), its legend label and control."""

    name: str
    label: str
    steps: int
    step_size: float


@dataclass
class Trajectory:
    spec: TrajectorySpec
    points: np.ndarray  # (K+1, 2): (a, b) of x^0 .. x^K projected on the plane
    losses: np.ndarray  # (K+1,): CE at the actual iterates (not at their projections)


@dataclass
class Landscape:
    """The surface ``loss[j, i]`` at (a, b) = (coords[i], coords[j]), its plane and trajectories."""

    coords: np.ndarray  # (grid,)
    loss: np.ndarray  # (grid, grid), rows follow b (d2), columns follow a (d1)
    dir1: np.ndarray  # (C, H, W), unit L-inf norm
    dir2: np.ndarray  # (C, H, W), unit L-inf norm, orthogonal to dir1
    x: np.ndarray  # (C, H, W), the example x^0
    label: int
    eps: float
    pca_from: str
    trajectories: list[Trajectory] = field(default_factory=list)


def amata_control(
    epoch: int, epochs: int, *, k_min: int, k_max: int, step_size: float, tau: float | None
) -> tuple[int, float]:
    """Amata's (K, alpha) for the epoch after ``epoch`` completed ones (Algorithm 1, linear)."""
    if not 1 <= k_min <= k_max:
        raise ConfigError("amata_k_min", k_min, f"must be in [1, amata_k_max ({k_max})]")
    schedule = Schedule(
        name="linear",
        k_min=k_min,
        k_max=k_max,
        step_size=step_size,
        epochs=max(epochs, 1),
        iters_per_epoch=1,
        tau=tau,
    )
    control = schedule.at(min(max(epoch, 0), max(epochs, 1) - 1))
    return control.steps, control.step_size


def trajectory_spec(name: str, *, step_size: float, amata: tuple[int, float]) -> TrajectorySpec:
    """``pgdN``: PGD-N of ``step_size``; ``amata``: the control ``amata`` = (K, alpha)."""
    match = _PGD_NAME.match(name)
    if match and int(match.group(1)) >= 1:
        steps = int(match.group(1))
        return TrajectorySpec(name, f"PGD-{steps}", steps, step_size)
    if name == "amata":
        steps, alpha = amata
        return TrajectorySpec(name, f"Amata (K={steps})", steps, alpha)
    raise ConfigError("trajectories", name, "pgdN (N >= 1, e.g. pgd40) or amata")


def _run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    spec: TrajectorySpec,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The iterates (K+1, C, H, W) of one trajectory and the loss at each."""
    points = torch.cat(
        list(pgd_iterates(model, x, y, start, eps=eps, step_size=spec.step_size, steps=spec.steps))
    )
    with torch.no_grad():
        losses = F.cross_entropy(model(points), y.expand(points.shape[0]), reduction="none")
    return points, losses


def _pca_direction(vectors: torch.Tensor) -> torch.Tensor:
    """First principal direction (unit L2) of the rows of ``vectors`` (float64)."""
    for matrix in (vectors - vectors.mean(0, keepdim=True), vectors):
        if matrix.norm() > 1e-12:
            _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
            return vh[0]
    return torch.zeros(vectors.shape[1], dtype=vectors.dtype)


def compute_landscape(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    specs: list[TrajectorySpec],
    *,
    pca_from: TrajectorySpec,
    eps: float,
    grid: int = 41,
    span: float | None = None,
    random_start: bool = False,
    seed: int = 0,
    batch_size: int = 1024,
) -> Landscape:
    """The loss surface around ``x`` (one example, (1, C, H, W) in [0,1]) and the trajectories."""
    generator = torch.Generator().manual_seed(seed)
    flat_dim = x[0].numel()
    start = random_delta(x, eps, generator) if random_start else torch.zeros_like(x)
    rademacher = torch.randint(0, 2, (flat_dim,), generator=generator).double().mul_(2).sub_(1)

    with measuring(model):
        runs = {s: _run(model, x, y, start, s, eps) for s in dict.fromkeys([*specs, pca_from])}
        origin = x.reshape(1, -1).double().cpu()
        pca_points = runs[pca_from][0].reshape(-1, flat_dim).double().cpu()
        vectors = pca_points[1:] - origin
        d1 = _pca_direction(vectors)
        if d1.norm() == 0:  # the attack never moved: any direction will do
            d1 = torch.randint(0, 2, (flat_dim,), generator=generator).double().mul_(2).sub_(1)
            d1 /= d1.norm()
        if vectors.shape[0] and vectors[-1] @ d1 < 0:
            d1 = -d1
        d2 = rademacher - (rademacher @ d1) * d1
        d1 = d1 / d1.abs().max()
        d2 = d2 / d2.abs().max()

        trajectories = []
        for spec in specs:
            points, losses = runs[spec]
            offsets = points.reshape(-1, flat_dim).double().cpu() - origin
            plane = torch.stack([offsets @ d1 / (d1 @ d1), offsets @ d2 / (d2 @ d2)], dim=1)
            trajectories.append(Trajectory(spec, plane.numpy(), losses.double().cpu().numpy()))

        if span is None:
            reach = max((float(np.abs(t.points).max()) for t in trajectories), default=0.0)
            span = max(eps, 1.15 * reach)
        coords = torch.linspace(-span, span, grid, dtype=torch.float64)
        b_grid, a_grid = torch.meshgrid(coords, coords, indexing="ij")
        plane = torch.stack([d1, d2]).to(x.device, torch.float32)  # (2, D)
        ab = torch.stack([a_grid.reshape(-1), b_grid.reshape(-1)], dim=1)  # row-major over (b, a)
        losses = []
        with torch.no_grad():
            for chunk in ab.split(batch_size):
                offsets = chunk.to(x.device, torch.float32) @ plane
                inputs = (x.reshape(1, -1) + offsets).clamp_(0.0, 1.0)
                logits = model(inputs.reshape(-1, *x.shape[1:]))
                target = y.expand(logits.shape[0])
                losses.append(F.cross_entropy(logits, target, reduction="none").double().cpu())
        loss = torch.cat(losses).reshape(grid, grid)

    shape = tuple(x.shape[1:])
    return Landscape(
        coords=coords.numpy(),
        loss=loss.numpy(),
        dir1=d1.reshape(shape).numpy(),
        dir2=d2.reshape(shape).numpy(),
        x=x[0].double().cpu().numpy(),
        label=int(y[0]),
        eps=eps,
        pca_from=pca_from.name,
        trajectories=trajectories,
    )


def save_npz(landscape: Landscape, path: Path, **extra: Any) -> None:
    """Raw surface, plane and trajectories; loads with ``np.load`` (no pickle)."""
    arrays: dict[str, Any] = {
        "coords": landscape.coords,
        "loss": landscape.loss,
        "dir1": landscape.dir1,
        "dir2": landscape.dir2,
        "x": landscape.x,
        "label": np.int64(landscape.label),
        "eps": np.float64(landscape.eps),
        "pca_from": np.str_(landscape.pca_from),
        "names": np.array([t.spec.name for t in landscape.trajectories], dtype=str),
        "labels": np.array([t.spec.label for t in landscape.trajectories], dtype=str),
    }
    for t in landscape.trajectories:
        arrays[f"traj_{t.spec.name}"] = t.points
        arrays[f"loss_{t.spec.name}"] = t.losses
        arrays[f"steps_{t.spec.name}"] = np.int64(t.spec.steps)
        arrays[f"step_size_{t.spec.name}"] = np.float64(t.spec.step_size)
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def plot_landscape(landscape: Landscape, path: Path, title: str) -> None:
    """Contours of the surface with the projected trajectories; final losses in the legend.

    Uses matplotlib's object API on an Agg canvas: no pyplot state, no display needed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(
            "out", str(path), "matplotlib is needed to draw; pip install 'amata-runner[report]'"
        ) from exc
    figure = Figure(figsize=(6.4, 5.2), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    c = landscape.coords
    filled = ax.contourf(c, c, landscape.loss, levels=30, cmap="viridis")
    ax.contour(c, c, landscape.loss, levels=10, colors="white", linewidths=0.4, alpha=0.5)
    figure.colorbar(filled, ax=ax, label="cross-entropy loss")
    colours = ["#d62728", "#ff7f0e", "#f7f7f7", "#17becf", "#e377c2", "#bcbd22"]
    for n, t in enumerate(landscape.trajectories):
        colour = colours[n % len(colours)]
        final = f"{t.spec.label}: {t.losses[-1]:.3f}"
        ax.plot(t.points[:, 0], t.points[:, 1], "-o", color=colour, markersize=2.5, lw=1.2)
        ax.plot(t.points[-1, 0], t.points[-1, 1], "*", color=colour, markersize=11, label=final)
    ax.plot([0], [0], "k+", markersize=10, label=f"x (label {landscape.label})")
    ax.set_xlim(c[0], c[-1])
    ax.set_ylim(c[0], c[-1])
    ax.set_xlabel(f"PCA direction of the {landscape.pca_from} trajectory (pixel units)")
    ax.set_ylabel("Rademacher direction (pixel units)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    figure.tight_layout()
    figure.savefig(path)
