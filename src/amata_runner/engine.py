"""The training loop: epochs, the train-only clock, periodic evaluation, checkpoints, stopping.

The engine knows nothing about how a method trains on a batch (``Method.train_batch``), how a
schedule chooses its control (``ControlSchedule.decide``) or how the run was put together
(:func:`~amata_runner.build.build_run`); it owns time, bookkeeping and files:

- the clock runs only around training iterations; evaluation, checkpointing and logging happen
  with it paused, so ``train_seconds`` is the x axis of every error-versus-time curve;
- device values (loss, accuracy) are summed on the device and read once per evaluation point;
- each evaluation point appends one metrics row at once; each epoch ends with an atomic ``last``
  checkpoint holding everything needed to continue bit-for-bit (``resume=true``, see
  :mod:`~amata_runner.runtime.run_state`), the one before it kept as ``last.prev``;
- a stop signal (``interrupts``) ends the current step, then writes a mid-epoch checkpoint that
  resumes at the next batch; a NaN/Inf loss (``nonfinite``) stops before anything poisoned is
  written.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from amata_runner.build import Run, build_run
from amata_runner.control.schedules import Control
from amata_runner.evaluation import AttackSpec, EvalResult, evaluate
from amata_runner.final_eval import final_attack_names, final_evaluation
from amata_runner.logging import MetricsFile, MetricsSink, ProgressBar, build_sinks
from amata_runner.logging.metrics import write_json_atomic
from amata_runner.logging.progress import RunLog
from amata_runner.runtime.checkpoint import BEST, LAST, copy_atomic, save_atomic
from amata_runner.runtime.clock import TrainClock
from amata_runner.runtime.interrupts import Preempted, StopRequests
from amata_runner.runtime.nonfinite import NonFiniteLoss
from amata_runner.runtime.provenance import collect as collect_provenance
from amata_runner.runtime.provenance import now as timestamp
from amata_runner.runtime.run_state import Progress, Start, checkpoint_state, prepare_start, restore
from amata_runner.summary import summarise_training

log = logging.getLogger(__name__)


class RowSums:
    """Training loss and correct counts since the last metrics row, summed on the device, so a
    batch costs no host sync; they are read once per row."""

    def __init__(self, device: torch.device, skip_nonfinite: bool) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0
        self.loss_seen = 0  # examples whose loss is in loss_sum (fewer when steps are skipped)
        self.last_loss_finite = True
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    def add_loss(self, loss_sum: torch.Tensor) -> None:
        """Sum the batch loss on the device; remember (without a sync) whether it was finite."""
        finite = torch.isfinite(loss_sum)
        if self.skip_nonfinite:  # the step was refused: its loss is not part of the mean
            self.last_loss_finite = bool(finite.item())  # skip mode syncs per step anyway
            loss_sum = torch.where(finite, loss_sum, torch.zeros_like(loss_sum))
        else:
            self.finite &= finite
        self.loss_sum += loss_sum

    def add_batch(self, correct: torch.Tensor, n: int) -> None:
        self.correct += correct
        self.seen += n
        if self.last_loss_finite:
            self.loss_seen += n

    def take(self) -> tuple[float | None, float | None]:
        """(mean training loss, training error) since the last row; the next row starts at 0."""
        seen, loss_seen = self.seen, self.loss_seen
        train_loss = self.loss_sum.item() / loss_seen if loss_seen else None
        train_error = 1.0 - self.correct.item() / seen if seen else None
        self.loss_sum.zero_()
        self.correct.zero_()
        self.seen = self.loss_seen = 0
        return train_loss, train_error

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum.item(),
            "correct": int(self.correct.item()),
            "seen": self.seen,
            "loss_seen": self.loss_seen,
        }

    def load_state_dict(self, pending: dict[str, Any]) -> None:
        self.loss_sum.fill_(pending["loss_sum"])
        self.correct.fill_(pending["correct"])
        self.seen = int(pending["seen"])
        self.loss_seen = int(pending.get("loss_seen", pending["seen"]))


class Trainer:
    """One run in one directory: built from the resolved config, then ``run()``."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        start: Start | None = None,
        stop: StopRequests | None = None,
    ) -> None:
        """``start``: what :func:`prepare_start` found (computed here when not given); ``stop``:
        the stop requests already listening for the whole job (amata-run's), if any."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.start = start if start is not None else prepare_start(cfg, run_dir)
        self.parts: Run = build_run(cfg, self.start)
        self.job, self.device = self.parts.job, self.parts.device
        self.skip_nonfinite = cfg.nonfinite == "skip"
        self.clock = TrainClock(self.device)
        self.progress = Progress()
        self._best_pending = False  # an evaluation beat the best so far; best.ckpt is due
        self.sums = RowSums(self.device, self.skip_nonfinite)
        self.stop = stop if stop is not None else StopRequests()
        self._last_saved: dict[str, int] | None = None  # progress at the newest checkpoint
        self._checked_iteration = 0  # the loss was last known finite at this iteration
        self.wandb_id: str | None = None

    # ------------------------------------------------------------------ helpers
    def control(self, epoch: int, iteration: int = 0) -> Control | None:
        """The control for this batch; an adaptive schedule decides here (on the train clock)."""
        schedule = self.parts.schedule
        return None if schedule is None else schedule.decide(self.parts.model, epoch, iteration)

    def _restore(self) -> bool:
        """Continue from the checkpoint :func:`prepare_start` chose, if it chose one."""
        if self.start is None:
            return False
        start = self.start
        self.start = None  # the state is consumed: do not keep a second copy of the weights
        restored = restore(self.cfg, self.parts, start)
        self.progress = restored.progress
        self.clock = TrainClock(self.device, elapsed=restored.train_seconds)
        self.sums.load_state_dict(restored.since_last_row)
        self.wandb_id = restored.wandb_id
        self._last_saved = self.progress.position()
        self._checked_iteration = self.progress.iteration
        # Epochs counted from 1, as the progress bar and the progress lines count them.
        at = self.progress
        where = (
            f"in epoch {at.epoch + 1} at batch {at.batch + 1}"
            if at.batch
            else f"after epoch {at.epoch} (of {self.parts.epochs})"
        )
        log.info("resumed %s from %s %s", self.run_dir, start.path.name, where)
        return True

    def _evaluate(
        self, images: torch.Tensor, labels: torch.Tensor, attack: AttackSpec
    ) -> EvalResult:
        return evaluate(
            self.parts.model,
            images,
            labels,
            attack,
            batch_size=self.cfg.eval.batch_size,
            seed=self.cfg.eval.seed,
        )

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        self._started = timestamp()
        resumed = self._restore()
        metrics = MetricsFile(
            self.run_dir,
            keep_until_iteration=self.progress.iteration if resumed else None,
            write=self.job.is_main,
        )
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        resolved["provenance"] = collect_provenance(self.device, started=self._started, ended=False)
        sinks = (
            build_sinks(self.cfg, self.run_dir, resume_id=self.wandb_id, resolved=resolved)
            if self.job.is_main
            else []
        )
        for sink in sinks:
            self.wandb_id = sink.run_id or self.wandb_id
        bar = ProgressBar(
            total=self.parts.epochs * len(self.parts.loader),
            initial=self.progress.iteration,
            enabled=self.cfg.progress,
            desc=str(self.cfg.name),
        )
        self._bar = bar
        self.runlog = RunLog(
            self.run_dir,
            epochs=self.parts.epochs,
            iterations=self.parts.epochs * len(self.parts.loader),
            done=self.progress.iteration,
            bar_shown=bar.shown,
            write=self.job.is_main,
        )
        listening = nullcontext() if self.stop.installed else self.stop
        try:
            with listening:
                if self._stop_requested():  # a signal during start-up: nothing trained yet
                    raise Preempted(self.stop.signum or 0, "during start-up, before training")
                self._train(metrics, sinks, bar)
                summary = self._summarise(metrics.rows)
            if self.job.is_main:
                write_json_atomic(self.run_dir / "summary.json", summary)
            for sink in sinks:
                sink.summary(summary)
            return summary
        finally:
            bar.close()
            metrics.write_csv()
            metrics.close()
            for sink in sinks:
                sink.close()

    def _train(self, metrics: MetricsFile, sinks: list[MetricsSink], bar: ProgressBar) -> None:
        if self.progress.stopped_early:  # a resumed run that its method had already ended
            return
        cfg, method, loader = self.cfg, self.parts.method, self.parts.loader
        lr_scheduler, lr_per_iteration = self.parts.lr_scheduler, self.parts.lr_per_iteration
        every, by_iteration = cfg.eval.every, cfg.eval.unit == "iteration"
        schedule = self.parts.schedule
        per_iteration_control = schedule is not None and schedule.per_iteration
        last_row_iteration = metrics.rows[-1]["iteration"] if metrics.rows else -1
        for epoch in range(self.progress.epoch, self.parts.epochs):
            first = self.progress.batch  # > 0: resuming inside this epoch
            self.clock.start()
            control = self.control(epoch, first)
            if first:
                method.resume_epoch(epoch, control)
            else:
                method.start_epoch(epoch, control)
            last_batch = len(loader) - 1
            for i, batch in enumerate(loader, start=first):
                if per_iteration_control:
                    control = self.control(epoch, i)
                out = method.train_batch(batch, control)
                if lr_per_iteration:
                    lr_scheduler.step()
                n = batch.x.shape[0] * self.job.world  # the global batch
                self._add_loss(out.loss_sum)
                self.sums.add_batch(out.correct, n)
                self.progress.iteration += 1
                self.progress.batch = i + 1
                self.progress.examples += n
                bar.update()
                if by_iteration and self.progress.iteration % every == 0:
                    with self.clock.paused():
                        epoch_float = epoch + (i + 1) / len(loader)
                        self._emit(self._row(epoch_float, control), metrics, sinks, bar)
                        last_row_iteration = self.progress.iteration
                if self._stop_requested() and i < last_batch:
                    self.clock.stop()
                    self._save_checkpoint(metrics)
                    raise Preempted(self.stop.signum or 0)
            stopping = method.stop_requested()  # its check is training work: on the clock
            self.clock.stop()
            self.progress.epoch = epoch + 1
            self.progress.batch = 0
            self.progress.stopped_early = stopping
            if stopping:
                log.info("%s asked to stop after epoch %d", cfg.method.name, epoch + 1)
            last_epoch = epoch + 1 == self.parts.epochs or stopping
            due = (not by_iteration and (epoch + 1) % every == 0) or last_epoch
            if due and last_row_iteration != self.progress.iteration:
                self._emit(self._row(float(epoch + 1), control), metrics, sinks, bar)
                last_row_iteration = self.progress.iteration
            if not lr_per_iteration:  # after the row, so it shows the lr this epoch used
                lr_scheduler.step()
            self._save_checkpoint(metrics)
            if stopping:
                break
            if self._stop_requested() and not last_epoch:
                raise Preempted(self.stop.signum or 0)

    def _add_loss(self, loss_sum: torch.Tensor) -> None:
        """One batch's loss into the row sums (the hook the tests poison)."""
        self.sums.add_loss(loss_sum)

    def _stop_requested(self) -> bool:
        """A stop signal reached this process (under torchrun: any rank; all stop together)."""
        if self.job.enabled:
            return self.job.any(self.stop.requested, self.device)
        return self.stop.requested

    def _check_finite(self) -> None:
        """Stop (nonfinite=stop) before a poisoned model is evaluated or saved.

        Two host syncs, at evaluation points and checkpoints only: the flag folded from every
        batch's loss, and the weights and optimiser state themselves (an update can poison them
        while the loss that produced it was still finite). nonfinite=skip checks the fraction of
        refused steps instead."""
        if self.skip_nonfinite:
            self._check_skipped()
            return
        bad_loss = not bool(self.sums.finite.item())
        bad_weights = not _all_finite(self.parts.model, self.parts.optimizer)
        if self.job.any(bad_loss or bad_weights, self.device):
            what = "the training loss" if bad_loss else "the weights"
            raise NonFiniteLoss(
                f"{what} became NaN or Inf between iteration {self._checked_iteration} and "
                f"iteration {self.progress.iteration} (epoch {self.progress.epoch + 1}); "
                f"{self._kept_checkpoint()}"
            )
        self._checked_iteration = self.progress.iteration

    def _kept_checkpoint(self) -> str:
        """What the user can resume from after a NaN stop, said exactly."""
        if self._last_saved is None:
            return (
                "no checkpoint had been written yet, so nothing was saved: start again with a "
                "smaller optim.lr, or set nonfinite=skip"
            )
        at = self._last_saved
        where = f"epoch {at['epoch']}" + (f", batch {at['batch']}" if at["batch"] else "")
        return (
            f"nothing poisoned was saved; {self.run_dir / LAST} (iteration {at['iteration']}, "
            f"after {where}) is the last good checkpoint: continue it with resume=true and a "
            "smaller optim.lr (the one setting a resumption may change), or set nonfinite=skip"
        )

    def _check_skipped(self) -> None:
        """nonfinite=skip: a run that refuses most of its steps is not training; fail it."""
        attempted, skipped = self.parts.optimizer.attempted, self.parts.optimizer.skipped
        limit = float(self.cfg.nonfinite_skip_limit)
        if attempted and skipped / attempted > limit:
            raise NonFiniteLoss(
                f"nonfinite=skip refused {skipped} of {attempted} optimiser steps "
                f"({skipped / attempted:.0%}), more than nonfinite_skip_limit={limit:g}: the run "
                f"is not training; {self._kept_checkpoint()}"
            )

    def _row(self, epoch: float, control: Control | None) -> dict[str, Any]:
        """Evaluate and build one metrics row; resets the since-last-row training sums."""
        self._check_finite()
        parts = self.parts
        train_loss, train_error = self.sums.take()
        result = self._evaluate(parts.eval_images, parts.eval_labels, parts.eval_attack)
        val = None
        if parts.val_images is not None and parts.val_labels is not None:
            val = self._evaluate(parts.val_images, parts.val_labels, parts.eval_attack)
        row: dict[str, Any] = {
            "epoch": round(epoch, 6),
            "iteration": self.progress.iteration,
            "examples": self.progress.examples,
            "train_seconds": self.clock.seconds,
            "forward_passes": parts.counter.forward * self.job.world,
            "backward_passes": parts.counter.backward * self.job.world,
            **self.parts.method.knobs(control),
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_error": train_error,
            # clean_error / robust_error: the fixed test subset (eval_split says so); val_*: the
            # validation split, the only one any choice is made on
            "clean_error": result.clean_error,
            "robust_error": result.robust_error,
            "eval_examples": result.total,
            "eval_split": "test",
            "eval_attack": parts.eval_attack.name,
            **self.parts.method.metrics(),
        }
        if val is not None:
            row["val_clean_error"] = val.clean_error
            row["val_robust_error"] = val.robust_error
            row["val_examples"] = val.total
        if parts.schedule is not None:
            row.update(parts.schedule.metrics())
        if self.skip_nonfinite:
            optimizer = parts.optimizer
            row["skipped_steps"] = optimizer.skipped
            row["skipped_fraction"] = optimizer.skipped / max(optimizer.attempted, 1)
        criterion = parts.criterion
        if criterion is not None and control is not None and self._criterion_due(epoch):
            row.update(criterion.measure(parts.model, control.steps, control.step_size))
        # The best checkpoint is chosen on the validation split only; without one there is none.
        if val is not None and val.robust_accuracy > self.progress.best_robust_accuracy:
            self.progress.best_robust_accuracy = val.robust_accuracy
            self.progress.best_epoch = int(np.ceil(epoch))
            self._best_pending = True
        return row

    def _criterion_due(self, epoch: float) -> bool:
        """Rows that close a whole epoch, every ``eval.criterion.every`` epochs; C scores the
        control that produced the weights during the epoch just finished."""
        return float(epoch).is_integer() and int(epoch) % self.cfg.eval.criterion.every == 0

    def _emit(
        self, row: dict[str, Any], metrics: MetricsFile, sinks: list[MetricsSink], bar: ProgressBar
    ) -> None:
        metrics.log(row)
        for sink in sinks:
            sink.log(row)
        shown = {k: row[k] for k in ("K", "clean_error", "robust_error") if k in row}
        bar.show({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in shown.items()})
        self.runlog.row(row)

    def _save_checkpoint(self, metrics: MetricsFile) -> None:
        self._check_finite()
        self.progress.skipped_steps = self.parts.optimizer.skipped
        self.progress.optimizer_steps = self.parts.optimizer.attempted
        if not self.job.is_main:
            return
        with self.stop.deferred():  # a second signal lets the write finish first
            state = checkpoint_state(
                self.cfg,
                self.parts,
                self.progress,
                self.clock.seconds,
                self.sums.state_dict(),
                self.wandb_id,
            )
            save_atomic(state, self.run_dir / LAST, keep_previous=True)
            self._last_saved = self.progress.position()
            if self.cfg.save_best and self._best_pending:
                copy_atomic(self.run_dir / LAST, self.run_dir / BEST)
                self._best_pending = False
            metrics.write_csv()

    # ------------------------------------------------------------------ summary
    def _summarise(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        summary = summarise_training(cfg, self.parts, self.progress, self.clock.seconds, rows)
        if cfg.eval.final:
            names = final_attack_names(cfg)
            self._bar.evaluating(", ".join(names))
            self.runlog.evaluating(names, len(self.parts.test_set))
            summary["final"] = final_evaluation(
                cfg,
                self.parts,
                self.run_dir,
                self.progress.iteration,
                self.stop,
                self._stop_requested,
            )
        summary["provenance"] = collect_provenance(self.device, started=self._started)
        return summary


def _all_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Every parameter, buffer and optimiser-state tensor is finite (one host sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    for state in optimizer.state.values():
        tensors += [t for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all().item())


def train(
    cfg: DictConfig,
    run_dir: Path,
    start: Start | None = None,
    stop: StopRequests | None = None,
) -> dict[str, Any]:
    """Train the configured run in ``run_dir`` (resolved config) and return its summary."""
    return Trainer(cfg, run_dir, start=start, stop=stop).run()
