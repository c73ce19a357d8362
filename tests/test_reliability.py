"""Runs that survive: stop signals, corrupt files, NaN losses, full disks, failing loggers.

Each test here proves one guarantee of the README's "Reliability" section, in-process and on the
embedded digits data; the subprocess tests (real SIGKILL / SIGTERM) are in test_kill_resume.py.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from amata_runner import engine
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.logging import GuardedSink
from amata_runner.logging.metrics import read_rows
from amata_runner.methods.base import StepOutput
from amata_runner.runtime.checkpoint import (
    LAST,
    PREVIOUS,
    load_checkpoint,
    load_latest,
    save_atomic,
)
from amata_runner.runtime.interrupts import ForcedStop, Preempted
from amata_runner.runtime.nonfinite import GuardedSGD, NonFiniteLoss
from conftest import FAST, compose_resolved

TIMED = {"train_seconds"}


def run(tmp: Path, *overrides: str) -> dict[str, Any]:
    """A FAST run on all 1,438 training digits (no validation hold-out): 12 batches per epoch,
    which the signal points below count on."""
    tmp.mkdir(parents=True, exist_ok=True)
    return Trainer(compose_resolved([*FAST, "eval.validation.size=0", *overrides]), tmp).run()


def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMED} for r in rows]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def signal_after(monkeypatch: pytest.MonkeyPatch, batches: int, *signums: int) -> None:
    """Deliver ``signums`` to this process right after the ``batches``-th training step."""
    calls = {"n": 0}
    original = engine.Trainer._add_loss

    def add_loss(self: Trainer, loss_sum: torch.Tensor) -> None:
        original(self, loss_sum)
        calls["n"] += 1
        if calls["n"] == batches:
            for signum in signums:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(engine.Trainer, "_add_loss", add_loss)


# --------------------------------------------------------------------------- graceful stop
@pytest.mark.parametrize(
    ("method", "signum"),
    [
        ("amata", signal.SIGTERM),
        ("atta", signal.SIGUSR1),
        ("fast", signal.SIGINT),
        pytest.param("free", signal.SIGTERM, marks=pytest.mark.slow),
        pytest.param("fosc", signal.SIGUSR1, marks=pytest.mark.slow),
        pytest.param("yopo", signal.SIGTERM, marks=pytest.mark.slow),
    ],
)
def test_a_stop_signal_checkpoints_mid_epoch_and_resume_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, signum: int
) -> None:
    args = (
        f"method={method}",
        "deterministic=true",
        "epochs=2",
        "eval.unit=iteration",
        "eval.every=4",
    )
    reference = run(tmp_path / "ref", *args)
    with monkeypatch.context() as patch:
        signal_after(patch, 5, signum)  # inside epoch 1 (12 batches per epoch)
        with pytest.raises(Preempted, match=signal.Signals(signum).name):
            run(tmp_path / "stopped", *args)
    state = load_checkpoint(tmp_path / "stopped" / LAST)
    assert (state["progress"]["epoch"], state["progress"]["batch"]) == (0, 5)
    assert not (tmp_path / "stopped" / "summary.json").exists()
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)

    resumed = run(tmp_path / "stopped", *args, "resume=true")
    rows = read_rows(tmp_path / "stopped" / "metrics.jsonl")
    assert untimed(rows) == untimed(read_rows(tmp_path / "ref" / "metrics.jsonl"))
    assert resumed["final"] == reference["final"]
    assert resumed["forward_passes"] == reference["forward_passes"]
    assert same_weights(tmp_path / "ref" / LAST, tmp_path / "stopped" / LAST)


def test_a_signal_at_an_epoch_end_stops_after_that_epochs_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        signal_after(patch, 12, signal.SIGTERM)  # the last batch of epoch 1
        with pytest.raises(Preempted):
            run(tmp_path, "epochs=2")
    state = load_checkpoint(tmp_path / LAST)
    assert (state["progress"]["epoch"], state["progress"]["batch"]) == (1, 0)
    assert len(read_rows(tmp_path / "metrics.jsonl")) == 1


def test_a_second_signal_stops_at_once_leaving_the_last_checkpoint_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(tmp_path / "ref", "epochs=1")
    with monkeypatch.context() as patch:
        signal_after(patch, 14, signal.SIGTERM, signal.SIGTERM)  # epoch 2, batch 2
        with pytest.raises(ForcedStop):
            run(tmp_path / "forced", "epochs=2")
    state = load_checkpoint(tmp_path / "forced" / LAST)  # epoch 1's, complete
    assert state["progress"]["epoch"] == 1
    assert same_weights(tmp_path / "ref" / LAST, tmp_path / "forced" / LAST)
    assert not list((tmp_path / "forced").glob(".*.tmp"))


# --------------------------------------------------------------------------- corrupt / foreign
def test_a_truncated_last_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reference = run(tmp_path / "ref", "epochs=3")
    with monkeypatch.context() as patch:
        signal_after(patch, 24, signal.SIGTERM)  # stop after epoch 2's checkpoint
        with pytest.raises(Preempted):
            run(tmp_path / "cut", "epochs=3")
    last = tmp_path / "cut" / LAST
    assert load_checkpoint(tmp_path / "cut" / PREVIOUS)["progress"]["epoch"] == 1
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a damaged file

    with caplog.at_level(logging.WARNING):
        resumed = run(tmp_path / "cut", "epochs=3", "resume=true")
    assert "previous checkpoint" in caplog.text
    assert resumed["final"] == reference["final"]
    assert same_weights(tmp_path / "ref" / LAST, last)
    rows = untimed(read_rows(tmp_path / "cut" / "metrics.jsonl"))
    assert rows == untimed(read_rows(tmp_path / "ref" / "metrics.jsonl"))


def test_garbage_in_every_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / LAST).write_bytes(b"garbage")
    (tmp_path / PREVIOUS).write_bytes(b"")
    with pytest.raises(ConfigError, match="unreadable checkpoint"):
        load_latest(tmp_path)


class _Exploit:
    """Unpickling this would create a file: the classic pickle payload, made harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_malicious_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "config": {}, "payload": _Exploit(marker)}, tmp_path / LAST)
    with pytest.raises(ConfigError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path / LAST)
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path: Path) -> None:
    run(tmp_path, "epochs=1")
    with pytest.raises(ConfigError, match=r"model\.name=\"smallcnn\"") as info:
        run(tmp_path, "epochs=1", "model=smallcnn", "resume=true")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- bad numbers
def nan_after(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """From the ``batches``-th step on, the method reports a NaN loss and poisons the weights."""
    calls = {"n": 0}
    original = engine.Trainer._add_loss

    def add_loss(self: Trainer, loss_sum: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] >= batches:
            loss_sum = torch.full_like(loss_sum, float("nan"))
            with torch.no_grad():
                next(self.parts.model.parameters()).fill_(float("nan"))
        original(self, loss_sum)

    monkeypatch.setattr(engine.Trainer, "_add_loss", add_loss)


def test_a_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        nan_after(patch, 15)  # epoch 2
        with pytest.raises(NonFiniteLoss, match="nonfinite=skip"):
            run(tmp_path, "epochs=3")
    state = load_checkpoint(tmp_path / LAST)
    assert state["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in read_rows(tmp_path / "metrics.jsonl")] == [1.0]
    assert not (tmp_path / "summary.json").exists()


def test_skip_mode_refuses_non_finite_steps_and_counts_them() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = GuardedSGD(model.parameters(), lr=0.1, skip_nonfinite=True)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.full((1, 3), float("inf"))).sum().backward()
    optimizer.step()
    assert optimizer.skipped == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert optimizer.skipped == 1
    assert not torch.equal(before[0], model.weight)


def test_skip_mode_trains_through_bad_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = engine.Trainer._add_loss
    calls = {"n": 0}

    def poisoned_step(self: Trainer, loss_sum: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] in (3, 7):  # what a NaN batch does: NaN loss and gradients
            for p in self.parts.model.parameters():
                p.grad = torch.full_like(p, float("nan"))
            self.parts.optimizer.step()
            loss_sum = torch.full_like(loss_sum, float("nan"))
        original(self, loss_sum)

    monkeypatch.setattr(engine.Trainer, "_add_loss", poisoned_step)
    summary = run(tmp_path, "epochs=1", "nonfinite=skip")
    assert summary["skipped_steps"] == 2
    row = read_rows(tmp_path / "metrics.jsonl")[-1]
    assert row["skipped_steps"] == 2 and row["train_loss"] == pytest.approx(row["train_loss"])
    state = load_checkpoint(tmp_path / LAST)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# --------------------------------------------------------------------------- full disks, loggers
def test_save_atomic_keeps_one_previous_version(tmp_path: Path) -> None:
    path = tmp_path / LAST
    for version in range(3):
        save_atomic({"v": torch.tensor(version)}, path, keep_previous=True)
    assert int(load_checkpoint(path)["v"]) == 2
    assert int(load_checkpoint(tmp_path / PREVIOUS)["v"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LAST, PREVIOUS])


class _FlakySink:
    run_id = "flaky"

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any]) -> None:
        if len(self.rows) == 1:
            raise ConnectionError("wandb.ai unreachable")
        self.rows.append(row)

    def summary(self, summary: dict[str, Any]) -> None:
        raise AssertionError("a failed sink is not called again")

    def close(self) -> None:
        raise AssertionError("a failed sink is not called again")


def test_a_failing_logger_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    flaky = _FlakySink()
    sink = GuardedSink("W&B", flaky)
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            sink.log({"i": i})
        sink.summary({})
        sink.close()
    assert flaky.rows == [{"i": 0}]
    assert "W&B failed (ConnectionError: wandb.ai unreachable)" in caplog.text


def test_wandb_that_cannot_start_online_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wandb = pytest.importorskip("wandb")
    real_init = wandb.init
    modes: list[str] = []

    def init(*args: Any, **kwargs: Any) -> Any:
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("network unreachable")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level(logging.WARNING):
        summary = run(tmp_path, "epochs=1", "logger=wandb", "logger.mode=online")
    assert modes == ["online", "offline"]
    assert "falling back to mode=offline" in caplog.text
    assert summary["status"] == "completed"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_step_output_contract_used_by_the_nan_tests() -> None:
    """The NaN tests poison ``loss_sum`` as the engine sees it: a 0-d device tensor."""
    out = StepOutput(torch.tensor(1.0), torch.tensor(1))
    assert out.loss_sum.dim() == 0


def test_resume_auto_starts_fresh_or_continues(tmp_path: Path) -> None:
    """What a cluster requeue needs: the same command line works before and after a checkpoint."""
    first = run(tmp_path, "epochs=1", "resume=auto")
    again = run(tmp_path, "epochs=1", "resume=auto")
    assert again["final"] == first["final"] and again["iterations"] == first["iterations"]
    with pytest.raises(ConfigError, match="allowed: true, false, auto"):
        run(tmp_path / "bad", "resume=maybe")
