"""FAT, friendly adversarial training (Zhang et al., ICML 2020), the FAT baseline of the paper.

    for epoch t = 1 .. T (1-based, as the reference calls ``adjust_tau(epoch + 1)``):
        tau_t = number of milestones m (default 50, 90) with t > m    (0, then 1, then 2)
        for each mini-batch (x, y):                       (early-stopped PGD-K-tau, "earlystop.py")
            x^0 = x + U(-eps, eps), clipped to [0,1];  budget_i = tau_t
            for k = 0 .. K-1:
                for each example still running:
                    if h(x^k) misclassifies it:
                        if budget_i = 0: stop it (it keeps x^k)
                        else: budget_i <- budget_i - 1
                x^{k+1} = clip_[0,1] clip_{x, eps}(x^k + alpha sign(grad_x l) + omega N(0,1))
                          for the examples still running
            theta <- theta - eta grad_theta mean_i l(h(x_i^adv), y_i)

So an example stops tau_t steps after it is first misclassified (when it stays misclassified, the
usual case; an example that flips back to correct does not spend budget on that step, exactly as
in the paper's Algorithm 1 and the code).  With tau = 0 an example misclassified at the random
start takes no step at all; the examples still running after K steps are used as they are.  The
training data are "friendly": just past the decision boundary, not the loss maximisers.

How it is run here (and why):
- The early stop is done by masking (``attacks.early_stop``): a stopped example stops moving but
  still goes through each later forward/backward, so the compute per batch is that of PGD-K
  whatever tau is; the budget counters and the stop decisions stay on the device (no host sync).
  The reference shrinks the batch instead (and then re-orders the outputs, stopped ones first,
  which changes nothing for a mean loss).  ``mean_steps`` in the metrics rows is the mean number
  of steps the examples actually took (the reference's "BP average"), ``stopped_fraction`` the
  share that stopped before K.
- Passes: per example and batch, K forward and K backward passes in the attack (the forward at x^k
  serves both the check and the gradient; no check after the last step), plus 1 forward and 1
  backward for the update.  The reference's extra forward of the clean batch (used only by its KL
  loss option) is not done.
- Not driven by the ``schedule`` group: tau_t is this method's own schedule (``start_epoch``);
  knobs: K, alpha and tau.  The milestones are epochs, as in the reference's 120-epoch CIFAR
  recipe; scale ``tau_milestones`` for shorter runs (e.g. [6, 11] for 15 epochs).
- K and alpha default to the dataset's threat model (CIFAR10: PGD-10 of 2/255 at 8/255, the
  reference's 10 steps of 0.007 at 0.031 up to rounding); ``omega`` = 0.001 is FAT.py's default.
- The attack runs with BatchNorm in ``attack_bn`` mode (eval, as ``earlystop.py`` sets it).

Quirk of the reference code: ``--dynamictau`` and ``--random`` are argparse ``type=bool`` flags,
so any value, "False" included, parses as True and neither can be switched off.  Here they do what
they were meant to do: ``dynamic_tau=false`` trains with the fixed ``tau`` throughout and
``random_start=false`` starts at the clean image.  The defaults (true, true) are the behaviour the
reference always has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from amata_runner.attacks.early_stop import early_stopped_pgd
from amata_runner.attacks.linf import random_start
from amata_runner.attacks.pgd import attack_mode
from amata_runner.checks import (
    ATTACK_BN_MODES,
    at_least,
    check_attack,
    increasing_epochs,
    one_of,
    require,
)
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import StepOutput, TrainContext
from amata_runner.methods.registry import register_method
from amata_runner.methods.running import MeasuredMethod, RunningMeans
from amata_runner.methods.settings import AttackSettings

REFERENCE_MILESTONES = (50, 90)


def tau_at(
    epoch: int,
    *,
    dynamic: bool = True,
    tau: int = 0,
    milestones: tuple[int, ...] | list[int] = REFERENCE_MILESTONES,
) -> int:
    """tau for the 0-based ``epoch``: the reference's ``adjust_tau(epoch + 1)``.

    Dynamic: 0 up to the first milestone (1-based epochs 1..50), then one more after each
    (51..90: 1, 91..: 2).  Otherwise the fixed ``tau``.
    """
    if not dynamic:
        return tau
    return sum(1 for m in milestones if epoch + 1 > m)


class FATRule:
    """Stops an example when it is misclassified with no budget left; a misclassification with
    budget left spends one unit (the budget starts at tau)."""

    def __init__(self, y: torch.Tensor, tau: int) -> None:
        self.y = y
        self.budget = torch.full_like(y, tau, dtype=torch.long)

    def __call__(
        self,
        k: int,
        x_k: torch.Tensor,
        logits: torch.Tensor,
        grad: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        del k, x_k, grad
        wrong = logits.argmax(1) != self.y
        stop = wrong & (self.budget == 0)
        self.budget = self.budget - (wrong & active & ~stop).long()
        return ~stop


@dataclass
class FATConfig(AttackSettings):
    """Early-stopped PGD: an example stops tau_t steps after it is first misclassified.

    eps, K (``steps``, the most PGD steps) and alpha: the dataset's threat model (the reference,
    CIFAR/SVHN only: eps 0.031, --num-steps 10, --step-size 0.007).  ``attack_bn``: eval, as
    earlystop.py sets it.
    """

    name: str = "fat"
    # start at x + U(-eps, eps); reference --random (a type=bool flag, so always on there); false
    # starts at the clean image (the flag's intended meaning)
    random_start: bool = True
    # std of the Gaussian noise added to each step of the moving examples; FAT.py --omega default
    omega: float = 0.001
    # tau_t from tau_milestones; reference --dynamictau (a type=bool flag, so always on there);
    # false uses the fixed `tau` throughout (the flag's intended meaning)
    dynamic_tau: bool = True
    # the fixed tau when dynamic_tau=false; reference --tau default 0
    tau: int = 0
    # 1-based epochs after which tau_t grows by 1: the reference's adjust_tau(epoch + 1) gives 0
    # for epochs 1-50, 1 for 51-90, 2 after (of 120); scale them for shorter runs
    tau_milestones: list[int] = field(default_factory=lambda: [50, 90])

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """The ranges of ``cfg.method`` (budgets are floats already: config/normalise.py)."""
        check_attack(cfg, attack_bn=False)
        at_least(cfg, "method.tau", 0)
        omega = cfg.method.omega
        require(omega >= 0, "method.omega", omega, "must be >= 0")
        increasing_epochs(cfg, "method.tau_milestones")
        one_of(cfg, "method.attack_bn", ATTACK_BN_MODES)


@register_method("fat", FATConfig)
class FAT(MeasuredMethod):
    uses_control = False

    def __init__(self, ctx: TrainContext, cfg: FATConfig) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        self.tau = self._tau(0)
        self.means = RunningMeans(ctx.device, "mean_steps", "stopped_fraction")

    def _tau(self, epoch: int) -> int:
        cfg = self.cfg
        return tau_at(epoch, dynamic=cfg.dynamic_tau, tau=cfg.tau, milestones=cfg.tau_milestones)

    # ------------------------------------------------------------------ schedule
    def start_epoch(self, epoch: int, control: Control | None) -> None:
        """Set this epoch's tau_t."""
        del control
        self.tau = self._tau(epoch)

    def knobs(self, control: Control | None) -> dict[str, float | int]:
        del control
        return {"K": self.cfg.steps, "alpha": self.cfg.step_size, "tau": self.tau}

    # ------------------------------------------------------------------ training
    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        del control
        x, y, model = batch.x, batch.y, self.ctx.model
        cfg = self.cfg
        start = random_start(x, cfg.eps) if cfg.random_start else x.detach().clone()
        with attack_mode(model, cfg.attack_bn), self.attack_precision():
            result = early_stopped_pgd(
                model,
                x,
                y,
                start,
                eps=cfg.eps,
                step_size=cfg.step_size,
                steps=cfg.steps,
                rule=FATRule(y, self.tau),
                noise=cfg.omega,
                counter=self.ctx.counter,
            )
        self.means.add(
            x.shape[0], mean_steps=result.steps.sum(), stopped_fraction=(~result.active).sum()
        )
        return self.update(result.x_adv, y)
