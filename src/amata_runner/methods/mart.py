"""MART (Wang et al., ICLR 2020), and Amata+MART when a schedule anneals its control.

    for each mini-batch x:
        x' = x + 0.001 * N(0, I)                           (BatchNorm in eval mode)
        for k = 1..K_t:
            x' = clip_[0,1](clip_{x,eps}(x' + alpha_t * sign(grad_x' CE(f(x'), y))))
        p, p' = softmax(f(x)), softmax(f(x'))
        BCE = CE(f(x'), y) - log(1 - max_{j != y} p'_j)    (the misclassification-aware boost)
        theta <- theta - eta * grad_theta [ BCE + beta * mean_i KL(p_i || p'_i) * (1 - p_i,y) ]

as YisenWang/MART mart.py computes it: the boost picks the most likely wrong class of p' (the top
class unless it is y, else the runner-up) and adds log(1.0001 - p'_j + 1e-12); the KL of each
example is weighted by 1.0000001 - p_y(x), so confidently correct examples count little and
misclassified ones fully; the weighted KL is summed and divided by the batch size. The reference
runs the PGD attack on the *mean* cross-entropy; this one ascends the summed cross-entropy (the same
sign, hence the same steps, and no bf16 underflow on large batches).

Passes per example: K forward+backward for the attack, then the update's clean and adversarial
forwards with one backward through each: K + 2 forwards, K + 2 backwards.

The defaults are the reference's CIFAR-10 settings (YisenWang/MART, train_wideresnet.py): beta = 6,
a N(0, 0.001^2) start and BatchNorm in eval mode while the attack runs; eps, K and alpha follow
the dataset's threat model. ``steps`` and ``step_size`` are what the schedule drives, so
``amata_mart`` anneals them. The config has TRADES's keys, ranges and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from amata_runner.attacks.pgd import attack_mode, pgd_linf
from amata_runner.control.schedules import Control
from amata_runner.methods.registry import register_method
from amata_runner.methods.trades import TRADES, TradesConfig


def misclassification_weights(clean_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - p_y(x) per example (the reference's 1.0000001 keeps a certain example's weight > 0)."""
    return 1.0000001 - clean_probs.gather(1, y[:, None]).squeeze(1)


def boosted_cross_entropy(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(f(x'), y) plus the margin term that pushes down the most likely wrong class."""
    probs = F.softmax(logits_adv, dim=1)
    top2 = probs.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    margin = F.nll_loss(torch.log(1.0001 - probs + 1e-12), wrong)
    return F.cross_entropy(logits_adv, y) + margin


@dataclass
class MartConfig(TradesConfig):
    """MART (Wang et al. 2020): boosted CE on x' + beta * KL(f(x) || f(x')) * (1 - p_y(x)).

    TRADES's keys, defaults and range checks (``TradesConfig.check``); ``beta`` weighs the
    misclassification-aware KL term and ``steps`` is the K of the cross-entropy PGD attack.
    """

    name: str = "mart"


@register_method("mart", MartConfig, annealed="amata_mart")
class MART(TRADES):
    """TRADES' machinery (attack, then one update on the clean and adversarial batches) with
    MART's attack loss (cross-entropy) and objective."""

    def attack(self, x: torch.Tensor, y: torch.Tensor, control: Control) -> torch.Tensor:
        """x' inside the eps-ball that (approximately) maximises CE(f(x'), y)."""
        model = self.ctx.model
        with attack_mode(model, self.cfg.attack_bn), self.attack_precision():
            return pgd_linf(
                model,
                x,
                y,
                eps=self.cfg.eps,
                step_size=control.step_size,
                steps=control.steps,
                start_std=self.cfg.start_std,
                counter=self.ctx.counter,
            )

    def loss(self, logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        clean_probs = F.softmax(logits, dim=1)
        adv_log_probs = torch.log(F.softmax(logits_adv, dim=1) + 1e-12)
        kl = F.kl_div(adv_log_probs, clean_probs, reduction="none").sum(1)
        robust = (kl * misclassification_weights(clean_probs, y)).sum() / y.shape[0]
        return boosted_cross_entropy(logits_adv, y) + self.cfg.beta * robust
