"""Error-versus-cost curves: clean and robust error against train seconds and against passes.

One colour per configuration; each seed's curve is smoothed the TensorBoard way (as the paper's
figures are) and drawn thin, and their mean on a common grid over the span all seeds cover is
drawn thick. matplotlib is imported here only, with the Agg backend, so the report's tables work
without it and plotting never needs a display.
"""

from __future__ import annotations

import logging
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from amata_runner.report.sections import Section
from amata_runner.report.smoothing import tensorboard_smooth

X_AXES = {
    "seconds": ("train_seconds", "train seconds"),
    "passes": (None, "forward + backward passes"),
}
# The periodic curves measure the fixed test subset; the validation split's (val_*, where a run
# has one) are drawn dashed beside them.
ERRORS = (("clean_error", "test clean error"), ("robust_error", "test robust error"))
LEGEND_WIDTH = 40  # characters per legend line (long override lists wrap)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "runs"


def _x(row: dict[str, Any], axis: str) -> float | None:
    if axis == "passes":
        fwd, bwd = row.get("forward_passes"), row.get("backward_passes")
        return None if fwd is None or bwd is None else float(fwd + bwd)
    value = row.get("train_seconds")
    return None if value is None else float(value)


def curve(rows: list[dict[str, Any]], axis: str, metric: str, weight: float) -> tuple[Any, Any]:
    """(x, smoothed y) of one run, in row order, skipping rows without the values."""
    points = [(_x(r, axis), r.get(metric)) for r in rows]
    points = [(x, y) for x, y in points if x is not None and isinstance(y, int | float)]
    if not points:
        return np.array([]), np.array([])
    xs, ys = zip(*points, strict=True)
    return np.asarray(xs, dtype=float), np.asarray(tensorboard_smooth(ys, weight), dtype=float)


def mean_curve(curves: list[tuple[Any, Any]]) -> tuple[Any, Any] | None:
    """Mean of several runs' curves.

    Seeds of one configuration evaluate at the same points (epoch ends), so point i is averaged
    over the seeds that reached it, x and y alike: a run that stopped early (interrupted, failed)
    contributes the points it has and the mean goes on over the others, to the longest curve.
    """
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return None
    longest = max(len(x) for x, _ in curves)
    xs, ys = [], []
    for i in range(longest):
        having = [(x[i], y[i]) for x, y in curves if len(x) > i]
        xs.append(float(np.mean([p[0] for p in having])))
        ys.append(float(np.mean([p[1] for p in having])))
    return np.asarray(xs), np.asarray(ys)


def plot_section(section: Section, out_dir: Path, prefix: str) -> list[Path]:
    """Write ``<prefix>error_vs_seconds.png`` and ``<prefix>error_vs_passes.png``."""
    # matplotlib announces building its font cache (once per machine; INFO "generated new
    # fontManager" and a WARNING "building the font cache"), which a sweep's logging would print.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    targets = _robust_targets(section)
    attack = section.eval_attack
    legends = legend_labels(section)
    for axis, (_, x_label) in X_AXES.items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
        drawn = False
        for ax, (metric, y_label) in zip(axes[0], ERRORS, strict=True):
            for index, config in enumerate(section.configs):
                colour = f"C{index % 10}"
                curves = [
                    curve(run.rows, axis, metric, section.smoothing)
                    for run in config.runs
                    if run.rows
                ]
                for x, y in curves:
                    if len(x) and len(curves) > 1:
                        ax.plot(x, y, color=colour, linewidth=0.8, alpha=0.35, marker=".")
                mean = mean_curve(curves)
                if mean is not None:
                    ax.plot(
                        *mean,
                        color=colour,
                        linewidth=2.0,
                        marker="o",
                        markersize=3,
                        label=legends[index],
                    )
                    drawn = True
                held = [
                    curve(r.rows, axis, f"val_{metric}", section.smoothing) for r in config.runs
                ]
                val = mean_curve(held)
                if val is not None:
                    label = f"{legends[index]} (validation)"
                    ax.plot(*val, color=colour, linewidth=1.2, linestyle="--", label=label)
            if metric == "robust_error":
                for target in targets:
                    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
                    ax.annotate(
                        f"target {target:g}",
                        xy=(0.0, target),
                        xycoords=("axes fraction", "data"),
                        xytext=(3, 2),
                        textcoords="offset points",
                        fontsize="small",
                        color="dimgrey",
                    )
            ax.set_xlabel(x_label)
            robust = metric == "robust_error" and attack
            ax.set_ylabel(f"{y_label} ({attack})" if robust else y_label)
            ax.grid(alpha=0.3)
        if drawn:
            axes[0][1].legend(fontsize="small")
        fig.suptitle(f"{section.title} (smoothing {section.smoothing:g})", fontsize="medium")
        fig.tight_layout()
        path = out_dir / f"{prefix}error_vs_{axis}.png"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        os.replace(tmp, path)  # concurrent writers (a sweep's callbacks) never leave a torn file
        written.append(path)
    return written


def legend_labels(section: Section) -> list[str]:
    """Each configuration's legend entry: its row name, plus what tells it apart from another
    configuration of the same name (its label) so no two entries read alike."""
    if len(section.configs) == 1:  # nothing differs: name the method (or the paper's row)
        (config,) = section.configs
        method = (config.config.get("method") or {}).get("name")
        return [config.row_key or str(method or config.row)]
    labels = []
    for config in section.configs:
        twins = [c for c in section.configs if c.row == config.row]
        text = config.row
        if len(twins) > 1 and config.label and config.label != config.row:
            text = f"{config.row} ({config.label})"
        labels.append(textwrap.fill(text, LEGEND_WIDTH))
    return labels


def _robust_targets(section: Section) -> list[float]:
    found = []
    for key in section.targets:
        name, _, value = key.partition("<=")
        if name == "robust_error":
            try:
                found.append(float(value))
            except ValueError:
                continue
    return found
