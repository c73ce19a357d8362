"""Config schema and checks of Fast adversarial training, FGSM-RS (``fast`` / ``amata_fast``).

Fast takes one FGSM step, so it has no ``method.steps``: the schedule's K stays 1 and only its
``strength`` matters (Amata+Fast: a weak fixed start while strength < 1, the random start after).
``method.step_size`` null means ``step_ratio * eps`` (1.25 eps, Wong et al.); the check writes the
number back so the run's resolved config records the step actually taken.  No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from amata_runner.checks import ATTACK_BN_MODES, at_least, one_of, positive_budget, require


@dataclass
class FastConfig:
    """FGSM from a uniform random start, alpha = 1.25 eps (Wong, Rice & Kolter, ICLR 2020)."""

    name: str = "fast"
    eps: Any = "${dataset.threat.eps}"
    step_size: Any = None  # null: step_ratio * eps
    step_ratio: float = 1.25
    clamp_start: bool = True  # the CIFAR code keeps the random start inside [0,1]
    attack_bn: str = "train"  # locuslab never switches to eval mode while training
    weak_init: float = 0.5  # Amata+Fast's fixed start, as a fraction of eps
    early_stop: bool = False  # locuslab's --early-stop (off by default there)
    early_stop_steps: int = 5
    early_stop_step_size: Any = "${dataset.threat.step_size}"
    early_stop_drop: float = 0.2


SCHEMA = FastConfig


def check(cfg: DictConfig) -> None:
    """Budgets positive (fractions resolved), step_size derived, the fixed start non-zero."""
    positive_budget(cfg, "method.eps", upper=1.0)
    m = cfg.method
    require(m.step_ratio > 0, "method.step_ratio", m.step_ratio, "must be > 0")
    if m.step_size is None:
        OmegaConf.update(cfg, "method.step_size", float(m.step_ratio) * float(m.eps))
    positive_budget(cfg, "method.step_size")
    one_of(cfg, "method.attack_bn", ATTACK_BN_MODES)
    require(
        m.weak_init != 0 and -1 <= m.weak_init <= 1,
        "method.weak_init",
        m.weak_init,
        "must be non-zero and in [-1, 1] (a fraction of eps)",
    )
    at_least(cfg, "method.early_stop_steps", 1)
    positive_budget(cfg, "method.early_stop_step_size")
    require(
        0 < m.early_stop_drop <= 1,
        "method.early_stop_drop",
        m.early_stop_drop,
        "must be in (0, 1] (an absolute drop in robust accuracy)",
    )
