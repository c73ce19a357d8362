"""Rebuild a trained model from the files a run wrote, for the tools that work on finished runs.

``amata-eval``, ``amata-landscape`` and the report read checkpoints written by ``amata-run``. The
checkpoint carries the run's resolved config, so the network is rebuilt exactly as it was trained
(architecture, class count, normalisation) without the user repeating any setting, and the weights
load under ``weights_only=True`` (nothing in the file is executed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from amata_runner.errors import ConfigError
from amata_runner.models import build_model
from amata_runner.runtime.checkpoint import BEST, LAST, load_checkpoint


def build_model_for(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The untrained network a resolved run config describes, on ``device`` in its memory format."""
    ds = cfg.dataset
    model = build_model(
        cfg.model.name,
        num_classes=ds.num_classes,
        channels=ds.channels,
        image_size=ds.image_size,
        mean=list(ds.mean) if cfg.model.normalize and ds.mean is not None else None,
        std=list(ds.std) if cfg.model.normalize and ds.std is not None else None,
    ).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class TrainedRun:
    """A checkpoint's model (in eval mode) and the resolved config it was trained with."""

    path: Path
    cfg: DictConfig
    model: nn.Module
    state: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def epoch(self) -> int | None:
        """Epochs completed when the checkpoint was written."""
        return self.state.get("progress", {}).get("epoch")

    @property
    def selection(self) -> str:
        """How this checkpoint was chosen, in words (amata-eval prints it and records it)."""
        progress = self.state.get("progress", {})
        if self.path.name == BEST:
            accuracy = progress.get("best_robust_accuracy")
            shown = f" {accuracy:.4f}" if isinstance(accuracy, float) and accuracy >= 0 else ""
            return (
                f"best: highest validation robust accuracy{shown}, at epoch "
                f"{progress.get('best_epoch')}"
            )
        if self.path.name == LAST:
            return f"last: the model after epoch {self.epoch}, not selected"
        return f"the model after epoch {self.epoch}"


def load_trained(path: str | Path, device: torch.device) -> TrainedRun:
    """Load ``path``: a run's ``last.ckpt`` or ``best.ckpt``, or a run directory (its
    ``last.ckpt``, the final model: ``best.ckpt``, chosen on the validation split, only when asked
    for by name).

    Raises :class:`ConfigError` (key ``ckpt``) when the file is missing, unreadable or not one the
    runner wrote.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / LAST).is_file():
            best = (path / BEST).is_file()
            held = " (it holds best.ckpt: name it to evaluate that)" if best else ""
            raise ConfigError("ckpt", str(path), f"a run directory holding last.ckpt{held}")
        path = path / LAST
    state = load_checkpoint(path, map_location=device)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ConfigError("ckpt", str(path), "a checkpoint written by amata-run (config + model)")
    cfg = OmegaConf.create(state["config"])
    model = build_model_for(cfg, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        allowed = f"weights that fit {cfg.model.name} ({first})"
        raise ConfigError("ckpt", str(path), allowed) from exc
    model.eval()
    return TrainedRun(path=path, cfg=cfg, model=model, state=state)
