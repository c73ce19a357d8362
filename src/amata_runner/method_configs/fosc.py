"""Config schema and checks of FOSC / dynamic adversarial training (Wang et al., ICML 2019).

No torch import here: configs are checked before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from amata_runner.checks import ATTACK_BN_MODES, at_least, one_of, positive_budget, require

FOSC_ORIGINS = ("clean", "start")


@dataclass
class FOSCConfig:
    """Early-stopped PGD: an example stops once its FOSC falls to c_t, c_t: c_max -> 0 linearly."""

    name: str = "fosc"
    eps: Any = "${dataset.threat.eps}"
    steps: int = 10
    step_size: Any = None  # None: eps / 4, the reference's rule
    random_start: bool = True
    c_max: float = 0.5
    dynamic_epochs: int = 100
    fosc_origin: str = "clean"
    loss_weighting: bool = False
    final_fosc: bool = True
    attack_bn: str = "eval"


SCHEMA = FOSCConfig


def check(cfg: DictConfig) -> None:
    """Validate ``cfg.method`` in place; ``step_size: null`` becomes eps / 4 (stored back)."""
    positive_budget(cfg, "method.eps", upper=1.0)
    if OmegaConf.select(cfg, "method.step_size") is None:
        OmegaConf.update(cfg, "method.step_size", float(cfg.method.eps) / 4)
    else:
        positive_budget(cfg, "method.step_size")
    at_least(cfg, "method.steps", 1)
    c_max = cfg.method.c_max
    require(c_max >= 0, "method.c_max", c_max, "must be >= 0")
    at_least(cfg, "method.dynamic_epochs", 1)
    one_of(cfg, "method.fosc_origin", FOSC_ORIGINS)
    one_of(cfg, "method.attack_bn", ATTACK_BN_MODES)
