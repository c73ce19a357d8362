"""PGD adversarial training, and Amata when a schedule anneals its control (Algorithm 1).

    for each mini-batch x^0:
        for k = 1..K_t:
            x^k = clip_{x^0, eps}(x^{k-1} + alpha_t * sign(grad_x l(h_theta(x^{k-1}), y)))
        theta <- theta - eta * grad_theta l(h_theta(x^{K_t}), y)

K_t and alpha_t come from the schedule (constant: the PGD-K baseline; linear: Amata).  The attack
runs with BatchNorm in ``attack_bn`` mode (eval by default, as in YOPO's PGD baseline the paper
follows) and under the training precision; the update sees only adversarial examples (the paper's
objective, not the YOPO code's adversarial + clean sum).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from amata_runner.attacks.pgd import attack_mode, pgd_linf
from amata_runner.checks import check_attack
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.methods.registry import register_method
from amata_runner.methods.settings import AttackSettings


@dataclass
class PGDConfig(AttackSettings):
    """Madry PGD-K training; ``steps``/``step_size`` are the baseline control K, alpha."""

    name: str = "pgd"
    random_start: bool = True

    @staticmethod
    def check(cfg: DictConfig) -> None:
        check_attack(cfg)


@register_method("pgd", PGDConfig, annealed="amata")
class PGD(Method):
    uses_control = True
    knob = "steps"

    def __init__(self, ctx: TrainContext, cfg: PGDConfig) -> None:
        super().__init__(ctx)
        self.cfg = cfg

    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        if control is None:
            raise ValueError("PGD needs a control (K, alpha) from a schedule")
        model = self.ctx.model
        with attack_mode(model, self.cfg.attack_bn), self.attack_precision():
            x_adv = pgd_linf(
                model,
                batch.x,
                batch.y,
                eps=self.cfg.eps,
                step_size=control.step_size,
                steps=control.steps,
                random_start=self.cfg.random_start,
                counter=self.ctx.counter,
            )
        return self.update(x_adv, batch.y)
