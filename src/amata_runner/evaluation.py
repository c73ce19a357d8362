"""Clean and PGD accuracy of a model on a fixed set of examples.

Evaluation is a measurement, so it is made the same way every time: the model in eval mode, fp32
(autocast off), parameters frozen, and a dedicated random generator for the attack's random start,
seeded per call, so curves are comparable across runs and methods and the training RNG stream is
never touched (which keeps resumed runs identical to uninterrupted ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from amata_runner.attacks.pgd import attack_mode, pgd_linf


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
    device = images.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    clean = torch.zeros((), dtype=torch.long, device=device)
    robust = torch.zeros((), dtype=torch.long, device=device)
    with attack_mode(model, "eval"), torch.autocast(device.type, enabled=False):
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].float().div_(255)
            y = labels[start : start + batch_size]
            with torch.no_grad():
                clean += (model(x).argmax(1) == y).sum()
            x_adv = pgd_linf(
                model,
                x,
                y,
                eps=attack.eps,
                step_size=attack.step_size,
                steps=attack.steps,
                random_start=attack.random_start,
                generator=generator,
            )
            with torch.no_grad():
                robust += (model(x_adv).argmax(1) == y).sum()
    return EvalResult(int(images.shape[0]), int(clean.item()), int(robust.item()))
