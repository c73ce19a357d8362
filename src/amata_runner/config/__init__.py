"""The run's configuration: schema, normalisation (done once) and pure checks.

    schema.py     the dataclasses Hydra composes against (``schema/<group>/<name>``)
    normalise.py  resolve interpolations, fractions -> floats, derived defaults; then check
    checks.py     range and consistency rules that only read, one ConfigError line each
    names.py      every name list and fixed fact the checks use (no torch)

A run config goes ``compose -> resolve_config`` (normalise, then validate) and every later reader
sees plain numbers; the saved ``config_resolved.yaml`` is that result.
"""

from __future__ import annotations

from amata_runner.config.checks import validate
from amata_runner.config.names import (
    ADAPTIVE_MODES,
    ADAPTIVE_RULES,
    DATASETS,
    FOLDER_DATASETS,
    MOVED_KEYS,
    PLUGINS_ENV,
    PRECISIONS,
    SCHEDULES,
)
from amata_runner.config.normalise import normalise, resolve_config
from amata_runner.config.schema import EvalConfig, RunConfig, register_methods, register_schemas

__all__ = [
    "ADAPTIVE_MODES",
    "ADAPTIVE_RULES",
    "DATASETS",
    "FOLDER_DATASETS",
    "MOVED_KEYS",
    "PLUGINS_ENV",
    "PRECISIONS",
    "SCHEDULES",
    "EvalConfig",
    "RunConfig",
    "normalise",
    "register_methods",
    "register_schemas",
    "resolve_config",
    "validate",
]
