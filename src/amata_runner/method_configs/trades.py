"""Config schema and checks of TRADES (``method=trades`` / ``amata_trades``).

The defaults are the reference's CIFAR-10 settings (yaodongyu/TRADES, train_trades_cifar10.py):
beta = 6 (the paper's 1/lambda), K = 10 steps of 0.007 at eps 0.031, a N(0, 0.001^2) start and
BatchNorm in eval mode while the KL attack runs. ``steps`` and ``step_size`` are what the schedule
drives, so ``amata_trades`` anneals them as Amata anneals PGD. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from amata_runner.checks import ATTACK_BN_MODES, at_least, one_of, positive_budget, require


@dataclass
class TradesConfig:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL."""

    name: str = "trades"
    eps: Any = "${dataset.threat.eps}"
    steps: int = "${dataset.threat.steps}"  # type: ignore[assignment]  # K of the KL attack
    step_size: Any = "${dataset.threat.step_size}"
    beta: float = 6.0  # weight of the KL term (the papers' CIFAR-10 value)
    start_std: float = 0.001  # the attack starts at x + N(0, start_std^2), as the reference
    attack_bn: str = "eval"  # BatchNorm mode during the attack (the reference: model.eval())


SCHEMA = TradesConfig


def check(cfg: DictConfig) -> None:
    """Budgets positive (fractions resolved), K >= 1, beta >= 0, start_std >= 0."""
    positive_budget(cfg, "method.eps", upper=1.0)
    positive_budget(cfg, "method.step_size")
    at_least(cfg, "method.steps", 1)
    beta = cfg.method.beta
    require(0 <= beta < float("inf"), "method.beta", beta, "must be a finite number >= 0")
    std = cfg.method.start_std
    require(0 <= std < float("inf"), "method.start_std", std, "must be a finite number >= 0")
    one_of(cfg, "method.attack_bn", ATTACK_BN_MODES)
