"""L-inf projected gradient descent (Madry et al.), the inner loop of PGD and Amata training.

Why it is written this way:
- Only the input gradient is needed, so the parameters are frozen while the attack runs and the
  gradient is taken with ``torch.autograd.grad`` w.r.t. the perturbation alone: no parameter
  gradients are formed or accumulated (and none leak into the next optimiser step).
- The loss is the *summed* cross-entropy: ``sign()`` does not care about scale, and a mean over a
  large batch makes per-pixel gradients small enough to underflow under bf16 autocast.
- No ``.item()`` or Python branching on device values: the K steps queue up without a host sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.passes import PassCounter


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Switch parameter gradients off for the duration (restoring each flag afterwards)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def attack_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Run the attack with BatchNorm/Dropout in ``eval`` or ``train`` mode, then restore the mode.

    eval mode (YOPO's PGD baseline, FAT, ATTA, TRADES) leaves BN running statistics untouched by
    the K attack forwards; train mode (Madry, locuslab) uses and updates batch statistics.
    """
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    was_training = model.training
    model.train(bn_mode == "train")
    try:
        yield
    finally:
        model.train(was_training)


def uniform_delta(
    x: torch.Tensor, eps: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A perturbation drawn uniformly from the eps-ball, clipped so that x + delta is in [0,1]."""
    delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    return (x + delta).clamp_(0.0, 1.0) - x


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    counter: PassCounter | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    start_std: float | None = None,
) -> torch.Tensor:
    """Return x' with ||x' - x||_inf <= eps and x' in [0,1] that (approximately) maximises the loss.

    The loss is the summed cross-entropy unless ``loss_fn(logits, y)`` (a scalar) replaces it
    (CW-inf ascends the CW margin with the same steps; TRADES ascends a KL divergence, passing the
    clean probabilities as ``y``).

    Start: x + U(-eps, eps) (or x itself), clipped to [0,1]; with ``start_std``, x + N(0,
    start_std^2) unclipped, as TRADES and MART start (0.001).  Step: x' <- clip_[0,1](clip_ball(
    x' + step_size * sign(grad_x' CE))).  The model's mode is used as given (see ``attack_mode``);
    parameters are frozen inside.  ``generator`` makes the random start reproducible (evaluation).
    """
    x = x.detach()
    if start_std is not None:
        delta = start_std * torch.randn(
            x.shape, dtype=x.dtype, device=x.device, generator=generator
        )
    elif random_start:
        delta = uniform_delta(x, eps, generator)
    else:
        delta = torch.zeros_like(x)
    with frozen_parameters(model), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            if loss_fn is None:
                loss = F.cross_entropy(logits, y, reduction="sum")
            else:
                loss = loss_fn(logits, y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + step_size * grad.sign()).clamp_(-eps, eps)
            delta = (x + delta).clamp_(0.0, 1.0) - x
    if counter is not None:
        counter.add(x.shape[0], forward=steps, backward=steps)
    return (x + delta).detach()
