"""Nothing a user ran is lost or mislabelled: one process per run directory, refusals that write
nothing, signals at any point of a job's life, a real full disk, NaN weights, damaged files.

Each test here proves one row of the README's Reliability table. The CLI tests run the installed
``amata-run`` in a subprocess (as users do, output redirected to files); the others drive the
engine in-process on the embedded digits.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from amata_runner import engine
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError, StorageError
from amata_runner.logging.metrics import read_rows
from amata_runner.runtime.checkpoint import (
    LAST,
    PREVIOUS,
    load_checkpoint,
    load_latest,
    save_atomic,
)
from amata_runner.runtime.interrupts import ForcedStop
from amata_runner.runtime.nonfinite import GuardedSGD, NonFiniteLoss
from amata_runner.runtime.run_dir import RunLock, write_status
from conftest import FAST, amata_run, compose_resolved

RUN = [*FAST, "epochs=1"]


def run(tmp: Path, *overrides: str) -> dict[str, Any]:
    """A FAST run on all 1,438 training digits (no validation hold-out): 12 batches per epoch,
    which the step counts below rely on; overrides may turn the split back on."""
    tmp.mkdir(parents=True, exist_ok=True)
    return Trainer(compose_resolved([*FAST, "eval.validation.size=0", *overrides]), tmp).run()


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (the lock file included) by content hash."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def status(run_dir: Path) -> str:
    return str(json.loads((run_dir / "status.json").read_text())["status"])


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    text = result.stderr + result.stdout
    assert "Traceback" not in text, text
    lines = [line for line in result.stderr.splitlines() if line.startswith("amata-run:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One completed CLI run, copied by the tests that need a run directory to attack."""
    work = tmp_path_factory.mktemp("finished")
    result = amata_run([*RUN, f"hydra.run.dir={work / 'run'}"], cwd=work)
    assert result.returncode == 0, result.stderr
    return work / "run"


def copy_run(source: Path, target: Path) -> Path:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    return target


# --------------------------------------------------------------------------- one process per dir
def test_a_second_process_is_refused_naming_the_holder_and_writes_nothing(
    tmp_path: Path, finished: Path
) -> None:
    run_dir = copy_run(finished, tmp_path / "run")
    with RunLock(run_dir):  # a live run (this process) holds the directory
        before = snapshot(run_dir)
        result = amata_run([*RUN, "resume=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert snapshot(run_dir) == before
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"pid {os.getpid()}" in line and "in use by another run" in line, line


def test_two_runs_started_together_into_one_dir_leave_one_intact_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [*RUN, f"hydra.run.dir={run_dir}"]
    script = Path(sys.executable).with_name("amata-run")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    procs = []
    for seed in (0, 1):
        procs.append(
            subprocess.Popen(
                [str(script), *command, f"seed={seed}"],
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
        time.sleep(1.5)
    outcomes = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes  # one ran, the other was refused (busy, or a finished run)
    summary = json.loads((run_dir / "summary.json").read_text())
    winner = summary["seed"]
    assert load_checkpoint(run_dir / LAST)["config"]["seed"] == winner
    saved = yaml_seed(run_dir / "config_resolved.yaml")
    assert saved == winner
    assert status(run_dir) == "completed"


def yaml_seed(path: Path) -> int:
    import yaml

    return int(yaml.safe_load(path.read_text())["seed"])


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("keep", ["metrics.jsonl", "best.ckpt", "last.prev.ckpt", "summary.json"])
def test_any_result_file_makes_a_fresh_start_refuse(
    tmp_path: Path, finished: Path, keep: str
) -> None:
    run_dir = copy_run(finished, tmp_path / "run")
    for path in run_dir.iterdir():
        if path.is_file() and path.name != keep and not path.name.startswith("."):
            path.unlink()
    if not (run_dir / keep).exists():  # a one-epoch run leaves no last.prev.ckpt: make one
        (run_dir / keep).write_bytes((finished / LAST).read_bytes())
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(run_dir, "epochs=1")
    assert snapshot(run_dir) == before


def test_a_refused_resume_leaves_every_file_byte_identical(tmp_path: Path, finished: Path) -> None:
    run_dir = copy_run(finished, tmp_path / "run")
    write_status(run_dir, "preempted", "stopped by SIGTERM")  # as a preempted run leaves it
    before = snapshot(run_dir)
    result = amata_run(
        [*RUN, "resume=true", "method.eps=0.1", f"hydra.run.dir={run_dir}"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert "trained with other settings" in one_error_line(result)
    assert snapshot(run_dir) == before
    assert status(run_dir) == "preempted"


# --------------------------------------------------------------------------- signals
@contextlib.contextmanager
def started(args: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    script = Path(sys.executable).with_name("amata-run")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with open(cwd / "out", "w") as out, open(cwd / "err", "w") as err:
        proc = subprocess.Popen([str(script), *args], cwd=cwd, stdout=out, stderr=err, env=env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)


def wait_for(predicate: Any, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigterm_during_start_up_ends_preempted_not_running(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with started([*RUN, f"hydra.run.dir={run_dir}"], tmp_path) as proc:
        wait_for(lambda: (run_dir / "status.json").exists(), proc)  # start-up has begun
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    err = (tmp_path / "err").read_text()
    assert code == 75, err
    assert "Traceback" not in err
    assert status(run_dir) == "preempted"


def test_sigint_during_the_final_evaluation_stops_cleanly_and_the_evaluation_resumes(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    args = [
        *RUN,
        "eval.final_attacks=[pgd100]",
        "eval.batch_size=16",
        "deterministic=true",
        f"hydra.run.dir={run_dir}",
    ]
    with started(args, tmp_path) as proc:
        wait_for(lambda: (run_dir / "final_eval.partial.json").exists(), proc)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    err = (tmp_path / "err").read_text()
    assert code == 75, err
    assert "Traceback" not in err
    assert status(run_dir) == "preempted"
    partial = json.loads((run_dir / "final_eval.partial.json").read_text())
    done = next(iter(partial["partial"].values()))["next"]
    assert 0 < done < 359  # stopped part of the way through the 359 test digits

    resumed = amata_run([*args[:-1], "resume=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert status(run_dir) == "completed"
    assert not (run_dir / "final_eval.partial.json").exists()
    reference = amata_run([*args[:-1], f"hydra.run.dir={tmp_path / 'ref'}"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())["final"]
    assert final["robust_accuracy"] == expected["robust_accuracy"]
    assert final["clean_accuracy"] == expected["clean_accuracy"]


def test_a_second_signal_during_a_checkpoint_write_lets_the_write_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"batches": 0}
    original_add, original_save = engine.Trainer._add_loss, engine.save_atomic

    def add_loss(self: Trainer, loss_sum: torch.Tensor) -> None:
        original_add(self, loss_sum)
        calls["batches"] += 1
        if calls["batches"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # first: checkpoint, then stop

    def save(obj: dict[str, Any], path: Path, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # second, while the checkpoint is being written
        original_save(obj, path, **kwargs)

    monkeypatch.setattr(engine.Trainer, "_add_loss", add_loss)
    monkeypatch.setattr(engine, "save_atomic", save)
    with pytest.raises(ForcedStop):
        run(tmp_path, "epochs=2")
    state = load_checkpoint(tmp_path / LAST)  # complete, and the one the first signal asked for
    assert (state["progress"]["epoch"], state["progress"]["batch"]) == (0, 5)
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- a real full disk
@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> None:
    """Write until the file system says ENOSPC (the real error, from the kernel)."""
    with open(disk / "filler", "wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())


def test_a_disk_that_fills_mid_run_is_one_error_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_tmpfs(tmp_path / "disk", "32m") as disk:
        run_dir = disk / "run"
        original = engine.Trainer._save_checkpoint
        saves = {"n": 0}

        def save_then_fill(self: Trainer, metrics: Any) -> None:
            original(self, metrics)
            saves["n"] += 1
            if saves["n"] == 1:
                fill(disk)

        monkeypatch.setattr(engine.Trainer, "_save_checkpoint", save_then_fill)
        run_dir.mkdir()
        write_status(run_dir, "running")  # as the CLI leaves it while training
        with pytest.raises(StorageError) as info:
            run(run_dir, "epochs=3")
        message = str(info.value)
        assert "the disk is full" in message and "\n" not in message
        assert not message.startswith("[Errno")
        state, path = load_latest(run_dir)  # type: ignore[misc]
        assert path.name == LAST and state["progress"]["epoch"] == 1
        # epoch 2's row may still fit in the file's last page; the checkpoint cannot
        assert len(read_rows(run_dir / "metrics.jsonl")) in (1, 2)
        assert not list(run_dir.glob(".*.tmp"))

        write_status(run_dir, "failed", message)  # the CLI's last word, on the full disk
        assert status(run_dir) == "failed"


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / LAST
        save_atomic({"w": torch.zeros(64_000)}, path, keep_previous=True)  # 256 kB
        with open(disk / "filler", "wb") as handle:  # leave about 128 kB free
            handle.write(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - 131072))
        with pytest.raises(StorageError) as info:
            save_atomic({"w": torch.ones(64_000)}, path, keep_previous=True)
        assert str(info.value).endswith("the disk is full; the previous file was kept intact")
        assert torch.equal(load_checkpoint(path)["w"], torch.zeros(64_000))
        assert sorted(p.name for p in disk.iterdir()) == ["filler", LAST]


def test_a_full_disk_before_the_run_starts_is_one_line(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk)
        result = amata_run([*RUN, f"hydra.run.dir={disk / 'run'}"], cwd=tmp_path)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "the disk is full" in line, line


# --------------------------------------------------------------------------- NaN
def test_weights_poisoned_by_an_epochs_last_step_are_never_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = engine.Trainer._add_loss
    calls = {"n": 0}

    def poison_last_step_of_epoch_two(self: Trainer, loss_sum: torch.Tensor) -> None:
        original(self, loss_sum)  # the loss of this step was finite ...
        calls["n"] += 1
        if calls["n"] == 20:  # ... but the update left every weight NaN (10 batches per epoch)
            with torch.no_grad():
                for p in self.parts.model.parameters():
                    p.fill_(float("nan"))

    monkeypatch.setattr(engine.Trainer, "_add_loss", poison_last_step_of_epoch_two)
    split = "eval.validation.size=200"  # the default digits split: best.ckpt is kept too
    with pytest.raises(NonFiniteLoss) as info:
        run(tmp_path, "epochs=3", split)
    message = str(info.value)
    assert "the weights became NaN or Inf" in message
    assert "iteration 10, after epoch 1" in message and "\n" not in message
    for name in (LAST, "best.ckpt"):
        weights = load_checkpoint(tmp_path / name)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values()), name
    assert load_checkpoint(tmp_path / LAST)["progress"]["epoch"] == 1

    monkeypatch.setattr(engine.Trainer, "_add_loss", original)
    # The advice works: a learning-rate rescue is a resumption, not a refused config change.
    summary = run(tmp_path, "epochs=3", split, "resume=true", "optim.lr=0.01")
    assert summary["epochs"] == 3
    assert summary["lr_changes"] == [{"iteration": 10, "from": 0.05, "to": 0.01}]
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert rows[-1]["lr"] == pytest.approx(0.01)


def test_no_checkpoint_yet_is_said_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = engine.Trainer._add_loss

    def poison(self: Trainer, loss_sum: torch.Tensor) -> None:
        original(self, loss_sum.new_tensor(float("nan")))

    monkeypatch.setattr(engine.Trainer, "_add_loss", poison)
    with pytest.raises(NonFiniteLoss, match="no checkpoint had been written yet"):
        run(tmp_path, "epochs=1")
    assert not (tmp_path / LAST).exists()


def test_skip_mode_fails_a_run_that_refuses_most_of_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GuardedSGD, "_grads_finite", lambda self: False)
    with pytest.raises(NonFiniteLoss, match=r"refused 12 of 12 optimiser steps \(100%\)"):
        run(tmp_path, "epochs=1", "nonfinite=skip")


def test_skip_mode_reports_the_skipped_fraction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = GuardedSGD._grads_finite
    calls = {"n": 0}

    def every_twelfth_bad(self: GuardedSGD) -> bool:
        calls["n"] += 1
        return original(self) and calls["n"] % 12 != 0

    monkeypatch.setattr(GuardedSGD, "_grads_finite", every_twelfth_bad)
    summary = run(tmp_path, "epochs=1", "nonfinite=skip")
    assert summary["skipped_steps"] == 1
    assert summary["skipped_fraction"] == pytest.approx(1 / 12)
    assert read_rows(tmp_path / "metrics.jsonl")[-1]["skipped_fraction"] == pytest.approx(1 / 12)


# --------------------------------------------------------------------------- integrity
def flip_weight_bytes(path: Path, weight: torch.Tensor) -> None:
    """Flip 4 bytes inside ``weight``'s stored data, leaving the file a valid zip."""
    data = bytearray(path.read_bytes())
    needle = weight.detach().contiguous().view(-1)[:8].numpy().tobytes()
    at = data.find(needle)
    assert at > 0
    for i in range(at + 4, at + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_bit_flip_in_the_weights_is_detected_and_the_previous_checkpoint_used(
    tmp_path: Path,
) -> None:
    model = torch.nn.Linear(64, 64)
    save_atomic({"model": model.state_dict(), "n": 1}, tmp_path / LAST, keep_previous=True)
    save_atomic({"model": model.state_dict(), "n": 2}, tmp_path / LAST, keep_previous=True)
    assert torch.load(tmp_path / LAST, weights_only=True)["n"] == 2
    flip_weight_bytes(tmp_path / LAST, model.weight)
    damaged = torch.load(tmp_path / LAST, weights_only=True)  # torch itself loads it silently
    assert not torch.equal(damaged["model"]["weight"], model.weight)
    with pytest.raises(ConfigError, match="do not match its checksum"):
        load_checkpoint(tmp_path / LAST)
    state, path = load_latest(tmp_path)  # type: ignore[misc]
    assert path.name == PREVIOUS and state["n"] == 1
    assert "checksum" not in state


def test_a_garbage_line_in_metrics_keeps_every_valid_row(tmp_path: Path) -> None:
    run(tmp_path, "epochs=3")
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    path.write_text("\n".join([lines[0], "{not json at all", *lines[1:]]) + "\n")
    assert len(read_rows(path)) == 3
    # Resuming the finished run keeps all three rows and sets the bad line aside.
    run(tmp_path, "epochs=3", "resume=true")
    assert [json.loads(line) for line in lines] == read_rows(path)
    assert (tmp_path / "metrics.jsonl.bad").read_text() == "{not json at all\n"


def test_amata_eval_on_a_checkpoint_with_a_partial_config_is_one_line(
    tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from amata_runner.cli.evaluate import main

    state = load_checkpoint(finished / LAST)
    del state["config"]["model"]  # a checkpoint from another version, or edited by hand
    torch.save(state, tmp_path / "partial.ckpt")
    with pytest.raises(SystemExit) as info:
        main([f"ckpt={tmp_path / 'partial.ckpt'}"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.strip().splitlines() == [
        f"amata-eval: error: ckpt='{tmp_path / 'partial.ckpt'}': a checkpoint whose stored "
        "config is complete (it has no model)"
    ]
