"""Carlini-Wagner attacks in the two forms adversarial-training papers report as "CW".

``cw_linf`` is the L-inf form of FAT, CAT and DAT's evaluation ("dat" protocol in FAT's
``attack_generator.py``, docs/methods.md, Evaluation attacks): PGD from a random start whose loss is
the CW margin instead of cross-entropy, max over wrong logits minus the true logit, capped at
``kappa`` (their kappa is 50, so in practice the margin keeps growing for all the steps).

``cw_l2`` is the penalty form of xuanqing94/BayesianDefense ``attacker/cw.py``, the implementation
the Amata paper cites for its CW columns (Appendix A: c = 100 on MNIST, c = 0.5 on CIFAR10, 100
iterations; docs/methods.md, Evaluation attacks): Adam (lr 0.01) on the image itself, minimising
``||x' - x||^2 + c * max(z_y - max_{j!=y} z_j + kappa, 0)`` per example, with no tanh change of
variables, no binary search over c, and the variable *starting from a black image* (``init=zero``).
Where the reference is accidental rather than chosen, the intended behaviour is implemented:
- the true logit is ``z_y`` (the reference takes ``max(z * onehot)``, i.e. ``max(z_y, 0)``);
- every iterate is projected onto [0,1] (the reference never clips, so its final "image" can leave
  the pixel range the model was trained on; evaluation contracts here keep attacks in [0,1]);
- ``keep=best`` returns, per example, the smallest-L2 iterate that fooled the model (the original
  CW bookkeeping); ``keep=final`` returns the last iterate, which is what the reference evaluates.
``c = 0`` returns the input unchanged, as the reference does (the objective is then the distance
alone, whose minimiser is the input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks.linf import random_start
from amata_runner.attacks.pgd import frozen_parameters, pgd_linf
from amata_runner.runtime.passes import PassCounter

CW_L2_INITS = ("zero", "input", "random")
CW_L2_KEEP = ("best", "final")


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Per example ``min(max_{j != y} z_j - z_y, kappa)``: > 0 exactly when the model is fooled."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    is_true = F.one_hot(y, logits.shape[1]).bool()
    wrong = logits.masked_fill(is_true, -torch.inf).amax(1)
    return (wrong - true).clamp(max=kappa)


def cw_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    kappa: float = 50.0,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    counter: PassCounter | None = None,
) -> torch.Tensor:
    """PGD on the CW margin: x' in the L-inf ball of radius ``eps`` around x and in [0,1]."""
    return pgd_linf(
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=steps,
        random_start=random_start,
        generator=generator,
        counter=counter,
        loss_fn=lambda logits, labels: cw_margin(logits, labels, kappa).sum(),
    )


def cw_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    c: float,
    steps: int,
    lr: float = 0.01,
    kappa: float = 0.0,
    init: str = "zero",
    keep: str = "best",
    init_radius: float = 0.0,
    generator: torch.Generator | None = None,
    counter: PassCounter | None = None,
) -> torch.Tensor:
    """BayesianDefense's CW-L2 (penalty constant ``c``, Adam, ``steps`` iterations), in [0,1].

    ``init``: ``zero`` (the reference's black start), ``input`` (x itself) or ``random``
    (x + U(-init_radius, init_radius), clipped).  ``keep``: see the module docstring.
    """
    if init not in CW_L2_INITS:
        raise ValueError(f"init must be one of {CW_L2_INITS}, got {init!r}")
    if keep not in CW_L2_KEEP:
        raise ValueError(f"keep must be one of {CW_L2_KEEP}, got {keep!r}")
    x = x.detach()
    if c == 0:
        return x.clone()
    if init == "zero":
        w = torch.zeros_like(x)
    elif init == "input":
        w = x.clone()
    else:
        w = random_start(x, init_radius, generator)
    w.requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    shape = (-1,) + (1,) * (x.dim() - 1)
    best = x.clone()
    best_dist = torch.full((x.shape[0],), torch.inf, device=x.device)

    def remember(logits: torch.Tensor, dist: torch.Tensor) -> None:
        # An iterate replaces the kept one when it fools the model at a smaller distance.
        better = (logits.argmax(1) != y) & (dist < best_dist)
        best.copy_(torch.where(better.view(shape), w.detach(), best))
        best_dist.copy_(torch.where(better, dist, best_dist))

    with frozen_parameters(model), torch.enable_grad():
        for _ in range(steps):
            logits = model(w)
            dist = (w - x).flatten(1).pow(2).sum(1)
            hinge = (-cw_margin(logits, y, torch.inf) + kappa).clamp(min=0)
            loss = (dist + c * hinge).sum()
            (w.grad,) = torch.autograd.grad(loss, w)
            remember(logits.detach(), dist.detach())
            optimizer.step()
            with torch.no_grad():
                w.clamp_(0.0, 1.0)
        with torch.no_grad():
            remember(model(w), (w - x).flatten(1).pow(2).sum(1))
    if counter is not None:
        counter.add(x.shape[0], forward=steps + 1, backward=steps)
    # ``best`` still holds the input for examples no iterate fooled, as in Carlini's original.
    return w.detach() if keep == "final" else best
