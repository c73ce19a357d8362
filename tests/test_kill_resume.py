"""Kill the real ``amata-run`` process at chosen moments; ``resume=true`` must finish the run as if
nothing happened: the same final weights bit for bit (CPU, deterministic=true), the same metrics
rows with none duplicated or missing, and a train-only clock that keeps counting up.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from amata_runner.logging.metrics import read_rows
from amata_runner.runtime.interrupts import PREEMPTED_EXIT
from conftest import FAST, amata_run

ARGS = [
    *FAST,
    "epochs=3",
    "deterministic=true",
    "eval.unit=iteration",
    "eval.every=4",  # 10 batches per epoch: rows at 4, 8 | 12, 16, 20 | 24, 28, 30 (8 in all)
    "method=amata",
]
TOTAL_ROWS = 8


def command(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "amata_runner.cli.train",
        *ARGS,
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def start(run_dir: Path, cwd: Path, *extra: str, prelude: str = "") -> subprocess.Popen[str]:
    """Start a run; ``prelude`` is Python run in the child before the CLI (to inject faults)."""
    if prelude:
        args = command(run_dir, *extra)[3:]
        code = f"{prelude}\nimport sys\nsys.argv = ['amata-run', *{args!r}]\n"
        code += "from amata_runner.cli.train import main\nmain()\n"
        argv = [sys.executable, "-c", code]
    else:
        argv = command(run_dir, *extra)
    return subprocess.Popen(
        argv, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_rows(run_dir: Path, rows: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 240
    while len(read_rows(run_dir / "metrics.jsonl")) < rows:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def finish(run_dir: Path, cwd: Path) -> None:
    """Resume until the run reports completed (a resume may itself not be needed twice)."""
    done = amata_run([*ARGS, f"hydra.run.dir={run_dir}", "resume=true"], cwd)
    assert done.returncode == 0, done.stderr
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    rows = read_rows(run_dir / "metrics.jsonl")
    assert untimed(rows) == untimed(read_rows(reference / "metrics.jsonl"))
    assert all(a["train_seconds"] < b["train_seconds"] for a, b in itertools.pairwise(rows))
    ours = torch.load(run_dir / "last.ckpt", weights_only=True)["model"]
    theirs = torch.load(reference / "last.ckpt", weights_only=True)["model"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert final == json.loads((reference / "summary.json").read_text())["final"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    done = amata_run([*ARGS, f"hydra.run.dir={root / 'run'}"], root)
    assert done.returncode == 0, done.stderr
    assert len(read_rows(root / "run" / "metrics.jsonl")) == TOTAL_ROWS
    return root / "run"


def kill_at_row(tmp_path: Path, reference: Path, row: int) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir, tmp_path)
    wait_for_rows(run_dir, row, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    finish(run_dir, tmp_path)
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_the_uninterrupted_run(
    tmp_path: Path, reference: Path
) -> None:
    kill_at_row(tmp_path, reference, 4)  # inside epoch 2, after epoch 1's checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("row", [1, 4, 5, 6, 7])
def test_sigkill_at_many_points_then_resume_is_the_uninterrupted_run(
    tmp_path: Path, reference: Path, row: int
) -> None:
    kill_at_row(tmp_path, reference, row)


# The second checkpoint write dies half way through (as a SIGKILL or power cut would leave it).
KILL_IN_SAVE = """
import os, signal, torch
import amata_runner.runtime.checkpoint as checkpoint
_save, _calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == 2:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
checkpoint.torch.save = save
"""


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path: Path, reference: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir, tmp_path, prelude=KILL_IN_SAVE)
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(run_dir / "last.ckpt", weights_only=True)  # epoch 1's, whole
    assert state["progress"]["epoch"] == 1
    finish(run_dir, tmp_path)
    assert_same_run(run_dir, reference)


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(tmp_path: Path, reference: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir, tmp_path)
    wait_for_rows(run_dir, 3, proc)  # just after epoch 2's first row
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT, err
    assert "stopped by SIGTERM after saving a checkpoint" in err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted"
    state = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert state["progress"]["batch"] > 0  # a mid-epoch checkpoint
    finish(run_dir, tmp_path)
    assert_same_run(run_dir, reference)
