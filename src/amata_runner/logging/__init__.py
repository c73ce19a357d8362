"""Metrics sinks: metrics.jsonl always (the source every report reads), W&B or TensorBoard
when asked for."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from amata_runner.logging.console import ProgressBar
from amata_runner.logging.metrics import MetricsFile, MetricsSink

log = logging.getLogger(__name__)


class GuardedSink:
    """A sink whose failures are warnings: a logging service going down never stops training.

    After the first failure the sink is dropped for the rest of the run; metrics.jsonl (written
    separately, always) still holds every row, so nothing is lost.
    """

    def __init__(self, name: str, sink: MetricsSink) -> None:
        self.name = name
        self._sink: MetricsSink | None = sink
        self.run_id = sink.run_id

    def _call(self, what: str, *args: Any) -> None:
        if self._sink is None:
            return
        try:
            getattr(self._sink, what)(*args)
        except Exception as exc:
            log.warning(
                "%s failed (%s: %s); continuing with local logging only (metrics.jsonl)",
                self.name,
                type(exc).__name__,
                exc,
            )
            self._sink = None

    def log(self, row: dict[str, Any]) -> None:
        self._call("log", row)

    def summary(self, summary: dict[str, Any]) -> None:
        self._call("summary", summary)

    def close(self) -> None:
        self._call("close")


def _wandb_sink(
    cfg: DictConfig, run_dir: Path, resume_id: str | None, resolved: dict[str, Any]
) -> MetricsSink | None:
    """W&B as configured; if it cannot start (no network, bad key), offline; else none."""
    from amata_runner.logging.wandb_sink import WandbSink

    try:
        return WandbSink(cfg.logger, run_dir, resume_id=resume_id, config=resolved)
    except Exception as exc:
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if cfg.logger.mode == "offline":
            log.warning("W&B could not start (%s); logging to metrics.jsonl only", first)
            return None
        log.warning("W&B could not start (%s); falling back to mode=offline", first)
    offline = OmegaConf.merge(cfg.logger, {"mode": "offline"})
    try:
        return WandbSink(offline, run_dir, resume_id=resume_id, config=resolved)
    except Exception as exc:
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.warning("W&B offline failed too (%s); logging to metrics.jsonl only", first)
        return None


def build_sinks(
    cfg: DictConfig, run_dir: Path, *, resume_id: str | None, resolved: dict[str, Any]
) -> list[MetricsSink]:
    """The sinks for this run; W&B / TensorBoard are imported only when the logger asks."""
    sinks: list[MetricsSink] = []
    if cfg.logger.name == "wandb":
        sink = _wandb_sink(cfg, run_dir, resume_id, resolved)
        if sink is not None:
            sinks.append(GuardedSink("W&B", sink))
    if cfg.logger.name == "tensorboard":
        from amata_runner.logging.tensorboard_sink import TensorBoardSink

        try:
            sinks.append(GuardedSink("TensorBoard", TensorBoardSink(run_dir, config=resolved)))
        except Exception as exc:
            first = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("TensorBoard could not start (%s); logging to metrics.jsonl only", first)
    return sinks


__all__ = ["MetricsFile", "MetricsSink", "ProgressBar", "build_sinks"]
