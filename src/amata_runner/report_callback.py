"""A Hydra callback that keeps a sweep's report up to date, so a multirun collects itself.

Hydra calls ``on_multirun_end`` only when every job succeeded (a failed job's exception ends the
sweep first), so the report is also rewritten after each job of a multirun (``on_job_end``, which
Hydra calls for failed jobs too): the sweep directory always holds a report that lists the failed
jobs as failed. A report problem is logged as a warning and never fails a job or the sweep.

It also says where a grid's results go: the sweep directory when the grid starts, and the report
when it ends (both to stdout, so a grid under ``nohup`` or SLURM names them in its output).

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

from amata_runner.logging.progress import say

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    def __init__(
        self, smoothing: float | None = None, plots: bool = True, after_each_job: bool = True
    ) -> None:
        self.smoothing = smoothing
        self.plots = plots
        self.after_each_job = after_each_job

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _sweep_dir(config)
        say(f"sweep dir: {sweep_dir} (report.md there is rewritten after each job)")

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        mode = OmegaConf.select(config, "hydra.mode")
        if self.after_each_job and getattr(mode, "name", str(mode)) == "MULTIRUN":
            self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report = self._write(config)
        if report is not None:
            say(f"sweep done: {_sweep_dir(config)}; report: {report}")

    def _write(self, config: DictConfig) -> Path | None:
        try:
            from amata_runner.report import write_report

            sweep_dir = _sweep_dir(config)
            report = write_report(
                [sweep_dir], sweep_dir, smoothing=self.smoothing, plots=self.plots
            )
            log.info("report: %s", report.markdown)
            return report.markdown
        except Exception as exc:  # a report must never make the sweep fail
            log.warning("amata-report could not write the sweep report: %s", exc)
            return None


def _sweep_dir(config: DictConfig) -> Path:
    return Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()
