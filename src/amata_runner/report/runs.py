"""Find the run directories under a path and read what each run left on disk.

A run directory is any directory holding ``status.json``, ``summary.json`` or ``metrics.jsonl``;
the search does not descend into one (its ``wandb/`` or ``.hydra/`` are not runs), so a path may be
one run, a sweep with numbered job directories, or a tree of sweeps. Only files are read: the
report never imports torch and works on runs copied from another machine.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RUN_MARKERS = ("status.json", "summary.json", "metrics.jsonl")
_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")
_INTERPOLATION = re.compile(r"\$\{([^${}:]+)\}")


@dataclass
class Run:
    """One run directory: its status, config, command-line overrides, summary and metrics rows."""

    path: Path
    status: str  # completed | failed | running | interrupted | incomplete
    error: str | None
    config: dict[str, Any]
    overrides: list[str]
    summary: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Finished with a summary: the only runs whose numbers enter the means."""
        return self.summary is not None and self.status != "failed"


def _natural_key(path: Path) -> list[Any]:
    """Sort sweep job directories 0, 1, ..., 10 rather than 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_run_dirs(root: Path) -> list[Path]:
    """Every run directory at or below ``root``, in natural order."""
    found: list[Path] = []
    for current, dirs, files in os.walk(root):
        if any(marker in files for marker in RUN_MARKERS):
            found.append(Path(current))
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found, key=_natural_key)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of metrics.jsonl; a torn last line (a crash mid-write) ends it."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _select(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _plain(tree: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """Resolve ``${a.b}`` references and ``8/255`` fractions the way the runner does.

    Used only for a run that failed before writing config_resolved.yaml, so that it is grouped with
    the finished runs of the same configuration (whose saved config has plain numbers).
    """
    if isinstance(tree, dict):
        return {k: _plain(v, root, depth) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_plain(v, root, depth) for v in tree]
    if not isinstance(tree, str) or depth > 8:
        return tree
    whole = _INTERPOLATION.fullmatch(tree.strip())
    if whole:
        return _plain(_select(root, whole.group(1)), root, depth + 1)
    if "${" in tree:
        return _INTERPOLATION.sub(
            lambda m: str(_plain(_select(root, m.group(1)), root, depth + 1)), tree
        )
    fraction = _FRACTION.match(tree)
    if fraction and float(fraction.group(2)) != 0:
        return float(fraction.group(1)) / float(fraction.group(2))
    return tree


def load_config(run_dir: Path) -> dict[str, Any]:
    """config_resolved.yaml (every value the run used), else the composed .hydra/config.yaml."""
    resolved = _read_yaml(run_dir / "config_resolved.yaml")
    if isinstance(resolved, dict):
        return resolved
    composed = _read_yaml(run_dir / ".hydra" / "config.yaml")
    if isinstance(composed, dict):
        return _plain(composed, composed)
    return {}


def load_run(run_dir: Path) -> Run:
    status_file = _read_json(run_dir / "status.json") or {}
    summary = _read_json(run_dir / "summary.json")
    status = str(status_file.get("status") or ("completed" if summary else "incomplete"))
    if summary is not None and status in ("running", "interrupted"):
        # The summary is written before the final status: the training itself finished.
        status = "completed"
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    return Run(
        path=run_dir,
        status=status,
        error=status_file.get("error"),
        config=load_config(run_dir),
        overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
        summary=summary,
        rows=read_rows(run_dir / "metrics.jsonl"),
    )


def collect_runs(paths: list[Path]) -> list[Run]:
    """Load every run below each path once (overlapping paths do not duplicate runs)."""
    seen: set[Path] = set()
    runs: list[Run] = []
    for path in paths:
        for run_dir in find_run_dirs(path):
            key = run_dir.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(load_run(run_dir))
    return runs


TARGET_FIELDS = ("train_seconds", "epoch", "iteration", "forward_passes", "backward_passes")


def first_crossing(rows: list[dict[str, Any]], metric: str, target: float) -> dict[str, Any] | None:
    """The first metrics row at which ``metric`` (an error) is at or below ``target``: the rule
    the runner uses for summary.json's time_to_target, applied to a level chosen afterwards."""
    for row in rows:
        value = row.get(metric)
        if isinstance(value, int | float) and value <= target:
            return {f: row.get(f) for f in TARGET_FIELDS}
    return None


def add_targets(run: Run, targets: list[float], metric: str = "robust_error") -> None:
    """Add time-to-target entries for extra levels to a finished run's summary (in memory)."""
    if run.summary is None:
        return
    reached = dict(run.summary.get("time_to_target") or {})
    for target in targets:
        reached.setdefault(f"{metric}<={target:g}", first_crossing(run.rows, metric, target))
    run.summary = {**run.summary, "time_to_target": reached}
