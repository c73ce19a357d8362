"""A training method that lives outside the package: all that adding a method takes.

This module and ``toy_conf/method/toy.yaml`` (+ ``amata_toy.yaml`` for the annealed variant) are
the whole addition; no file of the package changes.  ``test_method_registry.py`` imports it in
process and, through ``AMATA_RUNNER_PLUGINS``, from the real ``amata-run``.

The toy's inner loop is K_t random sign steps of alpha_t inside the eps-ball (no gradient), then
one update: weak enough to be useless, simple enough to check every number it produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from amata_runner.attacks.linf import project, signed_step
from amata_runner.checks import check_attack
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.methods.registry import register_method


@dataclass
class ToyConfig:
    name: str = "toy"
    eps: Any = "${dataset.threat.eps}"
    steps: int = 3  # K under the constant schedule (the annealed variant's K_max)
    step_size: Any = "${dataset.threat.step_size}"

    @staticmethod
    def check(cfg: DictConfig) -> None:
        check_attack(cfg, attack_bn=False)


@register_method("toy", ToyConfig, annealed="amata_toy")
class Toy(Method):
    uses_control = True
    knob = "steps"  # the schedule anneals K from schedule.k_min up to method.steps

    def __init__(self, ctx: TrainContext, cfg: ToyConfig) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        self.controls: list[Control] = []  # one per batch, for the tests
        self.largest_step = 0.0  # the largest |x_adv - x| seen, for the tests

    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        assert control is not None
        self.controls.append(control)
        x_adv = batch.x
        for _ in range(control.steps):
            x_adv = project(
                signed_step(x_adv, torch.randn_like(x_adv), control.step_size),
                batch.x,
                self.cfg.eps,
            )
        self.largest_step = max(self.largest_step, (x_adv - batch.x).abs().max().item())
        return self.update(x_adv, batch.y)
