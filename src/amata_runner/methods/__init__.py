"""Training methods behind one interface (``Method.train_batch``), built from ``cfg.method``."""

from __future__ import annotations

from omegaconf import DictConfig

from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.methods.erm import ERM
from amata_runner.methods.pgd import PGD


def build_method(cfg: DictConfig, ctx: TrainContext) -> Method:
    """``amata`` is PGD: what makes it Amata is the annealing schedule it is composed with."""
    name = cfg.name
    if name == "erm":
        return ERM(ctx)
    if name in ("pgd", "amata"):
        return PGD(ctx, eps=cfg.eps, random_start=cfg.random_start, attack_bn=cfg.attack_bn)
    raise ValueError(f"unknown method {name!r}")


__all__ = ["ERM", "PGD", "Method", "StepOutput", "TrainContext", "build_method"]
