"""What a checkpoint keeps of a run, and how a run continues from one bit-for-bit.

A checkpoint is one run's whole state: weights, optimiser, LR schedule, method and schedule state,
the loader's position, the global RNG, the progress counters, the train-only clock, the pass
counts and the training sums since the last metrics row. Restoring every one of them is what makes
``resume=true`` give the uninterrupted run's numbers; a checkpoint trained with other settings is
refused before anything is written, because continuing it would not be one run. The key names
below are the file format: checkpoints written by earlier versions must keep loading.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from amata_runner.errors import ConfigError
from amata_runner.runtime.checkpoint import LAST, load_latest, rng_state, set_rng_state
from amata_runner.runtime.run_dir import refuse_fresh_start_over_results, result_files

if TYPE_CHECKING:
    from amata_runner.build import Run

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Settings that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = ("resume", "progress", "logger", "paths", "device", "nonfinite")
# Settings a resumption may change on purpose: a learning-rate rescue after a NaN stop. The LR
# schedule continues from where it was, scaled by new/old; the change is recorded in the summary.
RESUME_CHANGEABLE_KEYS = ("optim.lr",)


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
    check_same_run(state.get("config", {}), OmegaConf.to_container(cfg, resolve=True))
    return Start(state=state, path=path)


def check_same_run(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint trained with different settings (it would not be one run)."""

    def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
        flat = _flatten(cfg)
        return {
            k: v
            for k, v in flat.items()
            if k.split(".")[0] not in RESUME_FREE_KEYS and k not in RESUME_CHANGEABLE_KEYS
        }

    old, new = comparable(upgrade_saved_config(saved)), comparable(current)
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


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config rewritten in today's keys, so a run started by an older version
    resumes (and a changed setting is still refused).

    ``schedule.k_max`` no longer exists: K_max is the method's own key (``Method.knob``, e.g.
    ``method.steps``).  Older runs annealed towards ``schedule.k_max``, so its value moves there.
    """
    schedule = saved.get("schedule")
    if not isinstance(schedule, dict) or "k_max" not in schedule:
        return saved
    upgraded = copy.deepcopy(saved)
    k_max = upgraded["schedule"].pop("k_max")
    method = upgraded.get("method") or {}
    knob = _knob(method.get("name"))
    if knob is not None:
        method[knob] = k_max
    return upgraded


def _knob(name: Any) -> str | None:
    """The key a method's schedule anneals (None: unknown method, or one without a K)."""
    from amata_runner.methods.registry import method_names, method_spec

    if name not in method_names():
        return None
    knob: str | None = method_spec(name).method.knob
    return knob if method_spec(name).scheduled else None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


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

    def position(self) -> dict[str, int]:
        """(epoch, batch, iteration): where a checkpoint of this progress continues."""
        return {k: self.__dict__[k] for k in ("epoch", "batch", "iteration")}


def checkpoint_state(
    cfg: DictConfig,
    run: Run,
    progress: Progress,
    train_seconds: float,
    since_last_row: dict[str, Any],
    wandb_id: str | None,
) -> dict[str, Any]:
    """Everything needed to continue ``run`` bit-for-bit, under the checkpoint's key names."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "method": run.method.state_dict(),
        "schedule": {} if run.schedule is None else run.schedule.state_dict(),
        "loader": run.loader.state_dict(),
        "validation": run.validation.record(),
        "rng": rng_state(),
        "progress": asdict(progress),
        "train_seconds": train_seconds,
        "passes": run.counter.state_dict(),
        "since_last_row": since_last_row,
        "wandb_id": wandb_id,
    }


@dataclass
class Restored:
    """The loop's own state as the checkpoint left it (the objects in ``Run`` are loaded in
    place)."""

    progress: Progress
    train_seconds: float
    since_last_row: dict[str, Any]
    wandb_id: str | None


def restore(cfg: DictConfig, run: Run, start: Start) -> Restored:
    """Load ``start`` into ``run``'s objects and the global RNG; return the loop's state.

    A resumption that asks for another ``optim.lr`` (the one setting it may change) continues the
    LR schedule scaled by new/old and records the change in the progress.
    """
    state = start.state
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    run.method.load_state_dict(state["method"])
    if run.schedule is not None:
        run.schedule.load_state_dict(state["schedule"])
    run.loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    progress = Progress(**state["progress"])
    run.optimizer.skipped = progress.skipped_steps
    run.optimizer.attempted = progress.optimizer_steps
    _rescale_lr(run, progress, float(state["config"]["optim"]["lr"]), float(cfg.optim.lr))
    run.counter.load_state_dict(state["passes"])
    return Restored(
        progress=progress,
        train_seconds=float(state["train_seconds"]),
        since_last_row=state["since_last_row"],
        wandb_id=state.get("wandb_id"),
    )


def _rescale_lr(run: Run, progress: Progress, saved_lr: float, new_lr: float) -> None:
    """A resumption asked for another optim.lr: continue the LR schedule scaled by new/old."""
    if new_lr == saved_lr:
        return
    ratio = new_lr / saved_lr
    for group in run.optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    scheduler = run.lr_scheduler
    scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
    if hasattr(scheduler, "max_lrs"):  # CyclicLR's peak is optim.lr
        scheduler.max_lrs = [lr * ratio for lr in scheduler.max_lrs]
    scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]  # type: ignore[attr-defined]
    change = {"iteration": progress.iteration, "from": saved_lr, "to": new_lr}
    progress.lr_changes.append(change)
    log.warning(
        "optim.lr changed on resume from %g to %g at iteration %d: the LR schedule continues, "
        "scaled by %g",
        saved_lr,
        new_lr,
        progress.iteration,
        ratio,
    )
