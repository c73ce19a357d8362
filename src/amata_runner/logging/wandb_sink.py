"""Weights & Biases, optional (``logger=wandb``): the only module that imports wandb.

One W&B run per job, always finished (so a multirun gives one run per job instead of silently
reusing the first); the run directory lives inside the Hydra run dir; the config is logged resolved;
error curves use ``train_seconds`` as their x axis; the run id is saved in checkpoints so a resumed
job continues the same W&B run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb
from omegaconf import DictConfig, OmegaConf


class WandbSink:
    def __init__(
        self, cfg: DictConfig, run_dir: Path, *, resume_id: str | None, config: dict[str, Any]
    ) -> None:
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            group=cfg.group,
            tags=list(OmegaConf.to_container(cfg.tags)),  # type: ignore[arg-type]
            name=f"{config.get('name', 'run')}-{run_dir.name}",
            job_type="train",
            dir=str(run_dir),
            id=resume_id,
            resume="allow" if resume_id else None,
            config=config,
            reinit="finish_previous",
        )
        self.run_id: str | None = self._run.id
        self._run.define_metric("train_seconds")
        for prefix in ("eval/*", "train/*", "knob/*", "passes/*"):
            self._run.define_metric(prefix, step_metric="train_seconds")
        self._run.define_metric("eval/robust_error", step_metric="train_seconds", summary="min")
        self._run.define_metric("eval/clean_error", step_metric="train_seconds", summary="min")

    def log(self, row: dict[str, Any]) -> None:
        groups = {
            "clean_error": "eval",
            "robust_error": "eval",
            "train_loss": "train",
            "train_error": "train",
            "lr": "train",
            "forward_passes": "passes",
            "backward_passes": "passes",
        }
        payload: dict[str, Any] = {"train_seconds": row["train_seconds"]}
        for key, value in row.items():
            if key in groups:
                payload[f"{groups[key]}/{key}"] = value
            elif key in ("K", "alpha"):
                payload[f"knob/{key}"] = value
            elif key in ("epoch", "iteration", "examples"):
                payload[key] = value
        self._run.log(payload)

    def summary(self, summary: dict[str, Any]) -> None:
        for key, value in _flatten(summary).items():
            self._run.summary[key] = value

    def close(self) -> None:
        self._run.finish()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat
