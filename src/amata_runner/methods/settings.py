"""The attack keys most methods share, so their defaults are written once.

Registering no method, this module is imported with the others (``methods/__init__.py`` imports
every module here) and is torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING


@dataclass
class AttackSettings:
    """An L-inf attack inside training: ``steps`` sign steps of ``step_size`` in the eps-ball,
    with BatchNorm in ``attack_bn`` mode (eval, as every reference the paper follows sets it).

    The budgets default to the dataset's threat model (``dataset.threat``: MNIST PGD-40 of 0.01 at
    0.3, CIFAR10 PGD-10 of 2/255 at 8/255), so one ``dataset=`` switch moves every method.  A
    method's config subclasses this and sets ``name``; ``checks.check_attack`` checks the ranges.
    """

    name: str = MISSING
    eps: Any = "${dataset.threat.eps}"
    steps: int = "${dataset.threat.steps}"  # type: ignore[assignment]
    step_size: Any = "${dataset.threat.step_size}"
    attack_bn: str = "eval"
