"""Clean and PGD accuracy of a model on a fixed set of examples: the periodic metrics rows.

The measurement is the final evaluation's (``attacks/suite.py``: eval mode, fp32, parameters
frozen, random starts from a generator re-seeded per batch from ``eval.seed``), applied to the
subset, so a periodic PGD-20 and a final PGD-20 are one attack and one seeding, and the training
random stream is never touched (a resumed run stays identical to an uninterrupted one).  What is
left here is what the rows need beyond the suite: the attack is given by ``eval.attack``'s
numbers rather than by a name and the final threat model, and the result is read as errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from amata_runner.attacks.suite import SuiteOptions, run_suite


@dataclass(frozen=True)
class AttackSpec:
    eps: float
    step_size: float
    steps: int
    random_start: bool = True

    @property
    def name(self) -> str:
        return f"pgd{self.steps}"


@dataclass(frozen=True)
class EvalResult:
    total: int
    clean_correct: int
    robust_correct: int

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / self.total

    @property
    def robust_accuracy(self) -> float:
        return self.robust_correct / self.total

    @property
    def clean_error(self) -> float:
        return 1.0 - self.clean_accuracy

    @property
    def robust_error(self) -> float:
        return 1.0 - self.robust_accuracy


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: AttackSpec,
    *,
    batch_size: int,
    seed: int,
) -> EvalResult:
    """Accuracy on (images, labels) clean and under ``attack``; ``images``: uint8 on the device."""
    options = SuiteOptions(
        eps=attack.eps, step_size=attack.step_size, pgd_random_start=attack.random_start
    )
    results = run_suite(
        model, images, labels, ["clean", attack.name], options, batch_size=batch_size, seed=seed
    )
    return EvalResult(
        int(images.shape[0]), results["clean"]["correct"], results[attack.name]["correct"]
    )
