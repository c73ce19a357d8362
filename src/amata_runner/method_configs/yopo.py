"""Config schema and checks of YOPO-m-n (``method=yopo``) and Amata+YOPO (``method=amata_yopo``).

``method.steps`` is YOPO's m: the outer repeats per mini-batch, each one full forward/backward
(the knob Amata anneals, K in the Amata paper's Section 3.2); ``method.inner_steps`` is n, the cheap
first-layer-only updates of the perturbation per repeat; ``method.step_size`` is their step sigma
(alpha = tau / K under a schedule).  The defaults are YOPO-5-10, the reference's MNIST setting; its
CIFAR10 setting YOPO-5-3 is ``method.inner_steps=3`` (eps and sigma follow the dataset's threat
model, which is already the reference's on both).  No torch import here: the CLI checks a command
line before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from amata_runner.checks import at_least, one_of, positive_budget, require

# Which of the m full backward passes also put their cross-entropy gradient into layer one.
LAYER_ONE_CE = ("none", "all", "after_first")


@dataclass
class YOPOConfig:
    """YOPO-m-n (Zhang et al. 2019); see ``amata_runner.methods.yopo`` for the algorithm."""

    name: str = "yopo"
    eps: Any = "${dataset.threat.eps}"
    steps: int = 5  # m: outer repeats (full forward/backward each) per mini-batch
    inner_steps: int = 10  # n: first-layer-only perturbation updates per repeat
    step_size: Any = "${dataset.threat.step_size}"  # sigma, the inner step
    layer_one_ce: str = (
        "none"  # none (paper) | all (CIFAR code) | after_first (MNIST code, torch 2)
    )
    clip_start: bool = True  # random start projected into [0,1] (the reference does not)
    lr_divisor: int = "${method.steps}"  # type: ignore[assignment]  # step with optim.lr / this
    layer_one_milestones: list[int] | None = None  # None: layer one follows the engine's schedule


SCHEMA = YOPOConfig


def check(cfg: DictConfig) -> None:
    """Budgets positive (fractions such as 8/255 resolved to floats), m, n, divisor >= 1."""
    positive_budget(cfg, "method.eps", upper=1.0)
    positive_budget(cfg, "method.step_size")
    at_least(cfg, "method.steps", 1)
    at_least(cfg, "method.inner_steps", 1)
    at_least(cfg, "method.lr_divisor", 1)
    one_of(cfg, "method.layer_one_ce", LAYER_ONE_CE)
    milestones = OmegaConf.select(cfg, "method.layer_one_milestones")
    if milestones is not None:
        values = list(milestones)
        require(
            all(m > 0 for m in values) and values == sorted(set(values)),
            "method.layer_one_milestones",
            values,
            "must be null or strictly increasing positive epochs",
        )
