"""Cluster sweeps: the launcher presets compose, submitit and joblib grids run, and a job that
SLURM warns (SIGUSR2) checkpoints, is requeued into the same directory and continues exactly.

The end-to-end tests need the ``cluster`` extra (hydra-submitit-launcher, hydra-joblib-launcher)
and skip without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from amata_runner.cli import config_dir
from amata_runner.launchers import (
    OneGpuPerWorker,
    RequeueSignal,
    claim_slot,
    visible_gpus,
    with_resume_auto,
)
from amata_runner.logging.metrics import read_rows
from amata_runner.runtime.interrupts import StopRequests
from conftest import FAST, amata_run

# A run long enough to be interrupted part way: 2 epochs of 12 batches (all 1,438 training
# digits: no validation hold-out), a row every 4 batches.
ARGS = [
    *FAST,
    "eval.validation.size=0",
    "epochs=2",
    "deterministic=true",
    "eval.unit=iteration",
    "eval.every=4",
    "device=cpu",
]
TOTAL_ROWS = 6


def submitit_plugin() -> None:
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason='needs pip install -e ".[cluster]"'
    )


def joblib_plugin() -> None:
    pytest.importorskip(
        "hydra_plugins.hydra_joblib_launcher", reason='needs pip install -e ".[cluster]"'
    )


def compose_with_hydra(*overrides: str) -> Any:
    with initialize_config_dir(version_base="1.3", config_dir=config_dir(), job_name="test"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


# ----------------------------------------------------------------------------- pieces


def test_every_job_gets_resume_auto_unless_the_command_line_chose() -> None:
    assert with_resume_auto(["seed=1"]) == ["seed=1", "resume=auto"]
    assert with_resume_auto(["resume=false", "seed=1"]) == ["resume=false", "seed=1"]
    assert with_resume_auto(["+resume=true"]) == ["+resume=true"]
    assert with_resume_auto(["eval.resume_like=1"])[-1] == "resume=auto"


@pytest.fixture
def fake_submitit_handler() -> Iterator[list[int]]:
    """Stands for submitit's own SIGUSR2 handler (which would checkpoint and requeue)."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_requeue_signal_during_training_goes_to_the_runners_graceful_stop(
    fake_submitit_handler: list[int],
) -> None:
    with RequeueSignal(signal.SIGUSR2) as requeue:
        with StopRequests() as stop:
            signal.raise_signal(signal.SIGUSR2)
            assert stop.signum == signal.SIGUSR2  # the step finishes, a checkpoint is written
            assert fake_submitit_handler == []  # ... before anything is requeued
        assert requeue.received
        requeue.requeue()  # what the launcher does once the runner has exited 75
        assert fake_submitit_handler == [signal.SIGUSR2]
    signal.raise_signal(signal.SIGUSR2)  # submitit's handler is back in place
    assert fake_submitit_handler == [signal.SIGUSR2, signal.SIGUSR2]


def test_requeue_signal_outside_training_requeues_at_once(fake_submitit_handler: list[int]) -> None:
    with RequeueSignal(signal.SIGUSR2) as requeue:
        signal.raise_signal(signal.SIGUSR2)  # start-up or final evaluation: nothing newer to save
        assert requeue.received
        assert fake_submitit_handler == [signal.SIGUSR2]


CLAIM = "import sys; from pathlib import Path; from amata_runner.launchers import claim_slot; "


def test_each_worker_process_holds_its_own_slot_until_it_exits(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    assert claim_slot(locks, 2) == 0
    assert claim_slot(locks, 2) == 0  # the same process keeps its slot
    code = CLAIM + f"print(claim_slot(Path({str(locks)!r}), 2))"
    for _ in range(2):  # a process that ended gave its slot back
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.strip() == "1", out.stderr


@pytest.mark.parametrize(
    ("listed", "gpus"),
    [
        ("0,1", ["0", "1"]),
        ("GPU-a1, GPU-b2", ["GPU-a1", "GPU-b2"]),
        ("", []),
        ("-1", []),
        ("2,-1,3", ["2"]),
    ],
)
def test_visible_gpus_read_cuda_visible_devices_as_cuda_does(
    listed: str, gpus: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert visible_gpus() == gpus


def test_a_worker_sees_only_the_gpu_of_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    task = OneGpuPerWorker(
        lambda cfg: os.environ["CUDA_VISIBLE_DEVICES"], ["3", "5"], 2, tmp_path / "locks"
    )
    assert task(None) == "3"  # this process holds slot 0


# ----------------------------------------------------------------------------- presets


def test_slurm_preset_composes_with_requeue_settings_and_our_sweep_dirs() -> None:
    submitit_plugin()
    cfg = compose_with_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.amata_runner_launchers.SlurmLauncher"
    assert launcher.partition == "gpu"
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1)
    assert launcher.signal_delay_s >= 60 and launcher.max_num_timeout > 0
    assert launcher.additional_parameters == {"requeue": True}
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    # conf/hydra/default.yaml still decides where runs go; submitit's files sit in the sweep dir
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"
    assert str(cfg.hydra.sweep.dir).startswith("outputs/multirun/")
    assert launcher.submitit_folder.startswith(str(cfg.hydra.sweep.dir))
    assert "report" in cfg.hydra.callbacks


def test_local_presets_compose() -> None:
    submitit_plugin()
    joblib_plugin()
    local = compose_with_hydra("hydra/launcher=local_submitit").hydra.launcher
    assert local._target_.endswith("amata_runner_launchers.LocalLauncher")
    parallel = compose_with_hydra("hydra/launcher=local_parallel").hydra.launcher
    assert parallel._target_.endswith("amata_runner_launchers.JoblibLauncher")
    assert parallel.n_jobs == -1


def test_slurm_preset_writes_the_sbatch_flags_for_requeues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Launch through the real launcher up to sbatch (a stand-in srun on PATH, no cluster)."""
    submitit_plugin()
    import submitit
    from hydra.utils import instantiate

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    sent: dict[str, Any] = {}

    def submit(executor: Any, fn: Any, overrides: Any, *rest: Any) -> list[Any]:
        sent["sbatch"] = executor._executor._make_submission_file_text("CMD", "uid")
        sent["max_num_timeout"] = executor._executor.max_num_timeout
        sent["overrides"] = list(overrides)
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    cfg = compose_with_hydra(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["seed=0"], ["seed=1", "resume=false"]], initial_job_idx=0)
    lines = set(sent["sbatch"].splitlines())
    for flag in (
        "--signal=USR2@180",
        "--requeue",
        "--partition=gpu",
        "--time=600",
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=8",
        "--job-name=amata-run",
    ):
        assert f"#SBATCH {flag}" in lines, flag
    assert sent["max_num_timeout"] == 20
    assert sent["overrides"] == [["seed=0", "resume=auto"], ["seed=1", "resume=false"]]


# ----------------------------------------------------------------------------- end to end


def status(job_dir: Path) -> str:
    return str(json.loads((job_dir / "status.json").read_text())["status"])


def child_of(parent: int) -> int | None:
    """The pid of a process whose parent is ``parent`` (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            return int(stat.parent.name)
    return None


def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job process in /proc")
def test_local_submitit_sweep_requeues_a_warned_job_which_resumes_exactly(tmp_path: Path) -> None:
    """Two identical jobs; job 0 gets submitit's SIGUSR2 part way through training, as SLURM sends
    it before a time limit. It must finish its step, checkpoint, be requeued by submitit with the
    same overrides into the same directory, resume there, and end exactly like job 1."""
    submitit_plugin()
    sweep = tmp_path / "sweep"
    command = [
        "-m",
        "hydra/launcher=local_submitit",
        *ARGS,
        "seed=0,0",
        f"hydra.sweep.dir={sweep}",
    ]
    script = Path(sys.executable).with_name("amata-run")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "amata_runner.cli.train"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(
        argv + command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    job = sweep / "0"
    deadline = time.monotonic() + 300
    while len(read_rows(job / "metrics.jsonl")) < 4:  # inside epoch 2
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "job 0 made no progress"
        time.sleep(0.02)
    controller = int(
        yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]
    )
    task = child_of(controller)
    assert task is not None
    os.kill(task, signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]

    log = (job / "train.log").read_text()
    assert "SIGUSR2 received: finishing the current step" in log
    assert "resumed" in log and "from last.ckpt" in log
    submitit_log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in submitit_log
    for n in (0, 1):
        assert (sweep / str(n) / "summary.json").is_file()
        assert status(sweep / str(n)) == "completed"
        assert "resume=auto" in (sweep / str(n) / ".hydra" / "overrides.yaml").read_text()
    rows = read_rows(job / "metrics.jsonl")
    assert len(rows) == TOTAL_ROWS
    assert untimed(rows) == untimed(read_rows(sweep / "1" / "metrics.jsonl"))
    ours = torch.load(job / "last.ckpt", weights_only=True)["model"]
    theirs = torch.load(sweep / "1" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_joblib_sweep_runs_jobs_in_parallel_workers_each_on_one_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs, two workers; the (pretend) GPUs 7 and 9 are shared out one per worker."""
    joblib_plugin()
    sweep = tmp_path / "sweep"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,9")
    done = amata_run(
        [
            "-m",
            "hydra/launcher=local_parallel",
            *FAST,
            "epochs=1",
            "device=cpu",
            "method=pgd,amata",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "n_jobs=2" in done.stdout + done.stderr
    methods = set()
    for n in (0, 1):
        job = sweep / str(n)
        assert status(job) == "completed"
        methods.add(json.loads((job / "summary.json").read_text())["method"])
        pinned = [
            line for line in (job / "train.log").read_text().splitlines() if "joblib worker" in line
        ]
        assert len(pinned) == 1
        assert pinned[0].rsplit("CUDA_VISIBLE_DEVICES=", 1)[1] in {"7", "9"}
    assert methods == {"pgd", "amata"}


@pytest.mark.slow
def test_a_submitit_job_with_two_tasks_trains_data_parallel(tmp_path: Path) -> None:
    """tasks_per_node=2: the launcher describes the job as torchrun would (RANK, WORLD_SIZE, ...),
    so the two tasks train one run together (gloo on the CPU)."""
    submitit_plugin()
    sweep = tmp_path / "sweep"
    done = amata_run(
        [
            "-m",
            "hydra/launcher=local_submitit",
            "hydra.launcher.tasks_per_node=2",
            *FAST,
            "epochs=1",
            "device=cpu",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert status(sweep / "0") == "completed"
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2
