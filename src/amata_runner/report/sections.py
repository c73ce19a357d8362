"""A report section: the configurations of one experiment and the paper's numbers for them.

An experiment names its rows and the published values in two blocks of its config:

- ``report``: ``title`` (the section heading), ``row`` (this run's row), ``baseline`` (the row
  ratios are taken against; it may be an interpolation, e.g. the PGD row with the same evaluation
  attack) and ``smoothing`` (the TensorBoard weight of the curves);
- ``paper``: ``source``, ``hardware``, ``target`` (the time-to-target key the paper quotes, as
  summary.json spells it: ``robust_error<=0.55``), ``note`` and ``rows.<row>`` with any of
  ``clean_accuracy``, ``robust_accuracy`` (a number: under the run's first final attack; or a
  mapping attack -> accuracy, ``{pgd20: 0.4762, cw_l2: 0.5294}``), ``train_seconds``,
  ``time_to_target_seconds``, ``train_seconds_ratio`` and ``time_to_target_ratio`` (to the
  baseline row; derived when the paper gives both times), and any other key that summary.json
  holds under the same name (e.g. the criterion ``C``). Accuracies are fractions.
  ``paper.row`` stands in for ``report.row`` and ``paper.table`` for the title.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from amata_runner.errors import ConfigError
from amata_runner.report.aggregate import (
    Configuration,
    Stat,
    group_runs,
    link_baselines,
    name_configurations,
    set_baseline,
    smoothing_for,
    stat,
)
from amata_runner.report.runs import Run

UNTITLED = "Runs"
# How titles spell the datasets (an experiment's title names the dataset it was written for).
DATASET_NAMES = {
    "cifar10": "CIFAR10",
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "digits": "digits",
    "caltech256": "Caltech256",
    "imagenet": "ImageNet",
    "synthetic": "synthetic",
}


@dataclass
class Section:
    title: str
    configs: list[Configuration]
    smoothing: float

    @property
    def attacks(self) -> list[str]:
        names: list[str] = []
        for config in self.configs:
            names += [n for n in config.robust_accuracy if n not in names]
        return names

    @property
    def targets(self) -> list[str]:
        keys: list[str] = []
        for config in self.configs:
            keys += [k for k in config.targets if k not in keys]
        return keys

    @property
    def paper(self) -> dict[str, Any] | None:
        for config in self.configs:
            paper = config.config.get("paper")
            if isinstance(paper, dict):
                return paper
        return None

    @property
    def description(self) -> str:
        """Dataset and model(s) the numbers come from, for the heading."""
        found: list[str] = []
        for config in self.configs:
            dataset = (config.config.get("dataset") or {}).get("name", "?")
            model = (config.config.get("model") or {}).get("name", "?")
            text = f"dataset {dataset}, model {model}"
            if text not in found:
                found.append(text)
        return "; ".join(found)

    @property
    def eval_attack(self) -> str:
        """What "robust error" means on the curves and targets: the periodic evaluation's attack
        and how many test images it used (``pgd10 on 512 test images``)."""
        found: list[str] = []
        for config in self.configs:
            for run in config.runs:
                for row in run.rows[-1:]:
                    attack, images = row.get("eval_attack"), row.get("eval_examples")
                    if attack is None:
                        continue
                    text = f"{attack} on {images} test images" if images else str(attack)
                    if text not in found:
                        found.append(text)
        return "; ".join(found)

    def paper_rows(self) -> dict[str, dict[str, Any]]:
        """Published rows as flat metric -> value, with the ratios the paper's numbers imply."""
        paper = self.paper or {}
        rows = {
            str(name): flatten_metrics(values)
            for name, values in (paper.get("rows") or {}).items()
            if isinstance(values, dict)
        }
        base = rows.get(self._baseline_row() or "", {})
        pairs = (
            ("train_seconds", "train_seconds_ratio"),
            ("time_to_target_seconds", "time_to_target_ratio"),
        )
        for row in rows.values():
            for total, ratio in pairs:
                known = _is_number(row.get(total)) and _is_number(base.get(total))
                if ratio not in row and known and base[total]:
                    row[ratio] = row[total] / base[total]
        return rows

    def _baseline_row(self) -> str | None:
        for config in self.configs:
            baseline = config.report_node.get("baseline")
            if baseline:
                return str(baseline)
        return None

    def configs_for_row(self, row: str) -> list[Configuration]:
        return [c for c in self.configs if c.row_key == row]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flatten_metrics(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{robust_accuracy: {pgd20: x}}`` -> ``{"robust_accuracy.pgd20": x}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def target_stat(config: Configuration | None, key: str | None) -> Stat:
    if config is None or not key or key not in config.targets:
        return Stat([])
    return config.targets[key].seconds


def _summary_value(summary: dict[str, Any], metric: str) -> Any:
    """A summary.json value by name, at the top level or one level down (``criterion.C``)."""
    if metric in summary:
        return summary[metric]
    for value in summary.values():
        if isinstance(value, dict) and metric in value:
            return value[metric]
    return None


def metric_kind(metric: str) -> str:
    if metric.startswith(("clean_accuracy", "robust_accuracy")):
        return "acc"
    if metric.endswith("_ratio"):
        return "ratio"
    if metric.endswith("_seconds"):
        return "seconds"
    return "number"


def ours(config: Configuration, metric: str, paper_target: str | None) -> Stat | float | None:
    """Our value for a paper metric: over seeds (a Stat), a ratio of means, or None if unknown."""
    base = config.baseline
    if metric == "clean_accuracy":
        return config.clean_accuracy
    if metric == "robust_accuracy":  # the run's (first) final attack
        return next(iter(config.robust_accuracy.values()), None)
    if metric.startswith("robust_accuracy."):
        return config.robust_accuracy.get(metric.removeprefix("robust_accuracy."))
    if metric == "train_seconds":
        return config.train_seconds
    if metric == "time_to_target_seconds":
        return target_stat(config, paper_target)
    if metric == "train_seconds_ratio":
        return config.ratio(config.train_seconds, base.train_seconds) if base else None
    if metric == "time_to_target_ratio":
        if base is None:
            return None
        return config.ratio(target_stat(config, paper_target), target_stat(base, paper_target))
    found = [_summary_value(r.summary or {}, metric) for r in config.completed]
    if not any(_is_number(v) for v in found):
        return None
    return stat(found)


def comparable(section: Section, metric: str) -> bool:
    """Whether our runs can say anything about a published metric (config echoes such as
    ``k_min`` in a paper row are not results and get no column)."""
    if metric_kind(metric) != "number":
        return True
    return any(ours(c, metric, None) is not None for c in section.configs)


def section_title(config: dict[str, Any]) -> str:
    report, paper = config.get("report"), config.get("paper")
    if isinstance(report, dict) and report.get("title"):
        return str(report["title"])
    if isinstance(paper, dict):
        if paper.get("title"):
            return str(paper["title"])
        if paper.get("table") is not None:
            return f"Table {paper['table']}"
        if paper.get("source"):
            return str(paper["source"])
    return UNTITLED


def retitle(title: str, runs: list[Run]) -> str:
    """An experiment's title with the dataset its runs really used: a ``dataset=digits`` sweep of
    a CIFAR10 experiment is titled "... on digits (experiment: CIFAR10)", not "... on CIFAR10"."""
    used = {str((r.config.get("dataset") or {}).get("name", "")) for r in runs} - {""}
    if len(used) != 1:
        return title
    actual = used.pop()
    spelled = DATASET_NAMES.get(actual, actual)
    for name, written in DATASET_NAMES.items():
        if name == actual:
            continue
        pattern = re.compile(rf"(?<![\w-]){re.escape(written)}(?![\w-])")
        if pattern.search(title):
            return pattern.sub(spelled, title, count=1) + f" (experiment: {written})"
    return title


def build_sections(
    runs: list[Run], smoothing: float | None = None, baseline: str | None = None
) -> list[Section]:
    """Group runs by experiment title, then into configurations; name and link each.

    ``baseline`` (amata-report's ``baseline=<row>``) replaces the experiments' own baselines;
    a name that matches no row is a ConfigError listing the rows."""
    by_title: dict[str, list[Run]] = {}
    for run in runs:
        by_title.setdefault(section_title(run.config), []).append(run)
    sections = []
    found = baseline is None
    for title, members in by_title.items():
        configs = group_runs(members)
        name_configurations(configs)
        link_baselines(configs)
        if baseline is not None:
            found = set_baseline(configs, baseline) or found
        sections.append(
            Section(retitle(title, members), configs, smoothing_for(configs, smoothing))
        )
    if not found:
        rows = [c.row for s in sections for c in s.configs]
        raise ConfigError("baseline", baseline, "one of the report's rows: " + ", ".join(rows))
    return sections
