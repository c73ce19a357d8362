"""PGD-K with R random restarts, keeping the worst case per example (Fast-AT's evaluation protocol).

Why it is written this way (locuslab ``attack_pgd``, see docs/methods.md, Evaluation attacks):
- Within a restart only examples the model still classifies correctly keep moving: once an example
  is fooled its perturbation is frozen, so a later step cannot walk it back to the right class.
  The update is multiplied by a 0/1 mask instead of indexing, so shapes stay static and nothing is
  read back to the host inside the loop (locuslab's "stop when all are fooled" sync is dropped).
- Across restarts an example keeps the candidate that *fools* the model, and among candidates that
  agree on that, the one with the higher cross-entropy.  locuslab keeps the highest loss alone;
  with more than two classes a higher loss does not imply a wrong prediction, so ranking "fooled"
  first is what makes accuracy monotone non-increasing in R for a fixed seed sequence (the first R
  restarts of an R+1-restart run are exactly the R-restart run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks.linf import project_delta, random_delta, signed_step
from amata_runner.attacks.pgd import frozen_parameters
from amata_runner.runtime.passes import PassCounter


def _masked_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One restart: uniform start in the ball (clipped to [0,1]), steps only on still-correct x."""
    delta = random_delta(x, eps, generator)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(x + delta)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        moving = (logits.detach().argmax(1) == y).to(x.dtype).view(shape)
        delta = project_delta(signed_step(delta.detach(), grad, moving * step_size), x, eps)
    return delta.detach()


def pgd_restarts(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    restarts: int,
    generator: torch.Generator | None = None,
    counter: PassCounter | None = None,
) -> torch.Tensor:
    """Per example, the most adversarial of ``restarts`` masked PGD runs (in the ball and [0,1]).

    The model's mode is used as given (evaluation puts it in eval mode); parameters are frozen.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    x = x.detach()
    best = torch.zeros_like(x)
    best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_loss = torch.full((x.shape[0],), -torch.inf, device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    with frozen_parameters(model), torch.enable_grad():
        for _ in range(restarts):
            delta = _masked_pgd(
                model, x, y, eps=eps, step_size=step_size, steps=steps, generator=generator
            )
            with torch.no_grad():
                logits = model(x + delta)
                loss = F.cross_entropy(logits, y, reduction="none")
                fooled = logits.argmax(1) != y
                better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
                best = torch.where(better.view(shape), delta, best)
                best_loss = torch.where(better, loss, best_loss)
                best_fooled = best_fooled | fooled
    if counter is not None:
        counter.add(x.shape[0], forward=restarts * (steps + 1), backward=restarts * steps)
    return (x + best).detach()
