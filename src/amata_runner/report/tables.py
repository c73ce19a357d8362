"""report.md (readable: percentages, mean ± std) and report.csv (every number, raw) from sections.

Accuracies are fractions in the CSV and percentages in the Markdown; ``±`` is the sample standard
deviation over seeds (shown from two seeds on). A target nobody reached reads "not reached"; one
reached by some seeds shows their mean and how many of how many got there.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from amata_runner.report.aggregate import Configuration, Stat
from amata_runner.report.sections import Section, comparable, metric_kind, ours, target_stat

DASH = "—"
NOT_REACHED = "not reached"


def _number(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def fmt_stat(s: Stat, scale: float = 1.0, digits: int = 2) -> str:
    if s.mean is None:
        return DASH
    text = _number(s.mean * scale, digits)
    if s.std is not None:
        text += f" ± {s.std * scale:.{digits}f}"
    return text


def si(value: float | None) -> str:
    """Pass counts are large: 5.75e9 reads as 5.75G."""
    if value is None:
        return DASH
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def fmt_passes(s: Stat) -> str:
    if s.mean is None:
        return DASH
    return si(s.mean) + (f" ± {si(s.std)}" if s.std else "")


def fmt_ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def fmt_kind(value: Any, kind: str) -> str:
    """A published number or one of ours (a Stat over seeds, or a ratio) in the metric's unit."""
    if isinstance(value, Stat):
        if kind == "acc":
            return fmt_stat(value, 100)
        return fmt_stat(value, digits=1 if kind == "seconds" else 3)
    if not isinstance(value, int | float):
        return DASH if value is None else str(value)
    if kind == "acc":
        return f"{100 * value:.2f}"
    if kind == "seconds":
        return f"{value:.1f}"
    if kind == "ratio":
        return fmt_ratio(value)
    return f"{value:.4g}"


def metric_label(metric: str, target: str | None) -> str:
    labels = {
        "clean_accuracy": "clean %",
        "robust_accuracy": "robust %",
        "train_seconds": "train s",
        "train_seconds_ratio": "time vs baseline",
        "time_to_target_seconds": f"s to {target}" if target else "s to target",
        "time_to_target_ratio": "to-target time vs baseline",
    }
    if metric in labels:
        return labels[metric]
    if metric.startswith("robust_accuracy."):
        return metric.removeprefix("robust_accuracy.") + " %"
    return metric


def target_cell(config: Configuration, key: str) -> tuple[str, str]:
    """(seconds, passes) to a target, as text."""
    target = config.targets.get(key)
    if target is None:
        return DASH, DASH
    if target.reached == 0:
        return NOT_REACHED, NOT_REACHED
    share = f" ({target.reached}/{target.of})" if target.reached < target.of else ""
    return fmt_stat(target.seconds, digits=1) + share, fmt_passes(target.passes) + share


def target_passes(config: Configuration | None, key: str) -> Stat:
    target = config.targets.get(key) if config else None
    return target.passes if target else Stat([])


def ratio_pair(ours: tuple[Stat, Stat], baseline: tuple[Stat, Stat] | None) -> str:
    """``0.62× / 0.60×``: (seconds, passes) relative to the baseline's. Passes do not depend on
    the machine or on what else it was running, so they are the check on the seconds."""
    if baseline is None:
        return DASH
    by_time, by_passes = (_ratio(o, b) for o, b in zip(ours, baseline, strict=True))
    if by_time is None and by_passes is None:
        return DASH
    return f"{fmt_ratio(by_time)} / {fmt_ratio(by_passes)}"


def _ratio(ours: Stat, theirs: Stat) -> float | None:
    return None if ours.mean is None or not theirs.mean else ours.mean / theirs.mean


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _drop_empty_columns(header: list[str], rows: list[list[str]]) -> tuple[list, list]:
    """Columns with nothing to say in any row (all dashes; "failed" all zero) are left out."""
    keep = []
    for i, name in enumerate(header):
        cells = [r[i] for r in rows]
        empty = all(c in (DASH, "") for c in cells) or (
            name == "failed" and all(c == "0" for c in cells)
        )
        if i == 0 or not empty:
            keep.append(i)
    return [header[i] for i in keep], [[r[i] for i in keep] for r in rows]


def repeated_seeds_note(section: Section) -> str | None:
    """Said when runs of one configuration share a seed: their spread is not seed variance."""
    parts = []
    for config in section.configs:
        repeats = config.repeated_seeds
        if repeats:
            which = ", ".join(f"seed {seed} ×{n}" for seed, n in repeats.items())
            parts.append(f"{config.row} ({which})")
    if not parts:
        return None
    return (
        "Runs repeat a seed in " + "; ".join(parts) + ": the seeds column counts distinct "
        "seeds, and the ± over repeated seeds measures run-to-run nondeterminism, not the "
        "spread over seeds."
    )


def results_table(section: Section) -> str:
    header = ["row", "config", "seeds", "failed", "clean acc %"]
    header += [f"{a} acc %" for a in section.attacks]
    header += ["train s", "passes (fwd+bwd)", "vs baseline (s / passes)"]
    for key in section.targets:
        header += [f"s to {key}", f"passes to {key}", f"vs baseline (s / passes to {key})"]
    header += ["device", "status"]
    rows = []
    for config in section.configs:
        base = config.baseline
        cells = [
            config.row,
            config.label if config.label and config.label != config.row else DASH,
            config.seeds_text(),
            str(len(config.failed)),
            fmt_stat(config.clean_accuracy, 100),
        ]
        cells += [fmt_stat(config.robust_accuracy.get(a, Stat([])), 100) for a in section.attacks]
        totals = (config.train_seconds, config.passes)
        cells += [
            fmt_stat(config.train_seconds, digits=1),
            fmt_passes(config.passes),
            ratio_pair(totals, (base.train_seconds, base.passes) if base else None),
        ]
        for key in section.targets:
            seconds, passes = target_cell(config, key)
            mine = (target_stat(config, key), target_passes(config, key))
            theirs = (target_stat(base, key), target_passes(base, key)) if base else None
            cells += [seconds, passes, ratio_pair(mine, theirs)]
        cells += [config.devices or DASH, config.status_text()]
        rows.append(cells)
    return _md_table(*_drop_empty_columns(header, rows))


def paper_table(section: Section) -> str | None:
    """Published rows with our value beside each published one."""
    paper_rows = section.paper_rows()
    if not paper_rows:
        return None
    target = (section.paper or {}).get("target")
    metrics: list[str] = []
    for row in paper_rows.values():
        metrics += [m for m in row if m not in metrics and comparable(section, m)]
    header = ["row"]
    for metric in metrics:
        label = metric_label(metric, target)
        header += [f"{label} (ours)", f"{label} (paper)"]
    rows = []
    for name, published in paper_rows.items():
        matches = section.configs_for_row(name) or [None]
        for config in matches:  # several when the sweep ran the row in several variants
            cells = [config.row if config else f"{name} (not run)"]
            for metric in metrics:
                kind = metric_kind(metric)
                mine = fmt_kind(ours(config, metric, target), kind) if config else DASH
                cells += [mine, fmt_kind(published.get(metric), kind)]
            rows.append(cells)
    return _md_table(header, rows)


def markdown(sections: list[Section], sources: list[str], plots: dict[str, list[str]]) -> str:
    runs = sum(len(c.runs) for s in sections for c in s.configs)
    lines = [
        "# amata-report",
        "",
        f"{plural(runs, 'run')} from: " + ", ".join(f"`{s}`" for s in sources),
        "",
        "Every number below was read from the runs' summary.json / metrics.jsonl files; the "
        "*paper* columns are the published values, measured on the paper's hardware. How each "
        "number was selected: accuracies are the final model's (the last epoch, nothing "
        "selected) on the full test set (mean ± sample std over seeds); times are train-only "
        "seconds; targets are the first evaluation point on the fixed test subset at or below "
        "the error (read off the test curve, not a choice); best.ckpt, chosen on the validation "
        "split, is not used here.",
    ]
    for section in sections:
        lines += ["", f"## {section.title}", "", f"{section.description}."]
        if section.eval_attack:
            lines += [
                "",
                f"Robust error (curves, targets): {section.eval_attack}, the evaluation subset "
                "measured at every evaluation point; the accuracy columns are the final attacks "
                "on the whole test set.",
            ]
        lines += ["", results_table(section)]
        note = repeated_seeds_note(section)
        if note:
            lines += ["", note]
        compared = paper_table(section)
        if compared:
            paper = section.paper or {}
            source = ", ".join(
                str(paper[k]) for k in ("source", "hardware", "target") if paper.get(k)
            )
            lines += ["", f"### Published numbers ({source})", ""]
            if paper.get("note"):
                lines += [str(paper["note"]).strip(), ""]
            lines += [compared]
        images = plots.get(section.title, [])
        if images:
            lines += [
                "",
                f"Error curves (TensorBoard smoothing {section.smoothing:g}; thin lines: seeds, "
                "thick: their mean):",
                "",
            ]
            lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def csv_text(sections: list[Section]) -> str:
    records: list[dict[str, Any]] = []
    for section in sections:
        paper_rows = section.paper_rows()
        for config in section.configs:
            base = config.baseline
            record: dict[str, Any] = {
                "section": section.title,
                "row": config.row,
                "config": config.label,
                "seeds": len(set(map(str, config.seeds))),
                "runs": len(config.completed),
                "failed": len(config.failed),
                "status": config.status_text(),
                "device": config.devices,
                "baseline": base.row if base else "",
                "smoothing": section.smoothing,
            }

            def put(name: str, s: Stat, record: dict[str, Any] = record) -> None:
                record[f"{name}_mean"] = s.mean
                record[f"{name}_std"] = s.std

            put("clean_acc", config.clean_accuracy)
            for attack, s in config.robust_accuracy.items():
                put(f"{attack}_acc", s)
            put("train_seconds", config.train_seconds)
            put("forward_passes", config.forward_passes)
            put("backward_passes", config.backward_passes)
            put("passes", config.passes)
            record["time_ratio"] = (
                config.ratio(config.train_seconds, base.train_seconds) if base else None
            )
            record["passes_ratio"] = config.ratio(config.passes, base.passes) if base else None
            for key, target in config.targets.items():
                put(f"to[{key}]_seconds", target.seconds)
                put(f"to[{key}]_passes", target.passes)
                record[f"to[{key}]_reached"] = f"{target.reached}/{target.of}"
                record[f"to[{key}]_ratio"] = (
                    config.ratio(target.seconds, target_stat(base, key)) if base else None
                )
                record[f"to[{key}]_passes_ratio"] = (
                    config.ratio(target.passes, target_passes(base, key)) if base else None
                )
            for metric, value in paper_rows.get(config.row_key, {}).items():
                record[f"paper_{metric}"] = value
            records.append(record)
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return buffer.getvalue()
