"""Small validators shared by the config checks: each raises a one-line ConfigError.

They read a resolved ``DictConfig`` by dotted key (never write it), so the error names the key
exactly as the user would type it on the command line.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from omegaconf import DictConfig, OmegaConf

from amata_runner.errors import ConfigError

# BatchNorm/Dropout mode while an attack runs inside training (attacks.pgd.attack_mode).
ATTACK_BN_MODES = ("eval", "train")

_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def as_float(key: str, value: Any) -> float:
    """Read a budget the way users type it: ``0.3``, ``8/255`` or ``"2/255"``."""
    if isinstance(value, bool):
        raise ConfigError(key, value, "expected a number such as 0.3 or a fraction such as 8/255")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        match = _FRACTION.match(text)
        try:
            if match:
                return float(Fraction(match.group(1)) / Fraction(match.group(2)))
            return float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(key, value, "expected a number such as 0.3 or a fraction such as 8/255")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def one_of(cfg: DictConfig, key: str, options: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    require(value in options, key, value, "allowed: " + ", ".join(options))


def positive_budget(cfg: DictConfig, key: str, upper: float | None = None) -> None:
    """A budget (eps, step size, tau) is a finite number > 0 (and <= ``upper``).  Reads only:
    ``config/normalise.py`` has already turned fractions such as 8/255 into floats."""
    value = as_float(key, OmegaConf.select(cfg, key))
    require(math.isfinite(value) and value > 0, key, value, "must be a finite number > 0")
    if upper is not None:
        require(value <= upper, key, value, f"must be <= {upper} (pixel units, data in [0,1])")


def finite(cfg: DictConfig, key: str) -> None:
    """A number that must be finite (inf/nan pass every range check written as a comparison)."""
    value = OmegaConf.select(cfg, key)
    values = list(value) if OmegaConf.is_list(value) else [value]
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
    shown = values if OmegaConf.is_list(value) else value
    require(ok, key, shown, "must be finite (not inf or nan)")


def whole_number(cfg: DictConfig, key: str, allowed: str) -> None:
    """For keys typed Any because they also take a word (``auto``): the number must be an int."""
    value = OmegaConf.select(cfg, key)
    require(isinstance(value, int) and not isinstance(value, bool), key, value, allowed)


def increasing_epochs(cfg: DictConfig, key: str) -> None:
    """A list of milestones: strictly increasing positive epochs (LR steps, FAT's tau steps)."""
    milestones = list(OmegaConf.select(cfg, key))
    require(
        all(m > 0 for m in milestones) and milestones == sorted(set(milestones)),
        key,
        milestones,
        "must be strictly increasing positive epochs",
    )


def at_least(cfg: DictConfig, key: str, low: int | float) -> None:
    value = OmegaConf.select(cfg, key)
    require(value >= low, key, value, f"must be >= {low}")


def at_most(cfg: DictConfig, key: str, high: int | float, why: str) -> None:
    """Reject sizes no run could mean (they would exhaust memory or run for years)."""
    value = OmegaConf.select(cfg, key)
    require(value <= high, key, value, f"must be <= {high:_} ({why})")


def check_attack(cfg: DictConfig, *, steps: bool = True, attack_bn: bool = True) -> None:
    """The L-inf attack settings most methods share: ``method.eps`` in (0, 1], a positive
    ``method.step_size``, ``method.steps`` >= 1 and ``method.attack_bn`` one of the BN modes."""
    positive_budget(cfg, "method.eps", upper=1.0)
    positive_budget(cfg, "method.step_size")
    if steps:
        at_least(cfg, "method.steps", 1)
    if attack_bn:
        one_of(cfg, "method.attack_bn", ATTACK_BN_MODES)
