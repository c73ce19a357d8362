"""amata-report on hand-made run directories: grouping, statistics, targets, failures, the CLI."""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from amata_runner.cli.report import main as report_main
from amata_runner.report import find_run_dirs, tensorboard_smooth, write_report
from amata_runner.report_callback import ReportCallback
from amata_runner.summary import time_to_targets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers
def make_config(method: str, seed: int = 0, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "dataset": {"name": "digits"},
        "model": {"name": "lenet"},
        "method": {"name": method, "steps": 10},
        "seed": seed,
        "name": method,
        "paths": {"data_dir": "data", "output_dir": f"/tmp/out{seed}"},
        "logger": {"name": "jsonl"},
    }
    config.update(extra)
    return config


def make_summary(
    *,
    seed: int,
    clean: float,
    robust: dict[str, float],
    seconds: float,
    passes: tuple[int, int] = (1000, 1000),
    rows: list[dict[str, Any]] | None = None,
    targets: list[float] = (),
) -> dict[str, Any]:
    return {
        "status": "completed",
        "seed": seed,
        "device": "cpu",
        "train_seconds": seconds,
        "forward_passes": passes[0],
        "backward_passes": passes[1],
        "time_to_target": time_to_targets(rows or [], "robust_error", list(targets)),
        "final": {"examples": 100, "clean_accuracy": clean, "robust_accuracy": robust},
    }


def make_run(
    run_dir: Path,
    config: dict[str, Any],
    *,
    overrides: list[str] = (),
    status: str = "completed",
    summary: dict[str, Any] | None = None,
    rows: list[dict[str, Any]] | None = None,
    error: str | None = None,
) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (run_dir / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    payload = {"status": status, **({"error": error} if error else {})}
    (run_dir / "status.json").write_text(json.dumps(payload))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = [json.dumps(r) for r in rows or []]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return run_dir


def metric_rows(errors: list[float], seconds_per_row: float = 10.0) -> list[dict[str, Any]]:
    return [
        {
            "epoch": i + 1,
            "iteration": 10 * (i + 1),
            "train_seconds": seconds_per_row * (i + 1),
            "forward_passes": 100 * (i + 1),
            "backward_passes": 100 * (i + 1),
            "clean_error": e / 2,
            "robust_error": e,
        }
        for i, e in enumerate(errors)
    ]


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["row"]: row for row in csv.DictReader(handle)}


# --------------------------------------------------------------------------- smoothing
def test_tensorboard_smoothing_matches_a_hand_computed_debiased_ema() -> None:
    # w = 0.6: last = 0.4, 0.24, 0.544, 0.3264; debias 1 - 0.6^n = 0.4, 0.64, 0.784, 0.8704
    assert tensorboard_smooth([1, 0, 1, 0], 0.6) == pytest.approx(
        [1.0, 0.375, 0.544 / 0.784, 0.375]
    )
    # the paper's MNIST weight: 0.5, then (0.09 * 0.455 + 0.91 * 0.3) / (1 - 0.09^2)
    assert tensorboard_smooth([0.5, 0.3], 0.09) == pytest.approx(
        [0.5, (0.09 * 0.455 + 0.273) / (1 - 0.0081)]
    )


def test_smoothing_edge_cases_follow_tensorboard() -> None:
    assert tensorboard_smooth([0.3, 0.7, 0.1], 0.0) == pytest.approx([0.3, 0.7, 0.1])
    assert tensorboard_smooth([0.25, 0.25, 0.25], 0.9) == [0.25, 0.25, 0.25]  # constant: as is
    smoothed = tensorboard_smooth([1.0, math.nan, 0.0], 0.5)
    # NaN passes through and is not counted: the third point is the second accumulated one
    assert smoothed[0] == 1.0 and math.isnan(smoothed[1])
    assert smoothed[2] == pytest.approx(0.25 / 0.75)


# --------------------------------------------------------------------------- discovery
def test_run_directories_are_found_in_trees_but_not_inside_runs(tmp_path: Path) -> None:
    for sweep, jobs in (("a", (0, 2, 10)), ("b/nested", (1,))):
        for job in jobs:
            make_run(tmp_path / sweep / str(job), make_config("pgd"))
    inner = tmp_path / "a" / "0" / "wandb" / "run-1"
    inner.mkdir(parents=True)
    (inner / "metrics.jsonl").write_text("")  # inside a run: not a run of its own
    found = [p.relative_to(tmp_path).as_posix() for p in find_run_dirs(tmp_path)]
    assert found == ["a/0", "a/2", "a/10", "b/nested/1"]
    assert find_run_dirs(tmp_path / "a" / "2") == [tmp_path / "a" / "2"]


# --------------------------------------------------------------------------- numbers
def test_seeds_are_grouped_and_the_numbers_are_their_mean_and_std(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    numbers = {
        ("pgd", 0): (0.80, {"pgd20": 0.40, "cw_l2": 0.45}, 100.0),
        ("pgd", 1): (0.82, {"pgd20": 0.44, "cw_l2": 0.47}, 110.0),
        ("amata", 0): (0.84, {"pgd20": 0.41, "cw_l2": 0.46}, 60.0),
        ("amata", 1): (0.83, {"pgd20": 0.43, "cw_l2": 0.50}, 70.0),
    }
    for job, ((method, seed), (clean, robust, seconds)) in enumerate(numbers.items()):
        make_run(
            sweep / str(job),
            make_config(method, seed),
            overrides=[f"method={method}", f"seed={seed}", "epochs=3"],
            summary=make_summary(seed=seed, clean=clean, robust=robust, seconds=seconds),
        )
    report = write_report([sweep], sweep, plots=False)
    table = read_csv(report.csv)
    assert set(table) == {"method=pgd", "method=amata"}  # named by what varies (not seed, epochs)
    for method in ("pgd", "amata"):
        row = table[f"method={method}"]
        mine = [v for (m, _), v in numbers.items() if m == method]
        assert row["seeds"] == "2" and row["failed"] == "0"
        assert float(row["clean_acc_mean"]) == pytest.approx(statistics.fmean(v[0] for v in mine))
        assert float(row["clean_acc_std"]) == pytest.approx(statistics.stdev(v[0] for v in mine))
        for attack in ("pgd20", "cw_l2"):
            values = [v[1][attack] for v in mine]
            assert float(row[f"{attack}_acc_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["train_seconds_mean"]) == pytest.approx(
            statistics.fmean(v[2] for v in mine)
        )
        assert float(row["passes_mean"]) == 2000
    text = report.markdown.read_text()
    assert "| method=pgd |" in text and "81.00 ± 1.41" in text  # clean accuracy in percent


def test_ratio_to_the_baseline_and_paper_numbers_side_by_side(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    paper = {
        "source": "Table 9",
        "hardware": "a GTX 1080 Ti",
        "rows": {
            "pgd10": {
                "clean_accuracy": 0.85,
                "robust_accuracy": {"pgd20": 0.47},
                "train_seconds": 200.0,
            },
            "amata": {
                "clean_accuracy": 0.86,
                "robust_accuracy": {"pgd20": 0.48},
                "train_seconds": 120.0,
            },
            "fosc": {"clean_accuracy": 0.84},
        },
    }
    for job, (row, seconds) in enumerate((("pgd10", 100.0), ("amata", 55.0))):
        config = make_config(
            "pgd" if row == "pgd10" else "amata",
            report={"title": "Table 9", "row": row, "baseline": "pgd10", "smoothing": 0.6},
            paper=paper,
        )
        summary = make_summary(seed=0, clean=0.8, robust={"pgd20": 0.4}, seconds=seconds)
        make_run(sweep / str(job), config, summary=summary)
    report = write_report([sweep], sweep, plots=False)
    table = read_csv(report.csv)
    assert float(table["amata"]["time_ratio"]) == pytest.approx(0.55)
    assert float(table["pgd10"]["time_ratio"]) == pytest.approx(1.0)
    assert float(table["amata"]["passes_ratio"]) == 1.0  # same passes: only the seconds differ
    assert float(table["amata"]["paper_train_seconds"]) == 120.0
    assert float(table["amata"]["paper_train_seconds_ratio"]) == pytest.approx(0.6)  # derived
    text = report.markdown.read_text()
    assert "## Table 9" in text and "### Published numbers (Table 9, a GTX 1080 Ti)" in text
    paper_lines = [line for line in text.splitlines() if line.startswith("| amata | 80.00")]
    assert paper_lines and "86.00" in paper_lines[0] and "0.55×" in paper_lines[0]
    assert "| fosc (not run) |" in text
    assert "| 0.55× / 1.00× |" in text  # seconds and passes against the baseline


def test_time_to_target_is_the_first_crossing_and_not_reached_otherwise(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    targets = [0.55, 0.3]
    curves = {0: [0.8, 0.5, 0.6, 0.4], 1: [0.9, 0.7, 0.6, 0.58]}  # seed 1 never gets to 0.55
    for seed, errors in curves.items():
        rows = metric_rows(errors)
        summary = make_summary(
            seed=seed, clean=0.9, robust={"pgd20": 0.5}, seconds=40.0, rows=rows, targets=targets
        )
        make_run(sweep / str(seed), make_config("amata", seed), summary=summary, rows=rows)
    report = write_report([sweep], sweep, plots=False, targets=[0.7])
    (row,) = read_csv(report.csv).values()
    # a level chosen afterwards is found on the rows by the same rule: both seeds' second row
    assert row["to[robust_error<=0.7]_reached"] == "2/2"
    assert float(row["to[robust_error<=0.7]_seconds_mean"]) == 20.0
    # seed 0 crosses 0.55 at its second evaluation (20 s, 400 passes), not at the fourth
    assert float(row["to[robust_error<=0.55]_seconds_mean"]) == 20.0
    assert float(row["to[robust_error<=0.55]_passes_mean"]) == 400
    assert row["to[robust_error<=0.55]_reached"] == "1/2"
    assert row["to[robust_error<=0.3]_reached"] == "0/2"
    assert row["to[robust_error<=0.3]_seconds_mean"] == ""
    lines = report.markdown.read_text().splitlines()
    table_line = next(line for line in lines if line.startswith("| run"))
    assert "20.0 (1/2)" in table_line and "not reached" in table_line


def test_failed_and_unfinished_jobs_show_as_failed(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = make_summary(seed=0, clean=0.9, robust={"pgd20": 0.5}, seconds=10.0)
    make_run(sweep / "0", make_config("pgd", 0), overrides=["method=pgd", "seed=0"], summary=done)
    make_run(
        sweep / "1",
        make_config("pgd", 1),
        overrides=["method=pgd", "seed=1"],
        status="failed",
        error="RuntimeError: boom",
    )
    make_run(
        sweep / "2", make_config("amata", 0), overrides=["method=amata", "seed=0"], status="running"
    )
    report = write_report([sweep], sweep, plots=False)
    table = read_csv(report.csv)
    assert (table["method=pgd"]["seeds"], table["method=pgd"]["failed"]) == ("1", "1")
    assert "failed: RuntimeError: boom" in table["method=pgd"]["status"]
    assert float(table["method=pgd"]["clean_acc_mean"]) == 0.9  # the failed seed adds nothing
    assert (table["method=amata"]["seeds"], table["method=amata"]["failed"]) == ("0", "1")
    assert "running" in table["method=amata"]["status"]
    lines = report.markdown.read_text().splitlines()
    line = next(line for line in lines if "| method=amata |" in line)
    assert "| 0 | 1 |" in line and "running" in line


def test_plots_are_png_files_linked_from_the_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        rows = metric_rows([0.9, 0.7, 0.6], seconds_per_row=5.0 + seed)
        summary = make_summary(seed=seed, clean=0.9, robust={"pgd20": 0.5}, seconds=15.0)
        make_run(sweep / str(seed), make_config("amata", seed), summary=summary, rows=rows)
    report = write_report([sweep], sweep)
    assert sorted(p.name for p in report.plots) == ["error_vs_passes.png", "error_vs_seconds.png"]
    for path in report.plots:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert f"![{path.name}]({path.name})" in report.markdown.read_text()


# --------------------------------------------------------------------------- CLI and callback
def _one_run(root: Path) -> Path:
    summary = make_summary(seed=0, clean=0.9, robust={"pgd20": 0.5}, seconds=10.0)
    return make_run(root / "0", make_config("pgd"), summary=summary)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing-dir"], "dirs='missing-dir': no such directory"),
        (["EMPTY"], "no run directories"),
        (["RUNS", "smoothing=1"], "smoothing=1.0: must be in [0, 1)"),
        (["RUNS", "RUNS"], "out=None: required with several directories"),
        (["RUNS", "colour=red"], "unknown key"),
        (["RUNS", "targets=[2]"], "targets=[2.0]: errors must be in [0, 1]"),
    ],
)
def test_cli_errors_are_one_line_with_exit_status_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args,
    needle,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    _one_run(tmp_path / "RUNS")
    with pytest.raises(SystemExit) as exit_info:
        report_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amata-report: error:") and needle in err[0]


def test_cli_writes_the_report_where_asked_with_the_smoothing_given(tmp_path: Path) -> None:
    _one_run(tmp_path / "runs")
    with pytest.raises(SystemExit) as exit_info:
        report_main(
            [str(tmp_path / "runs"), f"out={tmp_path / 'out'}", "smoothing=0.3", "plots=false"]
        )
    assert exit_info.value.code == 0
    (row,) = read_csv(tmp_path / "out" / "report.csv").values()
    assert float(row["smoothing"]) == 0.3
    assert not (tmp_path / "runs" / "report.md").exists()


def test_callback_writes_the_sweep_report_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    _one_run(sweep)
    callback = ReportCallback(plots=False)
    callback.on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "report.md").is_file() and (sweep / "report.csv").is_file()
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        callback.on_multirun_end(
            config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "empty")}}})
        )
    assert "could not write the sweep report" in caplog.text
    # after a job of a single run (not a multirun) it does nothing
    callback.on_job_end(config=OmegaConf.create({"hydra": {"mode": "RUN", "sweep": {"dir": "x"}}}))
    assert not Path("x").exists()
