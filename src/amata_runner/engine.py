"""The training loop: epochs, LR schedule, the train-only clock, periodic evaluation, checkpoints.

The engine knows nothing about how a method trains on a batch (``Method.train_batch``) or how a
schedule anneals (``Schedule.at``); it owns time, bookkeeping and files:

- the clock runs only around training iterations; evaluation, checkpointing and logging happen
  with it paused, so ``train_seconds`` is the x axis of every error-versus-time curve;
- device values (loss, accuracy) are summed on the device and read once per evaluation point;
- each evaluation point appends one metrics row at once; each epoch ends with an atomic ``last``
  checkpoint holding everything needed to continue bit-for-bit (``resume=true``), the one before it
  kept as ``last.prev``;
- a stop signal (``interrupts``) ends the current step, then writes a mid-epoch checkpoint that
  resumes at the next batch; a NaN/Inf loss (``nonfinite``) stops before anything poisoned is
  written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from amata_runner.adaptive import AdaptiveSchedule, build_adaptive
from amata_runner.attacks.suite import SuiteOptions, merge_results, paper_cw_l2_c, run_suite
from amata_runner.checkpoint import (
    BEST,
    LAST,
    copy_atomic,
    load_latest,
    rng_state,
    save_atomic,
    set_rng_state,
)
from amata_runner.clock import TrainClock
from amata_runner.criterion import CriterionProbe, summarise_criterion
from amata_runner.data import ImageSet, eval_batches, eval_subset, load_run_data, make_train_loader
from amata_runner.distributed import from_env, init_process_group
from amata_runner.errors import ConfigError
from amata_runner.evaluation import AttackSpec, EvalResult, evaluate
from amata_runner.interrupts import Preempted, StopRequests
from amata_runner.logging import MetricsFile, MetricsSink, ProgressBar, build_sinks
from amata_runner.logging.metrics import write_json_atomic
from amata_runner.logging.progress import RunLog
from amata_runner.methods import Method, TrainContext, build_method
from amata_runner.nonfinite import GuardedSGD, NonFiniteLoss
from amata_runner.passes import PassCounter
from amata_runner.precision import Precision, maybe_compile, training_precision
from amata_runner.provenance import collect as collect_provenance
from amata_runner.provenance import now as timestamp
from amata_runner.run_dir import refuse_fresh_start_over_results, result_files
from amata_runner.run_files import build_model_for
from amata_runner.schedules import Control, Schedule

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
FINAL_EVAL_PARTIAL = "final_eval.partial.json"
FINAL_EVAL_CHUNK = 4096  # test images decoded at once for the folder datasets' final evaluation
# Settings that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = ("resume", "progress", "logger", "paths", "device", "nonfinite")
# Settings a resumption may change on purpose: a learning-rate rescue after a NaN stop. The LR
# schedule continues from where it was, scaled by new/old; the change is recorded in the summary.
RESUME_CHANGEABLE_KEYS = ("optim.lr",)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_backend(device: torch.device, deterministic: bool) -> None:
    """Fast kernels by default; bitwise-repeatable ones when ``deterministic`` is set."""
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_lr_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """multistep (the paper's CIFAR10 75/90), cosine, constant: stepped once per epoch;
    cyclic (Fast's 0 -> lr -> 0 triangle over the whole run): stepped every iteration."""
    if cfg.lr_schedule == "cyclic":
        total = max(epochs * iters_per_epoch, 2)
        return torch.optim.lr_scheduler.CyclicLR(
            optimizer,
            base_lr=0.0,
            max_lr=cfg.lr,
            step_size_up=total // 2,
            step_size_down=total - total // 2,
            cycle_momentum=cfg.cycle_momentum,
            base_momentum=0.8,
            max_momentum=cfg.momentum,
        )
    if cfg.lr_schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma
        )
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def build_schedule(cfg: DictConfig, epochs: int, iters_per_epoch: int) -> Schedule:
    s = cfg.schedule
    return Schedule(
        switch=float(s.switch),
        name=s.name,
        k_min=int(s.k_min),
        k_max=int(s.k_max),
        step_size=float(cfg.method.step_size),
        epochs=epochs,
        iters_per_epoch=iters_per_epoch,
        tau=None if s.tau is None else float(s.tau),
        eta=float(s.eta),
        unit=s.unit,
        endpoint=s.endpoint,
    )


@dataclass
class Start:
    """The checkpoint a resumed run continues from, loaded and checked before any write."""

    state: dict[str, Any]
    path: Path


def prepare_start(cfg: DictConfig, run_dir: Path) -> Start | None:
    """Decide how the run starts in ``run_dir`` without writing anything there.

    A fresh start (``resume=false``) refuses a directory that holds any result of another run; a
    resumption loads the newest good checkpoint and refuses one trained with other settings (or,
    with no checkpoint at all, a directory holding a finished run). Raises :class:`ConfigError`.
    """
    if cfg.resume is False:
        refuse_fresh_start_over_results(run_dir)
        return None
    latest = load_latest(run_dir, map_location="cpu")
    if latest is None:
        held = [
            name for name in result_files(run_dir) if name not in ("metrics.jsonl", "metrics.csv")
        ]
        if held:
            raise ConfigError(
                "resume",
                cfg.resume,
                f"{run_dir} holds {', '.join(held)} but no checkpoint to continue from; choose a "
                "fresh hydra.run.dir",
            )
        if cfg.resume == "auto":
            log.info("resume=auto: no checkpoint in %s yet, starting fresh", run_dir)
        else:
            log.warning("resume=true but %s has no %s: starting fresh", run_dir, LAST)
        return None
    state, path = latest
    _check_same_run(state.get("config", {}), OmegaConf.to_container(cfg, resolve=True))
    return Start(state=state, path=path)


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # completed batches of the current epoch (> 0 only in a mid-epoch checkpoint)
    iteration: int = 0  # completed training iterations
    examples: int = 0  # training examples drawn
    best_robust_accuracy: float = -1.0
    best_epoch: int = -1
    stopped_early: bool = False  # the method ended training (Fast's early stop)
    skipped_steps: int = 0  # optimiser steps refused for non-finite gradients (nonfinite=skip)
    optimizer_steps: int = 0  # optimiser steps asked for, taken or refused
    lr_changes: list[dict[str, Any]] = field(default_factory=list)  # rescues on resume


_TARGET_FIELDS = ("train_seconds", "epoch", "iteration", "forward_passes", "backward_passes")


def time_to_targets(rows: list[dict[str, Any]], key: str, targets: list[float]) -> dict:
    """First evaluation point at which ``key`` (an error) fell to each target, or None."""
    reached: dict[str, Any] = {}
    for target in targets:
        hit = next((r for r in rows if r.get(key) is not None and r[key] <= target), None)
        reached[f"{key}<={target:g}"] = None if hit is None else {f: hit[f] for f in _TARGET_FIELDS}
    return reached


class Trainer:
    """One run in one directory: build everything from the resolved config, then ``run()``."""

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
        self.job = from_env()
        self.device = select_device(cfg.device)
        if self.job.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.job.local_rank)
        init_process_group(self.job, self.device.type == "cuda")
        if self.job.enabled and cfg.method.get("layer_one_milestones") is not None:
            raise ConfigError(
                "method.layer_one_milestones",
                list(cfg.method.layer_one_milestones),
                "null under torchrun (a second optimiser for layer one is not synchronised)",
            )
        configure_backend(self.device, cfg.deterministic)
        seed_everything(cfg.seed)

        data = load_run_data(cfg)  # the training split less the validation images
        train_set, test_set = data.train, data.test
        self.test_set = test_set
        self.validation = data.split
        if self.start is not None:  # the same held-out images, or the run is not one run
            self.validation.check_resumed(self.start.state.get("validation"))
        if not self.validation.count and cfg.save_best:
            log.info("eval.validation.size=0: no validation split, so no best.ckpt is written")
        # Probe batches for the criterion C, drawn with their own generator (no global RNG).
        self.criterion: CriterionProbe | None = (
            CriterionProbe(cfg.eval.criterion, train_set, self.device)
            if cfg.eval.criterion.enabled
            else None
        )
        subset = torch.randperm(
            len(test_set), generator=torch.Generator().manual_seed(cfg.eval.seed)
        )
        subset = subset[: cfg.eval.subset].sort().values
        # The test subset is measured (curves, time to target), never used to choose anything;
        # best.ckpt and Fast's early-stop check are decided on the validation split.
        self.eval_images, self.eval_labels = eval_subset(test_set, subset, self.device)
        self.val_images: torch.Tensor | None = None
        self.val_labels: torch.Tensor | None = None
        if data.validation is not None:
            every = torch.arange(len(data.validation))
            self.val_images, self.val_labels = eval_subset(data.validation, every, self.device)
        self.loader = make_train_loader(
            train_set,
            cfg.dataset,
            cfg.batch_size,
            self.device,
            seed=cfg.seed,
            rank=self.job.rank,
            world=self.job.world,
        )

        if len(self.loader) == 0:  # it would "complete" having trained nothing
            raise ConfigError(
                "batch_size",
                cfg.batch_size,
                f"larger than the {len(train_set)} training images split over "
                f"{self.job.world} process(es), so no full batch can be drawn",
            )

        ds = cfg.dataset
        self.model = build_model_for(cfg, self.device)
        self.job.broadcast_module(self.model)  # every rank starts from rank 0's weights
        self.skip_nonfinite = cfg.nonfinite == "skip"
        self.optimizer = GuardedSGD(
            self.model.parameters(),
            skip_nonfinite=self.skip_nonfinite,
            job=self.job,
            module=self.model,
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            nesterov=cfg.optim.nesterov,
        )
        self.precision = training_precision(cfg.precision, self.device)
        self._precision = Precision(self.precision, self.device)
        self.counter = PassCounter()
        context = TrainContext(
            # compile=true: the method's forwards/backwards go through torch.compile; evaluation
            # and checkpoints use self.model itself (the same parameters).
            model=maybe_compile(self.model, bool(cfg.get("compile", False)), self.device),
            optimizer=self.optimizer,
            counter=self.counter,
            autocast=self._autocast,
            attack_autocast=self._precision.attack,
            device=self.device,
            num_train=len(train_set),
            image_shape=(ds.channels, ds.image_size, ds.image_size),
            num_classes=ds.num_classes,
            iters_per_epoch=len(self.loader),
            epochs=cfg.epochs,
            job=self.job,
            validation_batch=self._validation_batch(),
        )
        self.method: Method = build_method(cfg.method, context)
        self.epochs = self.method.epochs(cfg.epochs)
        self.lr_scheduler = build_lr_scheduler(
            cfg.optim, self.optimizer, self.epochs, len(self.loader)
        )
        self.lr_per_iteration = cfg.optim.lr_schedule == "cyclic"
        self.schedule: Schedule | AdaptiveSchedule | None = None
        if self.method.uses_control and cfg.schedule.name == "adaptive":
            self.schedule = build_adaptive(
                cfg, train_set, self.device, len(self.loader), self.counter
            )
        elif self.method.uses_control:
            self.schedule = build_schedule(cfg, self.epochs, len(self.loader))
        self.clock = TrainClock(self.device)
        self.progress = Progress()
        self._best_pending = False  # an evaluation beat the best so far; best.ckpt is due
        # Training loss / correct counts since the last metrics row, summed on the device.
        self._loss_sum = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._seen = 0
        self._loss_seen = 0  # examples whose loss is in _loss_sum (fewer when steps are skipped)
        self._last_loss_finite = True
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.stop = stop if stop is not None else StopRequests()
        self._last_saved: dict[str, int] | None = None  # progress at the newest checkpoint
        self._checked_iteration = 0  # the loss was last known finite at this iteration
        self.wandb_id: str | None = None
        self.eval_attack = AttackSpec(**_attack_args(cfg.eval.attack))
        self.final_options = SuiteOptions(
            eps=float(cfg.eval.final_threat.eps),
            step_size=float(cfg.eval.final_threat.step_size),
            cw_l2_c=paper_cw_l2_c(cfg.dataset.name),
        )

    # ------------------------------------------------------------------ helpers
    def _validation_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A fixed batch of validation images (uint8) for a method's own checks (Fast's early
        stop): ``batch_size`` of them drawn by the split's seed; this rank's share (torchrun)."""
        if self.val_images is None or self.val_labels is None:
            return None
        n = int(self.val_labels.shape[0])
        seed = int(self.cfg.eval.validation.seed)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        pick = pick[: self.cfg.batch_size]
        mine = pick.tensor_split(self.job.world)[self.job.rank]
        pick = (mine if len(mine) else pick).to(self.device)
        return self.val_images.index_select(0, pick), self.val_labels.index_select(0, pick)

    def _autocast(self) -> AbstractContextManager[Any]:
        return self._precision.update()

    def control(self, epoch: int, iteration: int = 0) -> Control | None:
        """The control for this batch; an adaptive schedule decides here (on the train clock)."""
        if isinstance(self.schedule, AdaptiveSchedule):
            return self.schedule.decide(self.model, epoch, iteration)
        return None if self.schedule is None else self.schedule.at(epoch, iteration)

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "method": self.method.state_dict(),
            "schedule": (
                self.schedule.state_dict() if isinstance(self.schedule, AdaptiveSchedule) else {}
            ),
            "loader": self.loader.state_dict(),
            "validation": self.validation.record(),
            "rng": rng_state(),
            "progress": asdict(self.progress),
            "train_seconds": self.clock.seconds,
            "passes": self.counter.state_dict(),
            "since_last_row": {
                "loss_sum": self._loss_sum.item(),
                "correct": int(self._correct.item()),
                "seen": self._seen,
                "loss_seen": self._loss_seen,
            },
            "wandb_id": self.wandb_id,
        }

    def _restore(self) -> bool:
        """Continue from the checkpoint :func:`prepare_start` chose, if it chose one."""
        if self.start is None:
            return False
        state, path = self.start.state, self.start.path
        self.start = None  # the state is consumed: do not keep a second copy of the weights
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.method.load_state_dict(state["method"])
        if isinstance(self.schedule, AdaptiveSchedule):
            self.schedule.load_state_dict(state["schedule"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.progress = Progress(**state["progress"])
        self.optimizer.skipped = self.progress.skipped_steps
        self.optimizer.attempted = self.progress.optimizer_steps
        self._rescale_lr(float(state["config"]["optim"]["lr"]))
        self.clock = TrainClock(self.device, elapsed=float(state["train_seconds"]))
        self.counter.load_state_dict(state["passes"])
        pending = state["since_last_row"]
        self._loss_sum.fill_(pending["loss_sum"])
        self._correct.fill_(pending["correct"])
        self._seen = int(pending["seen"])
        self._loss_seen = int(pending.get("loss_seen", pending["seen"]))
        self.wandb_id = state.get("wandb_id")
        self._last_saved = {k: self.progress.__dict__[k] for k in ("epoch", "batch", "iteration")}
        self._checked_iteration = self.progress.iteration
        # Epochs counted from 1, as the progress bar and the progress lines count them.
        at = self.progress
        where = (
            f"in epoch {at.epoch + 1} at batch {at.batch + 1}"
            if at.batch
            else f"after epoch {at.epoch} (of {self.epochs})"
        )
        log.info("resumed %s from %s %s", self.run_dir, path.name, where)
        return True

    def _rescale_lr(self, saved_lr: float) -> None:
        """A resumption asked for another optim.lr: continue the LR schedule scaled by new/old."""
        new_lr = float(self.cfg.optim.lr)
        if new_lr == saved_lr:
            return
        ratio = new_lr / saved_lr
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        scheduler = self.lr_scheduler
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
        if hasattr(scheduler, "max_lrs"):  # CyclicLR's peak is optim.lr
            scheduler.max_lrs = [lr * ratio for lr in scheduler.max_lrs]
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # type: ignore[attr-defined]
        change = {"iteration": self.progress.iteration, "from": saved_lr, "to": new_lr}
        self.progress.lr_changes.append(change)
        log.warning(
            "optim.lr changed on resume from %g to %g at iteration %d: the LR schedule continues, "
            "scaled by %g",
            saved_lr,
            new_lr,
            self.progress.iteration,
            ratio,
        )

    def _evaluate(
        self, images: torch.Tensor, labels: torch.Tensor, attack: AttackSpec
    ) -> EvalResult:
        return evaluate(
            self.model,
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
            total=self.epochs * len(self.loader),
            initial=self.progress.iteration,
            enabled=self.cfg.progress,
            desc=str(self.cfg.name),
        )
        self._bar = bar
        self.runlog = RunLog(
            self.run_dir,
            epochs=self.epochs,
            iterations=self.epochs * len(self.loader),
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
        cfg = self.cfg
        every, by_iteration = cfg.eval.every, cfg.eval.unit == "iteration"
        per_iteration_control = self.schedule is not None and self.schedule.per_iteration
        last_row_iteration = metrics.rows[-1]["iteration"] if metrics.rows else -1
        for epoch in range(self.progress.epoch, self.epochs):
            first = self.progress.batch  # > 0: resuming inside this epoch
            self.clock.start()
            control = self.control(epoch, first)
            if first:
                self.method.resume_epoch(epoch, control)
            else:
                self.method.start_epoch(epoch, control)
            last_batch = len(self.loader) - 1
            for i, batch in enumerate(self.loader, start=first):
                if per_iteration_control:
                    control = self.control(epoch, i)
                out = self.method.train_batch(batch, control)
                if self.lr_per_iteration:
                    self.lr_scheduler.step()
                n = batch.x.shape[0] * self.job.world  # the global batch
                self._add_loss(out.loss_sum)
                self._correct += out.correct
                self._seen += n
                if self._last_loss_finite:
                    self._loss_seen += n
                self.progress.iteration += 1
                self.progress.batch = i + 1
                self.progress.examples += n
                bar.update()
                if by_iteration and self.progress.iteration % every == 0:
                    with self.clock.paused():
                        epoch_float = epoch + (i + 1) / len(self.loader)
                        self._emit(self._row(epoch_float, control), metrics, sinks, bar)
                        last_row_iteration = self.progress.iteration
                if self._stop_requested() and i < last_batch:
                    self.clock.stop()
                    self._save_checkpoint(metrics)
                    raise Preempted(self.stop.signum or 0)
            stopping = self.method.stop_requested()  # its check is training work: on the clock
            self.clock.stop()
            self.progress.epoch = epoch + 1
            self.progress.batch = 0
            self.progress.stopped_early = stopping
            if stopping:
                log.info("%s asked to stop after epoch %d", cfg.method.name, epoch + 1)
            last_epoch = epoch + 1 == self.epochs or stopping
            due = (not by_iteration and (epoch + 1) % every == 0) or last_epoch
            if due and last_row_iteration != self.progress.iteration:
                self._emit(self._row(float(epoch + 1), control), metrics, sinks, bar)
                last_row_iteration = self.progress.iteration
            if not self.lr_per_iteration:  # after the row, so it shows the lr this epoch used
                self.lr_scheduler.step()
            self._save_checkpoint(metrics)
            if stopping:
                break
            if self._stop_requested() and not last_epoch:
                raise Preempted(self.stop.signum or 0)

    def _add_loss(self, loss_sum: torch.Tensor) -> None:
        """Sum the batch loss on the device; remember (without a sync) whether it was finite."""
        finite = torch.isfinite(loss_sum)
        if self.skip_nonfinite:  # the step was refused: its loss is not part of the mean
            self._last_loss_finite = bool(finite.item())  # skip mode syncs per step anyway
            loss_sum = torch.where(finite, loss_sum, torch.zeros_like(loss_sum))
        else:
            self._finite &= finite
        self._loss_sum += loss_sum

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
        bad_loss = not bool(self._finite.item())
        bad_weights = not _all_finite(self.model, self.optimizer)
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
        attempted, skipped = self.optimizer.attempted, self.optimizer.skipped
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
        seen, loss_seen = self._seen, self._loss_seen
        train_loss = self._loss_sum.item() / loss_seen if loss_seen else None
        train_error = 1.0 - self._correct.item() / seen if seen else None
        self._loss_sum.zero_()
        self._correct.zero_()
        self._seen = self._loss_seen = 0
        result = self._evaluate(self.eval_images, self.eval_labels, self.eval_attack)
        val = None
        if self.val_images is not None and self.val_labels is not None:
            val = self._evaluate(self.val_images, self.val_labels, self.eval_attack)
        row: dict[str, Any] = {
            "epoch": round(epoch, 6),
            "iteration": self.progress.iteration,
            "examples": self.progress.examples,
            "train_seconds": self.clock.seconds,
            "forward_passes": self.counter.forward * self.job.world,
            "backward_passes": self.counter.backward * self.job.world,
            **self.method.knobs(control),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_error": train_error,
            # clean_error / robust_error: the fixed test subset (eval_split says so); val_*: the
            # validation split, the only one any choice is made on
            "clean_error": result.clean_error,
            "robust_error": result.robust_error,
            "eval_examples": result.total,
            "eval_split": "test",
            "eval_attack": self.eval_attack.name,
            **self.method.metrics(),
        }
        if val is not None:
            row["val_clean_error"] = val.clean_error
            row["val_robust_error"] = val.robust_error
            row["val_examples"] = val.total
        if isinstance(self.schedule, AdaptiveSchedule):
            row.update(self.schedule.metrics())
        if self.skip_nonfinite:
            row["skipped_steps"] = self.optimizer.skipped
            row["skipped_fraction"] = self.optimizer.skipped / max(self.optimizer.attempted, 1)
        if self.criterion is not None and control is not None and self._criterion_due(epoch):
            row.update(self.criterion.measure(self.model, control.steps, control.step_size))
        # The best checkpoint is chosen on the validation split only; without one there is none.
        if val is not None and val.robust_accuracy > self.progress.best_robust_accuracy:
            self.progress.best_robust_accuracy = val.robust_accuracy
            self.progress.best_epoch = int(np.ceil(epoch))
            self._best_pending = True
        return row

    def _best_summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """summary.json's ``best``: what was chosen, on which images, and how."""
        if self.validation.count:
            return {
                "selected_on": "validation",
                "robust_accuracy": self.progress.best_robust_accuracy,
                "epoch": self.progress.best_epoch,
                "eval_attack": self.eval_attack.name,
                "examples": self.validation.count,
                "checkpoint": (
                    BEST if self.cfg.save_best and self.progress.best_epoch >= 0 else None
                ),
            }
        # No validation split: nothing is chosen; the final model's test-subset numbers stand.
        last = rows[-1] if rows else None
        return {
            "selected_on": "none (no validation split: the final model)",
            "robust_accuracy": None if last is None else 1.0 - last["robust_error"],
            "epoch": self.progress.epoch,
            "eval_attack": self.eval_attack.name,
            "examples": None if last is None else last["eval_examples"],
            "checkpoint": None,
        }

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
        self.progress.skipped_steps = self.optimizer.skipped
        self.progress.optimizer_steps = self.optimizer.attempted
        if not self.job.is_main:
            return
        with self.stop.deferred():  # a second signal lets the write finish first
            save_atomic(self._checkpoint_state(), self.run_dir / LAST, keep_previous=True)
            self._last_saved = {
                k: self.progress.__dict__[k] for k in ("epoch", "batch", "iteration")
            }
            if self.cfg.save_best and self._best_pending:
                copy_atomic(self.run_dir / LAST, self.run_dir / BEST)
                self._best_pending = False
            metrics.write_csv()

    # ------------------------------------------------------------------ summary
    def _ranks_agree(self) -> bool:
        """Every rank holds bit-identical parameters and buffers (a hash per rank, compared)."""
        import torch.distributed as dist

        digest = hashlib.sha256()
        for tensor in self.model.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        hashes: list[Any] = [None] * self.job.world
        dist.all_gather_object(hashes, digest.hexdigest())
        return len(set(hashes)) == 1

    def _final_evaluation(self) -> dict[str, Any]:
        """Clean accuracy and each of ``eval.final_attacks`` on the whole test set (fp32)."""
        names = ["clean", *(n for n in self.cfg.eval.final_attacks if n != "clean")]
        # Small sets are one chunk already on the device; folder sets are decoded in chunks.
        chunk = len(self.test_set) if isinstance(self.test_set, ImageSet) else FINAL_EVAL_CHUNK
        store = FinalEvalStore(
            self.run_dir / FINAL_EVAL_PARTIAL,
            self.progress.iteration,
            self.stop,
            self._stop_requested,
            write=self.job.is_main,
        )
        parts, offset = [], 0
        for images, labels in eval_batches(self.test_set, chunk, self.device):
            store.offset = offset
            parts.append(
                run_suite(
                    self.model,
                    images,
                    labels,
                    names,
                    self.final_options,
                    batch_size=self.cfg.eval.batch_size,
                    seed=self.cfg.eval.seed,
                    offset=offset,
                    store=store,
                )
            )
            offset += int(labels.shape[0])
        store.discard()
        results = {name: merge_results([part[name] for part in parts]) for name in names}
        robust = {name: r for name, r in results.items() if name != "clean"}
        return {
            "examples": results["clean"]["examples"],
            "clean_accuracy": results["clean"]["accuracy"],
            "robust_accuracy": {name: r["accuracy"] for name, r in robust.items()},
            "attacks": {name: r["params"] for name, r in robust.items()},
        }

    def _summarise(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        summary: dict[str, Any] = {
            "status": "completed",
            "name": cfg.name,
            "method": cfg.method.name,
            "dataset": cfg.dataset.name,
            "model": cfg.model.name,
            "seed": cfg.seed,
            "device": str(self.device),
            "precision": self.precision,
            "epochs": self.progress.epoch,
            "iterations": self.progress.iteration,
            "examples": self.progress.examples,
            "train_seconds": self.clock.seconds,
            "forward_passes": self.counter.forward * self.job.world,
            "backward_passes": self.counter.backward * self.job.world,
            "skipped_steps": self.optimizer.skipped,
            "skipped_fraction": self.optimizer.skipped / max(self.optimizer.attempted, 1),
            "lr_changes": self.progress.lr_changes,
            "best": self._best_summary(rows),
            "validation": self.validation.record(),
            "last_eval": rows[-1] if rows else None,
            "time_to_target": {
                **time_to_targets(rows, "robust_error", list(cfg.eval.target_robust_errors)),
                **time_to_targets(rows, "clean_error", list(cfg.eval.target_clean_errors)),
            },
        }
        if self.job.enabled:
            summary["distributed"] = {
                "world_size": self.job.world,
                "parameters_identical": self._ranks_agree(),
            }
        criterion = summarise_criterion(rows)
        if criterion is not None:
            summary["criterion"] = criterion
        if cfg.eval.final:
            names = ["clean", *(n for n in cfg.eval.final_attacks if n != "clean")]
            self._bar.evaluating(", ".join(names))
            self.runlog.evaluating(names, len(self.test_set))
            summary["final"] = self._final_evaluation()
        summary["provenance"] = collect_provenance(self.device, started=self._started)
        return summary


class FinalEvalStore:
    """The final evaluation's per-batch progress, so a stop signal during it loses nothing.

    After every batch the counts so far are written to ``final_eval.partial.json`` (atomically);
    then, if a stop was requested, the run ends as preempted. ``resume=true`` reloads the last
    checkpoint (training is complete), and the suite continues each attack at the batch where it
    stopped: every batch is seeded on its own, so the result equals an uninterrupted one. Entries
    belong to one model (the checkpoint's iteration); others are ignored.
    """

    def __init__(
        self,
        path: Path,
        iteration: int,
        stop: StopRequests,
        should_stop: Callable[[], bool],
        *,
        write: bool,
    ) -> None:
        self.path, self.iteration, self.write = path, iteration, write
        self.stop, self.should_stop = stop, should_stop
        self.offset = 0
        saved = _read_json(path) if write else None
        ok = isinstance(saved, dict) and saved.get("iteration") == iteration
        self.partial: dict[str, Any] = saved["partial"] if ok else {}

    def load(self, name: str) -> dict[str, Any] | None:
        return self.partial.get(f"{self.offset}:{name}")

    def save(self, name: str, state: dict[str, Any]) -> None:
        self.partial[f"{self.offset}:{name}"] = state
        if self.write:
            with self.stop.deferred():
                write_json_atomic(self.path, {"iteration": self.iteration, "partial": self.partial})
        if self.should_stop():
            raise Preempted(
                self.stop.signum or 0,
                "during the final evaluation (training is complete and saved; the evaluation "
                "continues where it stopped)",
            )

    def discard(self) -> None:
        if self.write:
            self.path.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _all_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Every parameter, buffer and optimiser-state tensor is finite (one host sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    for state in optimizer.state.values():
        tensors += [t for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all().item())


def _attack_args(cfg: DictConfig) -> dict[str, Any]:
    return {
        "eps": float(cfg.eps),
        "step_size": float(cfg.step_size),
        "steps": int(cfg.steps),
        "random_start": bool(cfg.random_start),
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _check_same_run(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint trained with different settings (it would not be one run)."""

    def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
        flat = _flatten(cfg)
        return {
            k: v
            for k, v in flat.items()
            if k.split(".")[0] not in RESUME_FREE_KEYS and k not in RESUME_CHANGEABLE_KEYS
        }

    old, new = comparable(saved), comparable(current)
    diffs = [
        f"{k}={json.dumps(new.get(k))} (checkpoint: {json.dumps(old.get(k))})"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if diffs:
        raise ConfigError(
            "resume",
            True,
            "the checkpoint was trained with other settings: " + "; ".join(diffs[:3]),
        )


def train(
    cfg: DictConfig,
    run_dir: Path,
    start: Start | None = None,
    stop: StopRequests | None = None,
) -> dict[str, Any]:
    """Train the configured run in ``run_dir`` (resolved config) and return its summary."""
    return Trainer(cfg, run_dir, start=start, stop=stop).run()
