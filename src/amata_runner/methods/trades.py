"""TRADES (Zhang et al., ICML 2019), and Amata+TRADES when a schedule anneals its control.

    for each mini-batch x:
        p = softmax(f(x))                                  (BatchNorm in eval mode)
        x' = x + 0.001 * N(0, I)
        for k = 1..K_t:
            x' = clip_[0,1](clip_{x,eps}(x' + alpha_t * sign(grad_x' KL(p || softmax(f(x'))))))
        theta <- theta - eta * grad_theta [ CE(f(x), y) + beta * KL(p(x) || p(x')) ],  p = softmax∘f

as yaodongyu/TRADES trades.py computes it: the KL is summed over the batch and divided by the
batch size (a batch mean of per-example KLs), the clean term is the mean cross-entropy, the attack
ascends the *summed* KL with BatchNorm in eval mode, and the update runs in train mode. Where this
differs from the reference (same values, less work): the clean probabilities the attack aims away
from are computed once per batch, not once per attack step (in eval mode they are identical), and
the update uses one clean forward for both terms where the reference makes two (so BatchNorm's
running statistics see the clean batch once, not twice).

Passes per example: 1 clean forward for p, K forward+backward for the attack, then the update's
clean and adversarial forwards with one backward through each: K + 3 forwards, K + 2 backwards.

The defaults are the reference's CIFAR-10 settings (yaodongyu/TRADES, train_trades_cifar10.py):
beta = 6 (the paper's 1/lambda), a N(0, 0.001^2) start and BatchNorm in eval mode while the KL
attack runs; eps, K and alpha follow the dataset's threat model. ``steps`` and ``step_size`` are
what the schedule drives, so ``amata_trades`` anneals them as Amata anneals PGD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from amata_runner.attacks.pgd import attack_mode, pgd_linf
from amata_runner.checks import ATTACK_BN_MODES, check_attack, one_of, require
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.methods.registry import register_method
from amata_runner.methods.settings import AttackSettings


def kl_sum(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """sum over the batch of KL(target || softmax(logits)), TRADES' ``KLDivLoss(sum)``."""
    return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="sum")


@dataclass
class TradesConfig(AttackSettings):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL.

    ``steps`` is the K of the KL attack; ``attack_bn``: eval, as the reference (model.eval()).
    """

    name: str = "trades"
    beta: float = 6.0  # weight of the KL term (the papers' CIFAR-10 value)
    start_std: float = 0.001  # the attack starts at x + N(0, start_std^2), as the reference

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Budgets positive, K >= 1, beta >= 0, start_std >= 0."""
        check_attack(cfg, attack_bn=False)
        beta = cfg.method.beta
        require(0 <= beta < float("inf"), "method.beta", beta, "must be a finite number >= 0")
        std = cfg.method.start_std
        require(0 <= std < float("inf"), "method.start_std", std, "must be a finite number >= 0")
        one_of(cfg, "method.attack_bn", ATTACK_BN_MODES)


@register_method("trades", TradesConfig, annealed="amata_trades")
class TRADES(Method):
    uses_control = True
    knob = "steps"

    def __init__(self, ctx: TrainContext, cfg: TradesConfig) -> None:
        super().__init__(ctx)
        self.cfg = cfg

    def attack(self, x: torch.Tensor, y: torch.Tensor, control: Control) -> torch.Tensor:
        """x' inside the eps-ball that (approximately) maximises KL(f(x) || f(x')); y unused."""
        del y
        model, counter = self.ctx.model, self.ctx.counter
        with attack_mode(model, self.cfg.attack_bn), self.attack_precision():
            with torch.no_grad():
                clean_probs = F.softmax(model(x), dim=1).float()
            counter.add(x.shape[0], forward=1, backward=0)
            return pgd_linf(
                model,
                x,
                clean_probs,
                eps=self.cfg.eps,
                step_size=control.step_size,
                steps=control.steps,
                start_std=self.cfg.start_std,
                counter=counter,
                loss_fn=kl_sum,
            )

    def loss(self, logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The outer objective: mean CE on clean + beta * batch-mean KL(clean || adversarial)."""
        robust = kl_sum(logits_adv, F.softmax(logits, dim=1)) / y.shape[0]
        return F.cross_entropy(logits, y) + self.cfg.beta * robust

    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        if control is None:
            raise ValueError("TRADES needs a control (K, alpha) from a schedule")
        x_adv = self.attack(batch.x, batch.y, control)
        return self.pair_update(batch.x, x_adv, batch.y, self.loss)
