"""Config schemas and range checks of the methods beyond PGD, kept free of torch imports.

Each module ``<method>.py`` here defines ``SCHEMA`` (a dataclass registered in Hydra's ConfigStore
as ``schema/method/<method>``, which ``conf/method/<method>.yaml`` lists first) and
``check(cfg)``, which validates ``cfg.method`` of a resolved config and raises ``ConfigError``
(use the helpers ``require``, ``one_of``, ``positive_budget``, ``at_least`` of
``amata_runner.checks``).  The ``amata_<method>`` variants share their base method's schema.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

METHOD_MODULES = ("fosc", "fat", "yopo", "free", "fast", "atta", "trades", "mart")

SCHEMAS: dict[str, type] = {}
CHECKS: dict[str, Callable[[Any], None]] = {}

for _name in METHOD_MODULES:
    _module = importlib.import_module(f"amata_runner.method_configs.{_name}")
    SCHEMAS[_name] = _module.SCHEMA
    CHECKS[_name] = _module.check
