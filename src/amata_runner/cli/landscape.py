"""``amata-landscape``: Figure 1 / 5 of the paper for a checkpoint the runner wrote.

    amata-landscape ckpt=outputs/runs/.../last.ckpt                 # test example 0
    amata-landscape ckpt=RUN_DIR index=3 n_examples=2 grid=100      # the paper's 100 x 100 grid
    amata-landscape ckpt=... trajectories=[pgd40,pgd2,amata] amata_k_min=2 amata_k_max=40

For each test example it writes ``landscape_<index>.png`` (contours of the adversarial loss on the
plane of the PGD-40 PCA direction and a Rademacher direction, with the trajectories and their final
losses) and ``landscape_<index>.npz`` (the grid, the directions, the projected trajectories) beside
the checkpoint, or in ``out=DIR``. See :mod:`amata_runner.control.landscape` for how the plane
is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from amata_runner.checks import as_float, require
from amata_runner.cli.options import parse_options, run_tool

TOOL = "amata-landscape"


@dataclass
class LandscapeOptions:
    ckpt: str = MISSING  # a last.ckpt / best.ckpt, or a run directory (its last.ckpt)
    index: int = 0  # first test example
    n_examples: int = 1  # one figure per example: index .. index + n_examples - 1
    grid: int = 41  # points per axis (the paper draws 100)
    span: Any = None  # half-width of the plane in pixel units; null: fits every trajectory
    trajectories: list[str] = field(default_factory=lambda: ["pgd40", "pgd2", "amata"])
    # attack paths drawn on the plane: pgdK (K steps of step_size), amata (K annealed)
    pca_from: str = "pgd40"  # the trajectory whose PCA gives the first axis
    eps: Any = None  # L-inf radius; null: the run's method.eps, else its dataset.threat.eps
    step_size: Any = None  # PGD's alpha; null: the run's dataset.threat.step_size (MNIST 0.01)
    amata_k_min: int = 2  # Appendix C: Amata K 2 -> 40
    amata_k_max: int | None = None  # null: the run's dataset.threat.steps (MNIST 40)
    amata_tau: Any = None  # null: step_size * amata_k_max (Algorithm 1's tau)
    epoch: int | None = None  # completed epochs for Amata's K; null: the checkpoint's
    random_start: bool = False  # true: one shared uniform start for every trajectory
    seed: int = 0  # Rademacher direction (and random start)
    batch_size: int = 1024  # grid points per forward
    out: str | None = None  # output directory; null: beside the checkpoint
    device: str = "auto"  # auto (CUDA when there is a GPU), cpu, cuda, cuda:N


def _check(opts: DictConfig) -> None:
    require(opts.grid >= 3, "grid", opts.grid, "must be >= 3")
    require(opts.n_examples >= 1, "n_examples", opts.n_examples, "must be >= 1")
    require(opts.index >= 0, "index", opts.index, "must be >= 0")
    require(opts.batch_size >= 1, "batch_size", opts.batch_size, "must be >= 1")
    require(len(opts.trajectories) > 0, "trajectories", [], "at least one, e.g. [pgd40,pgd2,amata]")
    if opts.span is not None:
        require(as_float("span", opts.span) > 0, "span", opts.span, "must be > 0")
    if opts.epoch is not None:
        require(opts.epoch >= 0, "epoch", opts.epoch, "must be >= 0")


def _run_value(cfg: DictConfig, given: Any, key: str, run_keys: Sequence[str]) -> float:
    """An option, else the first of ``run_keys`` the run's config has; must be > 0."""
    value = given
    for run_key in run_keys:
        if value is not None:
            break
        value = OmegaConf.select(cfg, run_key, default=None)
    number = as_float(key, value)
    require(number > 0, key, value, "must be > 0")
    return number


def _body(argv: list[str]) -> list[Path]:
    opts = parse_options(LandscapeOptions, argv)
    _check(opts)

    import torch  # torch-heavy imports after the options are known to be sane

    from amata_runner.control.landscape import (
        amata_control,
        compute_landscape,
        plot_landscape,
        save_npz,
        trajectory_spec,
    )
    from amata_runner.data import eval_subset, load_splits
    from amata_runner.runtime.device import select_device
    from amata_runner.runtime.run_files import load_trained

    device = select_device(opts.device)
    run = load_trained(opts.ckpt, device)
    cfg = run.cfg
    eps = _run_value(cfg, opts.eps, "eps", ("method.eps", "dataset.threat.eps"))
    require(eps <= 1, "eps", eps, "must be <= 1 (pixel units, data in [0,1])")
    step_size = _run_value(cfg, opts.step_size, "step_size", ("dataset.threat.step_size",))
    k_max = opts.amata_k_max if opts.amata_k_max is not None else int(cfg.dataset.threat.steps)
    require(k_max >= 1, "amata_k_max", k_max, "must be >= 1")
    tau = None if opts.amata_tau is None else _run_value(cfg, opts.amata_tau, "amata_tau", ())
    epoch = opts.epoch if opts.epoch is not None else int(run.state["progress"]["epoch"])
    amata = amata_control(
        epoch, int(cfg.epochs), k_min=opts.amata_k_min, k_max=k_max, step_size=step_size, tau=tau
    )
    specs = list(
        {
            n: trajectory_spec(n, step_size=step_size, amata=amata) for n in opts.trajectories
        }.values()
    )
    pca = trajectory_spec(opts.pca_from, step_size=step_size, amata=amata)
    require(pca.name.startswith("pgd"), "pca_from", opts.pca_from, "a PGD trajectory, e.g. pgd40")

    _, test_set = load_splits(cfg.dataset)
    last = opts.index + opts.n_examples
    require(
        last <= len(test_set),
        "index",
        opts.index,
        f"index + n_examples ({last}) must be <= the test set size ({len(test_set)})",
    )
    out_dir = Path(opts.out) if opts.out is not None else run.path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    span = None if opts.span is None else as_float("span", opts.span)
    written = []
    for index in range(opts.index, last):
        images, y = eval_subset(test_set, [index], device)
        x = images.to(torch.float32).div_(255)
        landscape = compute_landscape(
            run.model,
            x,
            y,
            specs,
            pca_from=pca,
            eps=eps,
            grid=opts.grid,
            span=span,
            random_start=opts.random_start,
            seed=opts.seed,
            batch_size=opts.batch_size,
        )
        stem = out_dir / f"landscape_{index}"
        save_npz(landscape, stem.with_suffix(".npz"), epoch=epoch, index=index, ckpt=str(run.path))
        title = (
            f"{cfg.method.name} on {cfg.dataset.name}, epoch {epoch}: test example {index}, "
            f"eps {eps:g}"
        )
        plot_landscape(landscape, stem.with_suffix(".png"), title)
        finals = ", ".join(f"{t.spec.label} {t.losses[-1]:.3f}" for t in landscape.trajectories)
        print(f"{TOOL}: wrote {stem}.png and .npz ({finals})")
        written.append(stem.with_suffix(".png"))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point; returns None (a console script exits with main's return value)."""
    run_tool(TOOL, _body, argv, schema=LandscapeOptions, doc=__doc__)


if __name__ == "__main__":
    main()
