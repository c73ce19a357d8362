"""Loggers: W&B offline inside the run dir with train_seconds as x axis; the CSV mirror."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amata_runner.engine import Trainer
from amata_runner.logging.metrics import MetricsFile, read_rows
from conftest import FAST, compose_resolved

pytest.importorskip("wandb")


def test_wandb_offline_run_lives_in_the_run_dir_and_resumes_by_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_resolved([*FAST, "epochs=1", "logger=wandb", "logger.tags=[test]"])
    Trainer(cfg, tmp_path).run()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = torch.load(tmp_path / "last.ckpt", weights_only=True)["wandb_id"]
    assert run_id and runs[0].name.endswith(run_id)
    # the logged history carries the x axis and the errors (the offline .wandb file holds them)
    assert any(runs[0].glob("*.wandb"))
    assert len(read_rows(tmp_path / "metrics.jsonl")) == 1  # JSONL is written alongside


def test_metrics_file_truncates_to_the_checkpoint_and_survives_a_torn_line(tmp_path: Path) -> None:
    metrics = MetricsFile(tmp_path)
    for iteration in (5, 10, 15):
        metrics.log({"iteration": iteration, "robust_error": 0.5})
    metrics.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"iteration": 20, "robu')  # a crash in the middle of a write
    assert [r["iteration"] for r in read_rows(tmp_path / "metrics.jsonl")] == [5, 10, 15]
    resumed = MetricsFile(tmp_path, keep_until_iteration=10)
    resumed.log({"iteration": 15, "robust_error": 0.4})
    resumed.write_csv()
    resumed.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [(r["iteration"], r["robust_error"]) for r in rows] == [(5, 0.5), (10, 0.5), (15, 0.4)]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "iteration,robust_error"


def test_each_job_of_a_process_gets_its_own_wandb_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multirun executes jobs in one process: each must open and finish a W&B run of its own."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for job in ("0", "1"):
        cfg = compose_resolved([*FAST, "epochs=1", "logger=wandb", f"seed={job}"])
        (tmp_path / job).mkdir()
        Trainer(cfg, tmp_path / job).run()
        ids.append(torch.load(tmp_path / job / "last.ckpt", weights_only=True)["wandb_id"])
        assert len(list((tmp_path / job / "wandb").glob("offline-run-*"))) == 1
    assert ids[0] != ids[1]
