"""summary.json's training part: what ran, what it cost, what was chosen and when targets fell.

The metrics rows are the record; the summary is derived from them and from the run's counters, so
it can name the first evaluation point at which an error target was reached (the paper's "time to
robustness") without any extra evaluation.
"""

from __future__ import annotations

import hashlib
from typing import Any

from omegaconf import DictConfig

from amata_runner.build import Run
from amata_runner.control.criterion import summarise_criterion
from amata_runner.runtime.checkpoint import BEST
from amata_runner.runtime.run_state import Progress

_TARGET_FIELDS = ("train_seconds", "epoch", "iteration", "forward_passes", "backward_passes")


def time_to_targets(rows: list[dict[str, Any]], key: str, targets: list[float]) -> dict:
    """First evaluation point at which ``key`` (an error) fell to each target, or None."""
    reached: dict[str, Any] = {}
    for target in targets:
        hit = next((r for r in rows if r.get(key) is not None and r[key] <= target), None)
        reached[f"{key}<={target:g}"] = None if hit is None else {f: hit[f] for f in _TARGET_FIELDS}
    return reached


def summarise_training(
    cfg: DictConfig,
    run: Run,
    progress: Progress,
    train_seconds: float,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """Every field of summary.json except the final evaluation and the provenance."""
    summary: dict[str, Any] = {
        "status": "completed",
        "name": cfg.name,
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "device": str(run.device),
        "precision": run.precision,
        "epochs": progress.epoch,
        "iterations": progress.iteration,
        "examples": progress.examples,
        "train_seconds": train_seconds,
        "forward_passes": run.counter.forward * run.job.world,
        "backward_passes": run.counter.backward * run.job.world,
        "skipped_steps": run.optimizer.skipped,
        "skipped_fraction": run.optimizer.skipped / max(run.optimizer.attempted, 1),
        "lr_changes": progress.lr_changes,
        "best": best_summary(cfg, run, progress, rows),
        "validation": run.validation.record(),
        "last_eval": rows[-1] if rows else None,
        "time_to_target": {
            **time_to_targets(rows, "robust_error", list(cfg.eval.target_robust_errors)),
            **time_to_targets(rows, "clean_error", list(cfg.eval.target_clean_errors)),
        },
    }
    if run.job.enabled:
        summary["distributed"] = {
            "world_size": run.job.world,
            "parameters_identical": ranks_agree(run),
        }
    criterion = summarise_criterion(rows)
    if criterion is not None:
        summary["criterion"] = criterion
    return summary


def best_summary(
    cfg: DictConfig, run: Run, progress: Progress, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """summary.json's ``best``: what was chosen, on which images, and how."""
    if run.validation.count:
        return {
            "selected_on": "validation",
            "robust_accuracy": progress.best_robust_accuracy,
            "epoch": progress.best_epoch,
            "eval_attack": run.eval_attack.name,
            "examples": run.validation.count,
            "checkpoint": BEST if cfg.save_best and progress.best_epoch >= 0 else None,
        }
    # No validation split: nothing is chosen; the final model's test-subset numbers stand.
    last = rows[-1] if rows else None
    return {
        "selected_on": "none (no validation split: the final model)",
        "robust_accuracy": None if last is None else 1.0 - last["robust_error"],
        "epoch": progress.epoch,
        "eval_attack": run.eval_attack.name,
        "examples": None if last is None else last["eval_examples"],
        "checkpoint": None,
    }


def ranks_agree(run: Run) -> bool:
    """Every rank holds bit-identical parameters and buffers (a hash per rank, compared)."""
    import torch.distributed as dist

    digest = hashlib.sha256()
    for tensor in run.model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    hashes: list[Any] = [None] * run.job.world
    dist.all_gather_object(hashes, digest.hexdigest())
    return len(set(hashes)) == 1
