"""Config schema and checks of FAT, friendly adversarial training (Zhang et al., ICML 2020).

No torch import here: configs are checked before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from amata_runner.checks import ATTACK_BN_MODES, at_least, one_of, positive_budget, require


@dataclass
class FATConfig:
    """Early-stopped PGD: an example stops tau_t steps after it is first misclassified."""

    name: str = "fat"
    eps: Any = "${dataset.threat.eps}"
    steps: int = "${dataset.threat.steps}"  # type: ignore[assignment]
    step_size: Any = "${dataset.threat.step_size}"
    random_start: bool = True
    omega: float = 0.001
    dynamic_tau: bool = True
    tau: int = 0
    tau_milestones: list[int] = field(default_factory=lambda: [50, 90])
    attack_bn: str = "eval"


SCHEMA = FATConfig


def check(cfg: DictConfig) -> None:
    """Validate ``cfg.method`` in place (fraction budgets become floats)."""
    positive_budget(cfg, "method.eps", upper=1.0)
    positive_budget(cfg, "method.step_size")
    at_least(cfg, "method.steps", 1)
    at_least(cfg, "method.tau", 0)
    omega = cfg.method.omega
    require(omega >= 0, "method.omega", omega, "must be >= 0")
    milestones = list(cfg.method.tau_milestones)
    require(
        all(m > 0 for m in milestones) and milestones == sorted(set(milestones)),
        "method.tau_milestones",
        milestones,
        "must be strictly increasing positive epochs",
    )
    one_of(cfg, "method.attack_bn", ATTACK_BN_MODES)
