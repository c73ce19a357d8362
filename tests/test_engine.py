"""The training loop: the train-only clock, counted passes, checkpoints and exact resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from amata_runner import engine, final_eval
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.logging.metrics import read_rows
from amata_runner.methods.pgd import PGD
from amata_runner.runtime import clock
from amata_runner.runtime.checkpoint import load_checkpoint
from amata_runner.summary import time_to_targets
from conftest import FAST, compose_resolved

TIMING_KEYS = {"train_seconds"}


def run(tmp: Path, *overrides: str) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    return Trainer(compose_resolved([*FAST, *overrides]), tmp).run()


def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_run_writes_rows_summary_and_safe_checkpoints(tmp_path: Path) -> None:
    summary = run(tmp_path)
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    for key in (
        "iteration",
        "examples",
        "train_seconds",
        "forward_passes",
        "backward_passes",
        "K",
        "alpha",
        "lr",
        "train_loss",
        "clean_error",
        "robust_error",
    ):
        assert all(key in r for r in rows), key
    assert rows[0]["train_seconds"] < rows[1]["train_seconds"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["final"]["examples"] == 359  # the whole digits test split
    assert set(summary["final"]["robust_accuracy"]) == {"pgd3"}
    for name in ("last.ckpt", "best.ckpt"):
        state = torch.load(tmp_path / name, weights_only=True)  # safe loading works
        assert {"model", "optimizer", "lr_scheduler", "rng", "progress", "config"} <= set(state)
    assert load_checkpoint(tmp_path / "last.ckpt")["progress"]["epoch"] == 2
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,iteration")


def test_passes_are_counted_from_the_schedule(tmp_path: Path) -> None:
    summary = run(tmp_path / "amata", "schedule.k_min=1", "schedule.endpoint=inclusive")
    n = 1238  # digits training examples (1438 less 200 validation images), once per epoch
    # epoch 1: K = 1 attack steps + 1 update pass; epoch 2: K = 3 (method.steps)
    assert summary["forward_passes"] == n * (1 + 1) + n * (3 + 1)
    assert summary["backward_passes"] == summary["forward_passes"]
    erm = run(tmp_path / "erm", "method=erm")
    assert erm["forward_passes"] == 2 * n
    rows = read_rows(tmp_path / "amata" / "metrics.jsonl")
    assert [r["K"] for r in rows] == [1, 3]


def test_train_clock_excludes_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake time source: each training batch takes 1 s, each evaluation 1000 s."""
    now = {"t": 0.0}
    monkeypatch.setattr(clock, "perf_counter", lambda: now["t"])
    real_batch, real_evaluate, real_suite = PGD.train_batch, engine.evaluate, final_eval.run_suite

    def slow_batch(self: PGD, *args: Any) -> Any:
        now["t"] += 1.0
        return real_batch(self, *args)

    def slow_evaluate(*args: Any, **kwargs: Any) -> Any:
        now["t"] += 1000.0
        return real_evaluate(*args, **kwargs)

    def slow_suite(*args: Any, **kwargs: Any) -> Any:
        now["t"] += 1000.0
        return real_suite(*args, **kwargs)

    monkeypatch.setattr(PGD, "train_batch", slow_batch)
    monkeypatch.setattr(engine, "evaluate", slow_evaluate)
    monkeypatch.setattr(final_eval, "run_suite", slow_suite)
    summary = run(tmp_path)
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["train_seconds"] for r in rows] == [10.0, 20.0]  # 10 batches per epoch
    assert summary["train_seconds"] == 20.0
    # the evaluations did take (fake) time: per row the test subset and the validation split,
    # then the final evaluation
    assert now["t"] == 20.0 + (2 * 2 + 1) * 1000.0


class Crash(Exception):
    pass


def crash_after(monkeypatch: pytest.MonkeyPatch, iterations: int) -> None:
    """Make training raise in the middle of an epoch, after ``iterations`` batches."""
    calls = {"n": 0}
    original = engine.Trainer.control

    def control(self: Trainer, epoch: int, iteration: int = 0) -> Any:
        calls["n"] += 1
        if calls["n"] > iterations:
            raise Crash
        return original(self, epoch, iteration)

    monkeypatch.setattr(engine.Trainer, "control", control)


def test_resume_after_a_crash_gives_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("eval.unit=iteration", "eval.every=5", "schedule.unit=iteration")
    reference = run(tmp_path / "ref", *args)
    ref_rows = read_rows(tmp_path / "ref" / "metrics.jsonl")

    with monkeypatch.context() as patch:
        crash_after(patch, 17)  # epoch 1 has 10 iterations: crash inside epoch 2
        with pytest.raises(Crash):
            run(tmp_path / "crash", *args)
    partial = read_rows(tmp_path / "crash" / "metrics.jsonl")
    assert partial[-1]["iteration"] == 15  # a row written after the epoch-1 checkpoint

    resumed = run(tmp_path / "crash", *args, "resume=true")
    rows = read_rows(tmp_path / "crash" / "metrics.jsonl")
    assert untimed(rows) == untimed(ref_rows)  # no duplicated, no missing rows
    assert all(a["train_seconds"] < b["train_seconds"] for a, b in itertools.pairwise(rows))
    assert resumed["final"] == reference["final"]
    for key in ("forward_passes", "backward_passes", "iterations", "examples"):
        assert resumed[key] == reference[key]
    ref_model = torch.load(tmp_path / "ref" / "last.ckpt", weights_only=True)["model"]
    new_model = torch.load(tmp_path / "crash" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(ref_model[k], new_model[k]) for k in ref_model)


def test_resume_after_one_of_two_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = run(tmp_path / "ref")
    with monkeypatch.context() as patch:
        crash_after(patch, 1)  # per-epoch control: the second call starts epoch 2
        with pytest.raises(Crash):
            run(tmp_path / "split")
    state = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    assert state["progress"]["epoch"] == 1
    with pytest.raises(ConfigError, match=r"dataset\.threat\.steps=4"):  # other settings: refused
        run(tmp_path / "split", "resume=true", "dataset.threat.steps=4")
    resumed = run(tmp_path / "split", "resume=true")
    assert resumed["final"] == reference["final"]
    rows = untimed(read_rows(tmp_path / "split" / "metrics.jsonl"))
    assert rows == untimed(read_rows(tmp_path / "ref" / "metrics.jsonl"))


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    run(tmp_path, "epochs=1")
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="resume=true"):
        run(tmp_path, "epochs=1")
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="unreadable checkpoint"):
        run(tmp_path, "resume=true")


def test_time_to_targets_uses_the_first_row_below_target() -> None:
    rows = [
        {
            "robust_error": 0.9,
            "train_seconds": 1.0,
            "epoch": 1,
            "iteration": 10,
            "forward_passes": 5,
            "backward_passes": 5,
        },
        {
            "robust_error": 0.5,
            "train_seconds": 2.0,
            "epoch": 2,
            "iteration": 20,
            "forward_passes": 9,
            "backward_passes": 9,
        },
        {
            "robust_error": 0.4,
            "train_seconds": 3.0,
            "epoch": 3,
            "iteration": 30,
            "forward_passes": 13,
            "backward_passes": 13,
        },
    ]
    reached = time_to_targets(rows, "robust_error", [0.55, 0.45, 0.1])
    assert reached["robust_error<=0.55"]["train_seconds"] == 2.0
    assert reached["robust_error<=0.45"]["iteration"] == 30
    assert reached["robust_error<=0.1"] is None
