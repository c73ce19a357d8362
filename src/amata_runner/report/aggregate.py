"""Group runs into configurations (the same settings but the seed) and summarise each over seeds.

Two runs belong to one configuration when their configs agree on every key except those that do
not change what is computed (seed, name, paths, logger, progress, resume) or only document it (the
``paper`` block, ``report.smoothing``). A configuration is named by its ``report.row`` (set by the
paper experiments) and described by the command-line overrides that differ between the
configurations of its section, so a sweep's table reads like its command line.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from amata_runner.report.runs import Run

IGNORED_TOP = ("seed", "name", "paths", "logger", "progress", "resume", "paper", "hydra")
IGNORED_KEYS = ("report.smoothing",)
# TensorBoard smoothing weights the paper used (Appendix A.1 / A.2) by dataset; TensorBoard's own
# default (0.6) for the rest.
SMOOTHING_BY_DATASET = {"cifar10": 0.6, "mnist": 0.09, "fashion_mnist": 0.09, "digits": 0.09}
DEFAULT_SMOOTHING = 0.6
# Keys that name a configuration best when they are what differs, most telling first.
LABEL_PRIORITY = (
    "method.name",
    "schedule.name",
    "model.name",
    "dataset.name",
    "epochs",
    "method.steps",
    "method.step_size",
    "schedule.k_min",
    "schedule.k_max",
    "schedule.eta",
    "optim.lr",
    "batch_size",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def config_key(config: dict[str, Any]) -> str:
    flat = flatten(config)
    kept = {
        k: v
        for k, v in flat.items()
        if k.split(".")[0] not in IGNORED_TOP and k not in IGNORED_KEYS
    }
    return json.dumps(kept, sort_keys=True, default=str)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_ignored_override(override: str) -> bool:
    key = _override_key(override)
    return key.split(".")[0] in IGNORED_TOP or key.startswith("hydra.") or key in IGNORED_KEYS


@dataclass
class Stat:
    """Mean and sample standard deviation of one quantity over the seeds that have it."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def stat(values: list[Any]) -> Stat:
    return Stat([float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)])


@dataclass
class Target:
    """Time and passes to one target error (``robust_error<=0.55``) over the seeds reaching it."""

    key: str
    seconds: Stat
    passes: Stat
    reached: int
    of: int


@dataclass
class Configuration:
    runs: list[Run]
    key: str
    row: str = ""
    label: str = ""
    baseline: Configuration | None = None
    clean_accuracy: Stat = field(default_factory=lambda: Stat([]))
    robust_accuracy: dict[str, Stat] = field(default_factory=dict)
    train_seconds: Stat = field(default_factory=lambda: Stat([]))
    forward_passes: Stat = field(default_factory=lambda: Stat([]))
    backward_passes: Stat = field(default_factory=lambda: Stat([]))
    passes: Stat = field(default_factory=lambda: Stat([]))
    targets: dict[str, Target] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if not r.ok]

    @property
    def report_node(self) -> dict[str, Any]:
        node = self.config.get("report")
        return node if isinstance(node, dict) else {}

    @property
    def row_key(self) -> str:
        """The table row this configuration runs: ``report.row`` (or a ``paper.row``)."""
        paper = self.config.get("paper")
        row = self.report_node.get("row")
        if row is None and isinstance(paper, dict):
            row = paper.get("row")
        return "" if row is None else str(row)

    @property
    def seeds(self) -> list[Any]:
        """The seed of each completed run, in run order (repeats kept)."""
        found = []
        for run in self.completed:
            seed = run.config.get("seed")
            if seed is None and run.summary:
                seed = run.summary.get("seed")
            found.append(seed)
        return found

    @property
    def repeated_seeds(self) -> dict[Any, int]:
        """Seeds that more than one completed run used, with how many runs used each."""
        counts: dict[Any, int] = {}
        for seed in self.seeds:
            counts[seed] = counts.get(seed, 0) + 1
        return {seed: n for seed, n in counts.items() if n > 1}

    def seeds_text(self) -> str:
        """Distinct seeds; ``1 (3 runs, seed 0 ×3)`` when runs repeat a seed."""
        distinct = len(set(map(str, self.seeds)))
        repeats = self.repeated_seeds
        if not repeats:
            return str(distinct)
        which = ", ".join(f"seed {seed} ×{n}" for seed, n in repeats.items())
        return f"{distinct} ({len(self.seeds)} runs: {which})"

    @property
    def devices(self) -> str:
        found = {str(r.summary.get("device")) for r in self.completed if r.summary}
        return ", ".join(sorted(found))

    def status_text(self) -> str:
        if not self.failed:
            return "ok"
        parts = []
        for run in self.failed:
            detail = run.status if run.status != "completed" else "no summary"
            if run.error:
                detail += ": " + run.error.splitlines()[0][:160]
            parts.append(f"job {run.path.name} {detail}")
        return "; ".join(parts)

    def ratio(self, ours: Stat, theirs: Stat) -> float | None:
        if ours.mean is None or not theirs.mean:
            return None
        return ours.mean / theirs.mean


def summarise(config: Configuration) -> None:
    """Fill the per-seed statistics from the summary.json of each completed run."""
    summaries = [r.summary for r in config.completed if r.summary is not None]
    finals = [s.get("final") or {} for s in summaries]
    config.clean_accuracy = stat([f.get("clean_accuracy") for f in finals])
    attacks: list[str] = []
    for final in finals:
        for name in final.get("robust_accuracy") or {}:
            if name not in attacks:
                attacks.append(name)
    config.robust_accuracy = {
        name: stat([(f.get("robust_accuracy") or {}).get(name) for f in finals]) for name in attacks
    }
    config.train_seconds = stat([s.get("train_seconds") for s in summaries])
    config.forward_passes = stat([s.get("forward_passes") for s in summaries])
    config.backward_passes = stat([s.get("backward_passes") for s in summaries])
    config.passes = stat(
        [
            s["forward_passes"] + s["backward_passes"]
            for s in summaries
            if isinstance(s.get("forward_passes"), int | float)
            and isinstance(s.get("backward_passes"), int | float)
        ]
    )
    keys: list[str] = []
    for summary in summaries:
        for key in summary.get("time_to_target") or {}:
            if key not in keys:
                keys.append(key)
    for key in keys:
        hits = [(s.get("time_to_target") or {}).get(key) for s in summaries]
        reached = [h for h in hits if isinstance(h, dict)]
        config.targets[key] = Target(
            key=key,
            seconds=stat([h.get("train_seconds") for h in reached]),
            passes=stat(
                [
                    h["forward_passes"] + h["backward_passes"]
                    for h in reached
                    if h.get("forward_passes") is not None and h.get("backward_passes") is not None
                ]
            ),
            reached=len(reached),
            of=len(summaries),
        )


def group_runs(runs: list[Run]) -> list[Configuration]:
    """Configurations in order of their first run."""
    by_key: dict[str, Configuration] = {}
    for run in runs:
        key = config_key(run.config)
        if key not in by_key:
            by_key[key] = Configuration(runs=[], key=key)
        by_key[key].runs.append(run)
    configs = list(by_key.values())
    for config in configs:
        summarise(config)
    return configs


def _distinct_overrides(config: Configuration) -> list[str]:
    found: list[str] = []
    for run in config.runs:
        for override in run.overrides:
            if not _is_ignored_override(override) and override not in found:
                found.append(override)
    return found


def _differing_keys(configs: list[Configuration]) -> list[str]:
    flats = [json.loads(c.key) for c in configs]
    keys = sorted({k for flat in flats for k in flat})
    return [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]


def name_configurations(configs: list[Configuration]) -> None:
    """Set each configuration's ``label`` (what varies) and ``row`` (its name in the table)."""
    overrides = {id(c): _distinct_overrides(c) for c in configs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if configs else set()
    differing = _differing_keys(configs)
    for config in configs:
        own = [o for o in overrides[id(config)] if len(configs) == 1 or o not in shared]
        if not own and len(configs) > 1:  # runs given one by one: name them by what differs
            flat = json.loads(config.key)
            own = [f"{k}={_short(flat.get(k))}" for k in sorted(differing, key=_priority)[:3]]
        config.label = " ".join(own)
    rows = [c.row_key for c in configs]
    for config, row in zip(configs, rows, strict=True):
        if not row:
            config.row = config.label or "run"
            continue
        twins = [c for c in configs if c.row_key == row]
        common = set.intersection(*(set(overrides[id(c)]) for c in twins))
        extra = [o for o in overrides[id(config)] if o not in common]  # what tells twins apart
        config.row = f"{row} [{' '.join(extra)}]" if len(twins) > 1 and extra else row


def _priority(key: str) -> tuple[int, str]:
    order = LABEL_PRIORITY.index(key) if key in LABEL_PRIORITY else len(LABEL_PRIORITY)
    return order, key


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def link_baselines(configs: list[Configuration]) -> None:
    """Each configuration's baseline: the configuration whose ``report.row`` is its
    ``report.baseline`` (the experiment names it; it may depend on the run, e.g. the PGD run
    evaluated with the same attack). Among several candidates, the one sharing most overrides."""
    for config in configs:
        wanted = config.report_node.get("baseline")
        if not wanted:
            continue
        candidates = [c for c in configs if c.row_key == str(wanted)]
        if not candidates:
            continue
        mine = set(_distinct_overrides(config))
        config.baseline = max(candidates, key=lambda c: len(mine & set(_distinct_overrides(c))))


def set_baseline(configs: list[Configuration], wanted: str) -> bool:
    """Take every ratio against the configuration named ``wanted`` (its row or its label);
    False when no configuration is so named."""
    chosen = next((c for c in configs if wanted in (c.row, c.row_key, c.label) and wanted), None)
    if chosen is None:
        return False
    for config in configs:
        config.baseline = chosen
    return True


def smoothing_for(configs: list[Configuration], override: float | None) -> float:
    """The command line's weight, else the experiment's ``report.smoothing``, else the paper's
    weight for the dataset (0.6 CIFAR10, 0.09 MNIST-like), else TensorBoard's default 0.6."""
    if override is not None:
        return float(override)
    for config in configs:
        weight = config.report_node.get("smoothing")
        if isinstance(weight, int | float):
            return float(weight)
    for config in configs:
        dataset = (config.config.get("dataset") or {}).get("name")
        if dataset in SMOOTHING_BY_DATASET:
            return SMOOTHING_BY_DATASET[dataset]
    return DEFAULT_SMOOTHING
