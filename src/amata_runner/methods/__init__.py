"""Training methods behind one interface (``Method.train_batch``), one module per method.

Importing this package imports every module in it, and each method module registers itself
(``registry.register_method``) with its typed config and its step together; :func:`build_method`
builds the class from the run's ``cfg.method``.  So a new method is a new module here and its
YAML in ``conf/method/``: no list to extend.  ``amata_*`` configs are not separate algorithms: they
compose a method with an annealing schedule, so they build the same class from the same config.
"""

from __future__ import annotations

import importlib
import pkgutil

from omegaconf import DictConfig

from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.methods.registry import method_spec

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_method(cfg: DictConfig, ctx: TrainContext) -> Method:
    """The method ``cfg.name`` names, built from its typed config (``cfg`` is ``cfg.method``)."""
    spec = method_spec(cfg.name)
    method: Method = spec.method(ctx, spec.typed(cfg))
    return method


__all__ = ["Method", "StepOutput", "TrainContext", "build_method"]
