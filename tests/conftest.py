"""Shared fixtures: compose configs the way amata-run does, and run the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from torch import nn

from amata_runner.cli import config_dir
from amata_runner.config import register_schemas, resolve_config
from amata_runner.methods.base import TrainContext
from amata_runner.runtime.passes import PassCounter

register_schemas()

# Small, fast settings for end-to-end runs on the embedded digits data.
FAST = [
    "epochs=2",
    "batch_size=128",
    "eval.subset=64",
    "eval.attack.steps=3",
    "eval.final_attacks=[pgd3]",
    "dataset.threat.steps=3",
    "progress=false",
]


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")


def compose_raw(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=config_dir(), job_name="test"):
        return compose(config_name="config", overrides=overrides or [])


def compose_resolved(
    overrides: list[str] | None = None, tmp_path: Path | None = None
) -> DictConfig:
    cfg = resolve_config(compose_raw(overrides))
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.data_dir = str(tmp_path / "data")
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        return compose_resolved(list(overrides))

    return make


def amata_run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (the same one users call) in ``cwd``."""
    script = Path(sys.executable).with_name("amata-run")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "amata_runner.cli.train"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        command + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def bn_net(seed: int = 0) -> nn.Module:
    """A small conv net on 1x6x6 inputs with BatchNorm, so an attack's BN mode matters."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


def cpu_context(
    model: torch.nn.Module,
    *,
    lr: float = 0.1,
    optimizer: torch.optim.Optimizer | None = None,
    counter: PassCounter | None = None,
    num_train: int = 64,
    image_shape: tuple[int, int, int] = (1, 4, 4),
    num_classes: int = 2,
    iters_per_epoch: int = 1,
    epochs: int = 1,
) -> TrainContext:
    """A fp32 CPU TrainContext around a toy model, for the method unit tests."""
    return TrainContext(
        model=model,
        optimizer=optimizer or torch.optim.SGD(model.parameters(), lr=lr),
        counter=counter or PassCounter(),
        autocast=nullcontext,
        device=torch.device("cpu"),
        num_train=num_train,
        image_shape=image_shape,
        num_classes=num_classes,
        iters_per_epoch=iters_per_epoch,
        epochs=epochs,
    )
