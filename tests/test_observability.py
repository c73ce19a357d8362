"""What a run tells its user when nobody watches a terminal (nohup, SLURM, ``> out 2> err``).

One real ``amata-run`` (stdout and stderr redirected to files) is stopped by SIGTERM after its
first evaluation point and continued with the exact command its error line prints; the two halves
are checked for: the run directory first, one line per evaluation point, the "evaluating" line,
the closing line (with the numbers of summary.json), a non-empty train.log, provenance in
summary.json, and the TensorBoard scalars read back with TensorBoard's own reader. The report
checks use hand-made run directories (no training).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from amata_runner.logging.metrics import read_rows
from amata_runner.logging.progress import closing_line, count, resume_command, seconds
from amata_runner.report import build_sections, collect_runs, write_report
from amata_runner.report.plots import mean_curve
from amata_runner.report.tables import results_table
from amata_runner.runtime.interrupts import PREEMPTED_EXIT
from conftest import FAST

ARGS = [*[a for a in FAST if not a.startswith("epochs=")], "epochs=3", "logger=tensorboard"]
EPOCH_LINE = re.compile(r"^\[[\d\- :]+\] epoch (\d+)/3  K=\d+ alpha=[\d.]+  train [\dms.]+  ")


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def _script() -> str:
    return str(Path(sys.executable).with_name("amata-run"))


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(encoding="utf-8"):
        assert proc.poll() is None, (path.read_text(), path.with_suffix(".err").read_text())
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start a run with its output in files, SIGTERM it after its first row, run the command
    its stderr names; return both halves' outputs and the run directory."""
    cwd = tmp_path_factory.mktemp("observability")
    first_out, first_err = cwd / "first.out", cwd / "first.err"
    with open(first_out, "wb") as out, open(first_err, "wb") as err:
        proc = subprocess.Popen([_script(), *ARGS], cwd=cwd, stdout=out, stderr=err, env=_env())
        try:
            _wait_for(first_out, "epoch 1/3", proc, timeout=900)  # seconds when not shared
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = first_err.read_text(encoding="utf-8")
    assert code == PREEMPTED_EXIT, stderr
    command = stderr.strip().splitlines()[-1].split("to continue: ", 1)[1]
    argv = shlex.split(command)
    assert argv[0] == "amata-run"
    resumed = subprocess.run(
        [_script(), *argv[1:]], cwd=cwd, capture_output=True, text=True, env=_env(), timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr
    run_dir = Path(first_out.read_text(encoding="utf-8").splitlines()[0].split("run dir: ")[1])
    return {
        "first_out": first_out.read_text(encoding="utf-8").splitlines(),
        "first_err": stderr,
        "command": command,
        "out": resumed.stdout.splitlines(),
        "err": resumed.stderr,
        "run_dir": run_dir,
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }


def test_the_run_dir_comes_first_and_each_evaluation_point_is_one_line(
    interrupted_then_resumed: dict[str, Any],
) -> None:
    r = interrupted_then_resumed
    run_dir = r["run_dir"]
    assert run_dir.is_dir() and run_dir.is_absolute()
    assert r["first_out"][0] == f"run dir: {run_dir}"
    assert r["out"][0] == f"run dir: {run_dir}"  # the continuation prints it first too
    epochs = [int(m.group(1)) for line in r["out"] if (m := EPOCH_LINE.match(line))]
    first = [int(m.group(1)) for line in r["first_out"] if (m := EPOCH_LINE.match(line))]
    assert first == [1]
    assert epochs == [2, 3]  # the resumed half: one line per remaining evaluation point
    rows = read_rows(run_dir / "metrics.jsonl")
    assert len(rows) == 3
    last = next(line for line in r["out"] if "epoch 3/3" in line)
    passes = rows[-1]["forward_passes"] + rows[-1]["backward_passes"]
    assert f"passes {count(passes)}" in last
    assert f"robust err {rows[-1]['robust_error']:.3f} (pgd3, 64 imgs)" in last
    assert f"clean err {rows[-1]['clean_error']:.3f}" in last
    # the resume message counts epochs from 1, like the lines around it
    # (the signal lands in epoch 2, or between epoch 1's row and its checkpoint)
    resumed = re.compile(
        r"resumed .* from last\.ckpt (in epoch 2 at batch \d+|after epoch 1 \(of 3\))"
    )
    assert any(resumed.search(line) for line in r["out"]), r["out"]


def test_the_final_evaluation_is_announced_and_the_closing_line_has_the_results(
    interrupted_then_resumed: dict[str, Any],
) -> None:
    r = interrupted_then_resumed
    summary, run_dir = r["summary"], r["run_dir"]
    assert any(line.endswith("evaluating clean, pgd3 on 359 test images ...") for line in r["out"])
    closing = r["out"][-1]
    final = summary["final"]
    assert closing.endswith(closing_line("completed", summary, run_dir))
    assert f"clean {100 * final['clean_accuracy']:.2f}%" in closing
    assert f"pgd3 {100 * final['robust_accuracy']['pgd3']:.2f}%" in closing
    assert f"train {seconds(summary['train_seconds'])}" in closing
    assert f"summary: {run_dir / 'summary.json'}" in closing
    assert r["err"] == ""  # nothing on stderr for a run that went well


def test_the_interrupt_prints_a_command_that_really_resumes(
    interrupted_then_resumed: dict[str, Any],
) -> None:
    r = interrupted_then_resumed
    assert "stopped by SIGTERM after saving a checkpoint; to continue: amata-run " in r["first_err"]
    assert f"hydra.run.dir={r['run_dir']}" in r["command"]
    assert r["command"].endswith(" resume=true")
    assert r["summary"]["epochs"] == 3  # the same run, continued (not a fresh one elsewhere)
    status = json.loads((r["run_dir"] / "status.json").read_text())
    assert status["status"] == "completed"


def test_train_log_holds_the_whole_story(interrupted_then_resumed: dict[str, Any]) -> None:
    log = (interrupted_then_resumed["run_dir"] / "train.log").read_text(encoding="utf-8")
    lines = log.splitlines()
    assert [int(m.group(1)) for x in lines if (m := EPOCH_LINE.match(x))] == [1, 2, 3]
    assert any("preempted: stopped by SIGTERM" in x for x in lines)
    assert "evaluating clean, pgd3" in log
    assert "completed: clean " in lines[-1]


def test_summary_records_provenance(interrupted_then_resumed: dict[str, Any]) -> None:
    prov = interrupted_then_resumed["summary"]["provenance"]
    assert prov["command"].startswith("amata-run ") and "resume=true" in prov["command"]
    assert prov["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert prov["packages"]["amata-runner"] and prov["packages"]["hydra-core"]
    assert prov["host"] == socket.gethostname()
    assert prov["python"] == platform.python_version()
    assert prov["cuda"] is None  # a CPU run
    assert prov["started"] <= prov["ended"]
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=False
    )
    if head.returncode == 0:  # tests run from a checkout: its commit and dirty flag are there
        assert prov["git"]["commit"] == head.stdout.strip()
        assert isinstance(prov["git"]["dirty"], bool)


def test_tensorboard_holds_the_scalars_against_passes_and_train_time(
    interrupted_then_resumed: dict[str, Any],
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = interrupted_then_resumed["run_dir"]
    rows = read_rows(run_dir / "metrics.jsonl")
    steps_passes = [r["forward_passes"] + r["backward_passes"] for r in rows]
    steps_ms = [round(r["train_seconds"] * 1000) for r in rows]
    robust = [r["robust_error"] for r in rows]
    seen_passes: dict[int, float] = {}
    seen_ms: dict[int, float] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        if "vs_passes/robust_error" in tags:
            seen_passes.update({e.step: e.value for e in acc.Scalars("vs_passes/robust_error")})
            seen_ms.update({e.step: e.value for e in acc.Scalars("vs_train_ms/robust_error")})
    for step, value in zip(steps_passes, robust, strict=True):
        assert seen_passes[step] == pytest.approx(value, abs=1e-6)
    for step, value in zip(steps_ms, robust, strict=True):
        assert seen_ms[step] == pytest.approx(value, abs=1e-6)


# --------------------------------------------------------------------------- unit
def test_the_resume_command_keeps_the_overrides_and_replaces_resume(tmp_path: Path) -> None:
    cmd = resume_command(
        tmp_path, ["epochs=3", "resume=false", "eval.final_attacks=[pgd3]"], ["hydra.mode=RUN"]
    )
    assert shlex.split(cmd) == [
        "amata-run",
        "epochs=3",
        "eval.final_attacks=[pgd3]",
        f"hydra.run.dir={tmp_path.resolve()}",
        "resume=true",
    ]


# --------------------------------------------------------------------------- amata-report
def _config(method: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "dataset": {"name": "digits"},
        "model": {"name": "lenet"},
        "method": {"name": method},
        "seed": seed,
        **extra,
    }


def _run(
    path: Path, config: dict[str, Any], errors: list[float], overrides: list[str], done: bool = True
) -> None:
    path.mkdir(parents=True)
    (path / ".hydra").mkdir()
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {
            "epoch": i + 1,
            "train_seconds": 10.0 * (i + 1),
            "forward_passes": 100 * (i + 1),
            "backward_passes": 100 * (i + 1),
            "clean_error": e / 2,
            "robust_error": e,
            "eval_attack": "pgd10",
            "eval_examples": 512,
        }
        for i, e in enumerate(errors)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "status.json").write_text(json.dumps({"status": "completed" if done else "preempted"}))
    if done:
        summary = {
            "seed": config["seed"],
            "train_seconds": rows[-1]["train_seconds"],
            "forward_passes": rows[-1]["forward_passes"],
            "backward_passes": rows[-1]["backward_passes"],
            "final": {"examples": 100, "clean_accuracy": 0.9, "robust_accuracy": {"pgd20": 0.4}},
        }
        (path / "summary.json").write_text(json.dumps(summary))


FIG2 = {
    "report": {"title": "Figure 2 (left): PGD-10 vs Amata (K 2 -> 10) on CIFAR10", "row": "x"},
}


def test_report_counts_distinct_seeds_and_says_when_runs_repeat_one(tmp_path: Path) -> None:
    for job in range(3):  # three runs of seed 0: one seed, not three
        _run(tmp_path / "s" / str(job), _config("pgd", 0), [0.8, 0.7], ["method=pgd"])
    _run(tmp_path / "s" / "3", _config("amata", 0), [0.8, 0.6], ["method=amata"])
    _run(tmp_path / "s" / "4", _config("amata", 1), [0.8, 0.6], ["method=amata"])
    report = write_report([tmp_path / "s"], tmp_path / "out", plots=False)
    text = report.markdown.read_text()
    assert "| method=pgd | 1 (3 runs: seed 0 ×3) |" in text
    assert "| method=amata | 2 |" in text
    assert "Runs repeat a seed in method=pgd (seed 0 ×3)" in text
    assert "| failed |" not in text and "| config |" not in text  # empty columns are dropped
    assert "5 runs from" in text


def test_report_baseline_option_and_its_one_line_error(tmp_path: Path) -> None:
    _run(tmp_path / "s" / "0", _config("pgd", 0), [0.8, 0.7], ["method=pgd"])
    _run(tmp_path / "s" / "1", _config("amata", 0), [0.8, 0.6], ["method=amata"])
    runs = collect_runs([tmp_path / "s"])
    (section,) = build_sections(runs, baseline="method=pgd")
    table = results_table(section)
    assert "| method=amata | 1 | 90.00 | 40.00 | 20.0 | 400 | 1.00× / 1.00× |" in table
    from amata_runner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"baseline='fgsm': one of the report's rows: method"):
        build_sections(runs, baseline="fgsm")
    from amata_runner.cli.report import main as report_main

    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path / "s"), "baseline=nope", "plots=false"])
    assert exit_info.value.code == 2


def test_report_titles_name_the_dataset_the_runs_used(tmp_path: Path) -> None:
    for job, method in enumerate(("pgd", "amata")):
        config = _config(method, 0, report={**FIG2["report"], "row": method})
        _run(tmp_path / "s" / str(job), config, [0.8, 0.6], [f"method={method}"])
    (section,) = build_sections(collect_runs([tmp_path / "s"]))
    assert section.title == (
        "Figure 2 (left): PGD-10 vs Amata (K 2 -> 10) on digits (experiment: CIFAR10)"
    )
    assert section.eval_attack == "pgd10 on 512 test images"


def test_an_interrupted_run_does_not_cut_the_mean_curve_short(tmp_path: Path) -> None:
    _run(tmp_path / "s" / "0", _config("pgd", 0), [0.9, 0.8, 0.7, 0.6], ["seed=0"])
    _run(tmp_path / "s" / "1", _config("pgd", 1), [0.9, 0.8], ["seed=1"], done=False)
    (section,) = build_sections(collect_runs([tmp_path / "s"]))
    (config,) = section.configs
    from amata_runner.report.plots import curve

    curves = [curve(run.rows, "seconds", "robust_error", 0.0) for run in config.runs]
    x, y = mean_curve(curves)
    assert list(x) == [10.0, 20.0, 30.0, 40.0]  # to the end of the longest run
    assert list(y) == pytest.approx([0.9, 0.8, 0.7, 0.6])


def test_report_plots_label_targets_and_the_robust_error_attack(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    summary_targets = {"time_to_target": {"robust_error<=0.65": None}}
    for job, method in enumerate(("pgd", "amata")):
        _run(tmp_path / "s" / str(job), _config(method, 0), [0.8, 0.6], [f"method={method}"])
        path = tmp_path / "s" / str(job) / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **summary_targets}))
    import matplotlib.axes

    seen: dict[str, list[str]] = {"ylabel": [], "annotate": [], "legend": []}
    real_ylabel, real_annotate = matplotlib.axes.Axes.set_ylabel, matplotlib.axes.Axes.annotate

    def ylabel(self: Any, text: str, *a: Any, **k: Any) -> Any:
        seen["ylabel"].append(text)
        return real_ylabel(self, text, *a, **k)

    def annotate(self: Any, text: str, *a: Any, **k: Any) -> Any:
        seen["annotate"].append(text)
        return real_annotate(self, text, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.axes.Axes, "set_ylabel", ylabel)
        mp.setattr(matplotlib.axes.Axes, "annotate", annotate)
        report = write_report([tmp_path / "s"], tmp_path / "out")
    assert len(report.plots) == 2
    assert any(y.endswith("robust error (pgd10 on 512 test images)") for y in seen["ylabel"])
    assert seen["annotate"] == ["target 0.65", "target 0.65"]  # one per robust-error panel


def test_a_stopped_grid_names_its_sweep_dir_and_resume_auto(tmp_path: Path) -> None:
    from amata_runner.logging.progress import sweep_resume_command

    argv = ["-m", "method=pgd,amata", "seed=0,1", "hydra.sweep.dir=old", "resume=true"]
    cmd = sweep_resume_command(argv, tmp_path)
    assert shlex.split(cmd) == [
        "amata-run",
        "-m",
        "method=pgd,amata",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path.resolve()}",
        "resume=auto",
    ]


def test_matplotlib_building_its_font_cache_says_nothing(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _run(tmp_path / "s" / "0", _config("pgd", 0), [0.8, 0.6], ["method=pgd"])
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from pathlib import Path\nfrom amata_runner.report import write_report\n"
        f"write_report([Path({str(tmp_path / 's')!r})], Path({str(tmp_path / 'out')!r}))\n"
    )
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "fresh-mpl-cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fresh-mpl-cache").is_dir()  # the cache was really built here
    assert "font" not in done.stderr.lower(), done.stderr
    assert (tmp_path / "out" / "error_vs_seconds.png").is_file()


def test_the_closing_line_without_a_final_evaluation(tmp_path: Path) -> None:
    summary = {"train_seconds": 75.0, "forward_passes": 1500, "backward_passes": 1000, "epochs": 2}
    best = {"robust_accuracy": 0.4125, "eval_attack": "pgd10"}
    line = closing_line("completed", {**summary, "best": best}, tmp_path)
    assert line == (
        "completed: best robust acc 41.25% (pgd10, evaluation subset; no final evaluation: "
        f"eval.final=false); train 1m15s; passes 2.5k; epochs 2; summary: {tmp_path}/summary.json"
    )
    unselected = closing_line("completed", {**summary, "best": {"robust_accuracy": None}}, tmp_path)
    assert unselected.startswith("completed: no final evaluation (eval.final=false); train 1m15s")
