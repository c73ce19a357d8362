"""L-inf PGD whose examples stop one by one: the shared inner loop of FOSC and FAT training.

    x^0 = the start (random in the eps-ball, or the clean image)
    active = all examples
    for k = 0 .. K-1:
        g   = grad_x CE(h(x^k), y)                      (one forward + backward of the whole batch)
        active = active AND rule(k, x^k, logits, g)     (the method's stopping criterion)
        x^{k+1} = x^k                                   where not active
                = clip_[0,1] clip_{x, eps}(x^k + alpha sign(g) [+ omega N(0,1)])   where active
    [final check: one more g at x^K, shown to the rule, for measurements only]

Why it is written this way:
- Early stopping is done by MASKING, not by shrinking the batch as the reference codes do: a
  stopped example keeps its perturbation and stops moving, the batch keeps its static shape, and
  the stop decisions stay on the device (no ``.item()``, no Python branching on device values, no
  ``nonzero``), so the K steps queue up without a host sync.  The price is that a stopped example
  still goes through every later forward and backward: the compute of a step is that of the full
  batch.  The pass counter is therefore charged for the full batch at every evaluation actually
  computed, and the number of steps each example really needed (the "useful" work, what the FAT
  code calls its "BP average") is returned separately in ``EarlyStopped.steps``.
- The mask is sticky (``active &= rule``): a stopped example never moves again, which is the
  paper's ``break`` for both methods (with an eval-mode model the reference's recomputed masks come
  to the same thing, since a frozen example's criterion cannot change).
- Per-example gradients come from the *summed* cross-entropy, so each example's gradient is its
  own loss's gradient (what FOSC's formula needs, and what the FOSC repository computes), and does
  not underflow under bf16 autocast.  With BatchNorm in eval mode (the default of both methods)
  the examples do not interact; in train mode the frozen examples still take part in the batch
  statistics, unlike in the reference codes, whose batch shrinks.
- Parameters are frozen while the loop runs: only input gradients are formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks.linf import project
from amata_runner.attacks.pgd import frozen_parameters
from amata_runner.runtime.passes import PassCounter


class StopRule(Protocol):
    """Decides, after the gradient at x^k is known, which examples may still move."""

    def __call__(
        self,
        k: int,
        x_k: torch.Tensor,
        logits: torch.Tensor,
        grad: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        """Return a (B,) bool mask: True where the example may take step k+1.

        ``k`` is the index of the current point x^k (k = K for the final check), ``logits`` and
        ``grad`` are detached, ``active`` is the mask before this check.
        """
        ...


@dataclass
class EarlyStopped:
    """The result of :func:`early_stopped_pgd` (device tensors, nothing read back to the host)."""

    x_adv: torch.Tensor  # (B, C, H, W) the produced examples, in the eps-ball and in [0,1]
    steps: torch.Tensor  # (B,) int64: steps each example actually moved (the useful work)
    active: torch.Tensor  # (B,) bool: never stopped by the rule during the K steps
    loss: torch.Tensor  # (B,) float32: per-example CE at the last point evaluated (x^K with the
    # final check, else x^{K-1}: exact for stopped examples, which have not moved since)
    evaluations: int  # full-batch forward+backward passes computed (the real cost)


def _per_example(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def early_stopped_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    rule: StopRule,
    noise: float = 0.0,
    final_check: bool = False,
    generator: torch.Generator | None = None,
    counter: PassCounter | None = None,
) -> EarlyStopped:
    """Run at most ``steps`` masked PGD steps from ``start``; ``rule`` stops examples one by one.

    ``noise`` adds ``noise * N(0,1)`` to each moving example's step (FAT's omega).  With
    ``final_check`` the gradient at the final point is computed too and shown to ``rule`` (with
    k = steps), for methods that measure their criterion at the produced examples (FOSC); that is
    one more full-batch forward+backward.  The model's mode is used as given (see
    ``attack_mode``).  ``counter`` is charged ``evaluations`` forward and backward passes for
    every example of the batch, stopped or not, because that is what is computed.
    """
    x = x.detach()
    x_k = start.detach().clone()
    batch = x.shape[0]
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    taken = torch.zeros(batch, dtype=torch.long, device=x.device)
    loss = torch.zeros(batch, dtype=torch.float32, device=x.device)
    evaluations = steps + int(final_check)
    with frozen_parameters(model), torch.enable_grad():
        for k in range(evaluations):
            x_k.requires_grad_(True)
            logits = model(x_k)
            per_example = F.cross_entropy(logits.float(), y, reduction="none")
            (grad,) = torch.autograd.grad(per_example.sum(), x_k)
            x_k = x_k.detach()
            loss = per_example.detach()
            keep = rule(k, x_k, logits.detach(), grad, active)
            if k == steps:  # the final check only measures
                break
            active = active & keep
            # Not linf.signed_step: FAT's noise joins the step before it is added to x^k, and
            # x + (s + n) rounds differently from (x + s) + n.
            step = step_size * grad.sign()
            if noise > 0:
                step = step + noise * torch.randn(
                    x_k.shape, generator=generator, device=x_k.device, dtype=x_k.dtype
                )
            moved = project(x_k + step, x, eps)
            x_k = torch.where(_per_example(active, x_k), moved, x_k)
            taken += active.long()
    if counter is not None:
        counter.add(batch, forward=evaluations, backward=evaluations)
    return EarlyStopped(x_k, taken, active, loss, evaluations)
