"""ATTA's config schema and range checks (``method=atta`` and ``method=amata_atta``).

ATTA-K (Zheng et al., CVPR 2020) keeps one adversarial perturbation per training example across
epochs and runs ``steps`` PGD steps of ``step_size`` from it; ``reset`` is the period (in epochs) at
which the stored perturbations start again from ``init_std`` noise.  The reset period is what the
``schedule`` group drives (its K), so ``conf/method/atta.yaml`` sets ``schedule.k_max`` to
``method.reset``; the attack's own K and alpha stay ``method.steps`` / ``method.step_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from amata_runner.checks import at_least, one_of, positive_budget, require


@dataclass
class ATTAConfig:
    """ATTA-K: steps/step_size of the per-batch attack, the reset period, the stored-state init."""

    name: str = "atta"
    eps: Any = "${dataset.threat.eps}"
    steps: int = "${dataset.threat.steps}"  # type: ignore[assignment]
    step_size: Any = "${dataset.threat.step_size}"
    reset: int = 10
    init_std: float = 0.001
    attack_bn: str = "eval"
    extra_batch_division: bool = False


SCHEMA = ATTAConfig


def check(cfg: DictConfig) -> None:
    """Validate ``cfg.method`` of a resolved config; budgets typed as fractions become floats."""
    positive_budget(cfg, "method.eps", upper=1.0)
    positive_budget(cfg, "method.step_size")
    at_least(cfg, "method.steps", 1)
    at_least(cfg, "method.reset", 1)
    init_std = cfg.method.init_std
    require(init_std >= 0, "method.init_std", init_std, "must be >= 0 (0 = start from zero)")
    one_of(cfg, "method.attack_bn", ("eval", "train"))
