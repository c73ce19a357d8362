"""A Hydra callback that keeps a sweep's report up to date, so a multirun collects itself.

Hydra calls ``on_multirun_end`` only when every job succeeded (a failed job's exception ends the
sweep first), so the report is also rewritten after each job of a multirun (``on_job_end``, which
Hydra calls for failed jobs too): the sweep directory always holds a report that lists the failed
jobs as failed. A report problem is logged as a warning and never fails a job or the sweep.

Wire it in ``conf/hydra/default.yaml``::

    callbacks:
      report:
        _target_: amata_runner.report_callback.ReportCallback
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    def __init__(
        self, smoothing: float | None = None, plots: bool = True, after_each_job: bool = True
    ) -> None:
        self.smoothing = smoothing
        self.plots = plots
        self.after_each_job = after_each_job

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        mode = OmegaConf.select(config, "hydra.mode")
        if self.after_each_job and getattr(mode, "name", str(mode)) == "MULTIRUN":
            self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config)

    def _write(self, config: DictConfig) -> None:
        try:
            from amata_runner.report import write_report

            sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
            report = write_report(
                [sweep_dir], sweep_dir, smoothing=self.smoothing, plots=self.plots
            )
            log.info("report: %s", report.markdown)
        except Exception as exc:  # a report must never make the sweep fail
            log.warning("amata-report could not write the sweep report: %s", exc)
