"""Config schema and checks of MART (``method=mart`` / ``amata_mart``).

The defaults are the reference's CIFAR-10 settings (YisenWang/MART, train_wideresnet.py): beta = 6,
a K = 10 PGD attack of 0.007 at eps 0.031 on the cross-entropy from a N(0, 0.001^2) start, with
BatchNorm in eval mode while it runs. ``steps`` and ``step_size`` are what the schedule drives, so
``amata_mart`` anneals them. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from amata_runner.method_configs import trades


@dataclass
class MartConfig:
    """MART (Wang et al. 2020): boosted CE on x' + beta * KL(f(x) || f(x')) * (1 - p_y(x))."""

    name: str = "mart"
    eps: Any = "${dataset.threat.eps}"
    steps: int = "${dataset.threat.steps}"  # type: ignore[assignment]  # K of the PGD attack
    step_size: Any = "${dataset.threat.step_size}"
    beta: float = 6.0  # weight of the misclassification-aware KL term
    start_std: float = 0.001  # the attack starts at x + N(0, start_std^2), as the reference
    attack_bn: str = "eval"  # BatchNorm mode during the attack (the reference: model.eval())


SCHEMA = MartConfig


def check(cfg: DictConfig) -> None:
    """The same knobs and ranges as TRADES."""
    trades.check(cfg)
