"""Turn a composed config into the values a run uses, once, before any check reads it.

Interpolations are resolved, budgets typed as fractions (``method.eps=8/255``) become floats, and
the defaults that depend on other keys are filled in (a method's own, e.g. Fast's step size;
``schedule.k_min`` null; the criterion's nulls).  The run's saved config is this result, so it
records exactly the numbers that were used; ``checks.py`` then only reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from amata_runner.checks import as_float
from amata_runner.config.checks import validate
from amata_runner.config.schema import register_methods
from amata_runner.control.criterion_config import normalise_criterion
from amata_runner.errors import ConfigError

# Budgets of the run outside the method (the method's are its config's fields typed Any).
RUN_BUDGETS = (
    "dataset.threat.eps",
    "dataset.threat.step_size",
    "eval.attack.eps",
    "eval.attack.step_size",
    "eval.final_threat.eps",
    "eval.final_threat.step_size",
    "schedule.tau",
)


def resolve_config(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations, normalise and check every range; return the copy.

    Working on a resolved copy means every later reader sees plain numbers, and the run's saved
    config records exactly the values that were used.
    """
    try:
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except Exception as exc:  # an interpolation to a key that does not exist
        raise ConfigError(getattr(exc, "full_key", "config"), "", str(exc).splitlines()[0]) from exc
    with open_dict(resolved):
        normalise(resolved)
    validate(resolved)
    return resolved


def normalise(cfg: DictConfig) -> None:
    """Fractions to floats and derived defaults, in place (``cfg`` is resolved and open)."""
    from amata_runner.methods.registry import method_spec

    register_methods()
    for key in RUN_BUDGETS:
        _to_float(cfg, key)
    spec = method_spec(cfg.method.name)  # an unknown name: one line listing the allowed ones
    for field in dataclasses.fields(spec.config):
        if field.type in ("Any", Any):
            _to_float(cfg, f"method.{field.name}")
    fill = getattr(spec.config, "normalise", None)  # a method's defaults that depend on others
    if fill is not None:
        fill(cfg)
    if spec.scheduled and cfg.schedule.k_min is None:
        cfg.schedule.k_min = spec.k_max(cfg)  # null: K_max, no annealing
    normalise_criterion(cfg)


def _to_float(cfg: DictConfig, key: str) -> None:
    """A number or a fraction such as ``8/255`` becomes a float; null (a default still to fill) and
    lists stay; any other text is refused in one line saying what a budget looks like."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return
    OmegaConf.update(cfg, key, as_float(key, value))
