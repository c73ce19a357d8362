"""Training methods behind one interface (``Method.train_batch``), built from ``cfg.method``.

Each method lives in its own module with a ``build(cfg.method, ctx)`` function; modules are
imported only when their method is used.  ``amata_*`` configs are not separate algorithms: they
compose a method with an annealing schedule, so they build the same class.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from amata_runner.methods.base import Method, StepOutput, TrainContext

# method name (cfg.method.name) -> module implementing it
IMPLEMENTATIONS: dict[str, str] = {
    "erm": "erm",
    "pgd": "pgd",
    "amata": "pgd",
    "fosc": "fosc",
    "fat": "fat",
    "yopo": "yopo",
    "amata_yopo": "yopo",
    "free": "free",
    "amata_free": "free",
    "fast": "fast",
    "amata_fast": "fast",
    "atta": "atta",
    "amata_atta": "atta",
    "trades": "trades",
    "amata_trades": "trades",
    "mart": "mart",
    "amata_mart": "mart",
}


def build_method(cfg: DictConfig, ctx: TrainContext) -> Method:
    module = IMPLEMENTATIONS.get(cfg.name)
    if module is None:
        raise ValueError(f"unknown method {cfg.name!r}")
    return importlib.import_module(f"amata_runner.methods.{module}").build(cfg, ctx)


__all__ = ["IMPLEMENTATIONS", "Method", "StepOutput", "TrainContext", "build_method"]
