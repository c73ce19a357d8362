"""AutoAttack (Croce & Hein 2020) through the packaged reference implementation, never rewritten.

The reference repository (fra31/auto-attack) is not on PyPI; ``pyautoattack`` is its packaged
release and imports as ``pyautoattack`` (docs/methods.md, Evaluation attacks).  It is an optional
extra, imported only when an AutoAttack evaluation is asked for, so the runner installs and trains
without it.  Numbers are meant to compare with RobustBench, so the default is ``version=standard``
(APGD-CE, APGD-T, FAB-T, Square) with the L-inf eps of the run's threat model.

Two things around the call: AutoAttack reseeds torch's global generators from its ``seed``, so the
call runs inside ``torch.random.fork_rng`` (a training process that evaluates at the end keeps its
random stream); and its own resume file is not used (in pyautoattack 0.2.0 a restored state leaves
``y_adv`` undefined), resumption happens per batch in the suite instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from amata_runner.errors import ConfigError

AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
INSTALL_HINT = "needs the optional AutoAttack package: pip install 'amata-runner[autoattack]'"


def load_autoattack(key: str = "attacks") -> Any:
    """The ``AutoAttack`` class, or a ConfigError telling the user which extra to install."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:
        raise ConfigError(key, "autoattack", INSTALL_HINT) from exc
    return AutoAttack


def autoattack_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    version: str = "standard",
    attacks: tuple[str, ...] = (),
    seed: int = 0,
    batch_size: int = 500,
) -> torch.Tensor:
    """AutoAttack's adversarial examples for (x, y) in [0,1] (the model in the mode given).

    ``attacks`` is used only with ``version=custom`` (e.g. ``("apgd-ce",)`` for a cheap check).
    """
    if version not in AUTOATTACK_VERSIONS:
        allowed = "allowed: " + ", ".join(AUTOATTACK_VERSIONS)
        raise ConfigError("autoattack_version", version, allowed)
    unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
    if unknown or (version == "custom" and not attacks):
        raise ConfigError(
            "autoattack_attacks",
            list(attacks),
            "with version=custom, a non-empty list from: " + ", ".join(AUTOATTACK_ATTACKS),
        )
    auto_attack = load_autoattack()
    chosen = list(attacks) if version == "custom" else None
    adversary = auto_attack(
        model, attacks=chosen, device=x.device, eps=eps, norm="Linf", seed=seed, version=version
    )
    # AutoAttack seeds the current CUDA device, which need not be x's: keep every device's stream.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        x_adv, _ = adversary.run_standard_evaluation(x.detach(), y, batch_size=batch_size)
    return x_adv.detach()
