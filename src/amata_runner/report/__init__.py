"""``amata-report``: turn run and sweep directories into report.md, report.csv and error curves.

Reads only what runs write (summary.json, metrics.jsonl, status.json, config_resolved.yaml,
.hydra/overrides.yaml), so it works on finished sweeps, sweeps still running, and runs copied from
another machine; failed and unfinished jobs are listed as failed rather than dropped.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from amata_runner.report.runs import Run, add_targets, collect_runs, find_run_dirs
from amata_runner.report.sections import Section, build_sections
from amata_runner.report.smoothing import tensorboard_smooth
from amata_runner.report.tables import csv_text, markdown

log = logging.getLogger(__name__)

__all__ = [
    "Report",
    "Run",
    "Section",
    "build_sections",
    "collect_runs",
    "find_run_dirs",
    "tensorboard_smooth",
    "write_report",
]


@dataclass
class Report:
    markdown: Path
    csv: Path
    plots: list[Path] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    runs: int = 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    paths: list[Path],
    out: Path,
    *,
    smoothing: float | None = None,
    plots: bool = True,
    targets: list[float] = (),
    baseline: str | None = None,
) -> Report:
    """Collect every run under ``paths`` and write the report files into ``out``.

    ``targets`` adds robust-error levels to the ones the runs logged, found on their metrics rows
    by the runner's rule (the first evaluation at or below the level); ``baseline`` names the row
    every ratio is taken against (a ConfigError when no row has that name). Raises
    ``FileNotFoundError`` when no run directory is found (the CLI turns it into one line).
    """
    from amata_runner.report.plots import plot_section, slug

    if plots and importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed: no plots (pip install 'amata-runner[report]')")
        plots = False
    runs = collect_runs(paths)
    for run in runs:
        add_targets(run, list(targets))
    if not runs:
        raise FileNotFoundError(
            "no run directories (status.json, summary.json or metrics.jsonl) under "
            + ", ".join(str(p) for p in paths)
        )
    sections = build_sections(runs, smoothing, baseline)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[str]] = {}
    written: list[Path] = []
    if plots:
        for section in sections:
            prefix = f"{slug(section.title)}-" if len(sections) > 1 else ""
            files = plot_section(section, out, prefix)
            written += files
            images[section.title] = [f.name for f in files]
    report = Report(out / "report.md", out / "report.csv", written, sections, len(runs))
    _write_atomic(report.csv, csv_text(sections))
    _write_atomic(report.markdown, markdown(sections, [str(p) for p in paths], images))
    return report
