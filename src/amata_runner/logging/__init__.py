"""Metrics sinks: metrics.jsonl always (the source every report reads), W&B when asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from amata_runner.logging.console import ProgressBar
from amata_runner.logging.metrics import MetricsFile, MetricsSink


def build_sinks(
    cfg: DictConfig, run_dir: Path, *, resume_id: str | None, resolved: dict[str, Any]
) -> list[MetricsSink]:
    """The sinks for this run; W&B is imported only when ``logger=wandb`` asks for it."""
    sinks: list[MetricsSink] = []
    if cfg.logger.name == "wandb":
        from amata_runner.logging.wandb_sink import WandbSink

        sinks.append(WandbSink(cfg.logger, run_dir, resume_id=resume_id, config=resolved))
    return sinks


__all__ = ["MetricsFile", "MetricsSink", "ProgressBar", "build_sinks"]
