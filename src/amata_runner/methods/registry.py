"""The one list of training methods: each method module registers itself here.

A method is one module holding its typed config (a dataclass, registered in Hydra's ConfigStore as
``schema/method/<name>``) and its ``Method`` class, which is built from that config directly.  The
module registers both with :func:`register_method`; every name list the runner checks or shows
(the ``method`` options, the methods a schedule drives, their ``amata_*`` variants) is derived
from this registry.  Adding a method therefore touches its module and ``conf/method/<name>.yaml``
(plus ``conf/method/amata_<name>.yaml`` for an annealed variant), nothing else.

This module imports no torch, so a config can name a registered method before torch loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from amata_runner.errors import ConfigError

M = TypeVar("M", bound=type)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its typed config, the class it builds, its variants."""

    name: str
    config: type  # a dataclass; its ``check(cfg)`` staticmethod, if any, validates a run config
    method: type  # a ``methods.base.Method`` subclass, called as ``method(ctx, config)``
    annealed: str | None  # the ``amata_*`` name that pairs it with an annealing schedule

    @property
    def scheduled(self) -> bool:
        """True when a schedule drives the method (``Method.knob`` names the key it anneals)."""
        return bool(self.method.uses_control)

    def check(self, cfg: DictConfig) -> None:
        """Range checks of ``cfg.method`` in a resolved run config (raise ``ConfigError``)."""
        check: Callable[[DictConfig], None] | None = getattr(self.config, "check", None)
        if check is not None:
            check(cfg)

    def k_max(self, cfg: DictConfig) -> int:
        """K_max of the schedule: the method's own value of its ``knob`` (1 without a knob)."""
        knob: str | None = self.method.knob
        return 1 if knob is None else int(cfg.method[knob])

    def tau(self, cfg: DictConfig) -> float:
        """The schedule's budget tau = K * alpha: ``schedule.tau``, or null: ``method.step_size``
        times K_max, so that the last control is the plain baseline's (K_max, step_size)."""
        tau = cfg.schedule.tau
        return float(cfg.method.step_size) * self.k_max(cfg) if tau is None else float(tau)

    def typed(self, node: DictConfig) -> Any:
        """The config dataclass filled from a resolved ``cfg.method`` node."""
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(self.config), node))


_SPECS: dict[str, MethodSpec] = {}  # by every name a config may use, variants included


def register_method(name: str, config: type, *, annealed: str | None = None) -> Callable[[M], M]:
    """Class decorator: register ``cls`` as method ``name``, built from a ``config`` instance.

    ``annealed`` is the name of the variant that composes the method with an annealing schedule
    (``conf/method/<annealed>.yaml``); it builds the same class from the same config.
    """

    def register(cls: M) -> M:
        spec = MethodSpec(name=name, config=config, method=cls, annealed=annealed)
        for key in (name, annealed):
            if key is None:
                continue
            if key in _SPECS and _SPECS[key].method is not cls:
                raise ValueError(f"method name {key!r} is already registered")
            _SPECS[key] = spec
        return cls

    return register


def unregister_method(name: str) -> None:
    """Remove a method and its variant (tests that register a toy method clean up with this)."""
    spec = _SPECS.pop(name)
    if spec.annealed is not None:
        _SPECS.pop(spec.annealed, None)


def method_spec(name: str) -> MethodSpec:
    """The spec of a method or variant name; ``ConfigError`` lists the names allowed."""
    spec = _SPECS.get(name)
    if spec is None:
        raise ConfigError("method.name", name, "allowed: " + ", ".join(method_names()))
    return spec


def method_names() -> tuple[str, ...]:
    """Every name ``method=`` accepts, each base method followed by its annealed variant."""
    return tuple(_SPECS)


def base_specs() -> tuple[MethodSpec, ...]:
    """One spec per method (variants share their base method's spec)."""
    return tuple(spec for name, spec in _SPECS.items() if name == spec.name)


def scheduled_method_names() -> tuple[str, ...]:
    """The names whose strength follows the ``schedule`` group."""
    return tuple(name for name, spec in _SPECS.items() if spec.scheduled)
