"""torchrun on CPU (gloo): two ranks train one model, agree on it, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amata_runner.logging.metrics import read_rows
from amata_runner.runtime.distributed import Dist, from_env
from conftest import FAST, amata_run

# The whole training split (no validation hold-out): the comparison with one process below is
# about data parallelism, and the split under torchrun is covered by test_validation_split.py.
ARGS = [*FAST, "batch_size=128", "eval.validation.size=0"]


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "amata_runner.cli.train",
        *args,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_from_env_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_env() == Dist()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    job = from_env()
    assert (job.rank, job.world, job.local_rank, job.enabled, job.is_main) == (3, 4, 1, True, False)


@pytest.mark.parametrize(
    ("method", "epochs"), [("amata", 2), pytest.param("atta", 4, marks=pytest.mark.slow)]
)
def test_two_ranks_agree_and_only_rank_0_writes(tmp_path: Path, method: str, epochs: int) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = [*ARGS, f"method={method}", f"epochs={epochs}"]
    done = torchrun([*args, f"hydra.run.dir={work / 'run'}"], work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.listdir(work) == ["run"]  # rank 1 created nothing beside it
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "parameters_identical": True}
    # batch_size is global: 2 ranks x 64, the last partial batch dropped (1438 // 128 = 11)
    assert summary["iterations"] == epochs * 11 and summary["examples"] == epochs * 11 * 128
    rows = read_rows(work / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [float(e + 1) for e in range(epochs)]  # one writer

    single = amata_run([*args, f"hydra.run.dir={tmp_path / 'single'}"], work)
    assert single.returncode == 0, single.stderr
    reference = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["forward_passes"] == pytest.approx(reference["forward_passes"], rel=0.15)
    ours, theirs = summary["final"], reference["final"]
    assert ours["clean_accuracy"] == pytest.approx(theirs["clean_accuracy"], abs=0.15)
    for name, accuracy in theirs["robust_accuracy"].items():
        assert ours["robust_accuracy"][name] == pytest.approx(accuracy, abs=0.15)


def test_a_grid_under_torchrun_is_refused(tmp_path: Path) -> None:
    done = torchrun([*ARGS, "-m", "seed=0,1"], tmp_path)
    assert done.returncode != 0
    assert "amata-run: error: --multirun='-m': one run per torchrun job" in done.stderr
    assert not (tmp_path / "outputs").exists()
