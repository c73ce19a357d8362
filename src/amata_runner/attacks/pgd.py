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

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks.linf import project_delta, random_delta, signed_step
from amata_runner.runtime.passes import PassCounter


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


def pgd_deltas(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> Iterator[torch.Tensor]:
    """Yield delta^0 = ``start``, then each PGD perturbation delta^1 .. delta^steps (detached).

    The one L-inf PGD loop: a sign step on the summed cross-entropy (or ``loss_fn(logits, y)``),
    then the projection onto the eps-ball and [0,1].  ``forward_context`` wraps only the forward
    and the loss, for ATTA, whose attack autocasts the forward but takes the input gradient
    outside autocast (callers that autocast the whole attack wrap the loop instead).
    """
    x = x.detach()
    delta = start.detach().clone()
    yield delta
    for _ in range(steps):
        # Frozen per step, not around the loop: a caller runs between yields and may need the
        # parameters' gradients (the criterion's ``grad_sq_norm``).
        with frozen_parameters(model), torch.enable_grad():
            delta = delta.detach().requires_grad_(True)
            with forward_context():
                logits = model(x + delta)
                if loss_fn is None:
                    loss = F.cross_entropy(logits, y, reduction="sum")
                else:
                    loss = loss_fn(logits, y)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = project_delta(signed_step(delta.detach(), grad, step_size), x, eps)
        yield delta


def pgd_iterates(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield x^0 = x + start, then each PGD iterate x^1 .. x^steps (detached) of ``pgd_deltas``.

    The model's mode is used as given; its parameters are frozen during each step only.
    """
    x = x.detach()
    for delta in pgd_deltas(
        model, x, y, start, eps=eps, step_size=step_size, steps=steps, loss_fn=loss_fn
    ):
        yield (x + delta).detach()


def last(iterates: Iterable[torch.Tensor]) -> torch.Tensor:
    """The final item of a non-empty iteration, without keeping the ones before it."""
    tail = deque(iterates, maxlen=1)
    if not tail:
        raise ValueError("no iterates")
    return tail[0]


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

    The last iterate of :func:`pgd_iterates` from the start chosen here.  The loss is the summed
    cross-entropy unless ``loss_fn(logits, y)`` (a scalar) replaces it (CW-inf ascends the CW
    margin with the same steps; TRADES ascends a KL divergence, passing the clean probabilities
    as ``y``).

    Start: x + U(-eps, eps) (or x itself), clipped to [0,1]; with ``start_std``, x + N(0,
    start_std^2) unclipped, as TRADES and MART start (0.001).  The model's mode is used as given
    (see ``attack_mode``); parameters are frozen inside.  ``generator`` makes the random start
    reproducible (evaluation).
    """
    x = x.detach()
    if start_std is not None:
        start = start_std * torch.randn(
            x.shape, dtype=x.dtype, device=x.device, generator=generator
        )
    elif random_start:
        start = random_delta(x, eps, generator)
    else:
        start = torch.zeros_like(x)
    # The iterates' deltas, not the iterates: x + delta is formed once, for the last one only.
    # Frozen for the whole attack (nothing runs between steps here), not only for each step.
    with frozen_parameters(model):
        delta = last(
            pgd_deltas(
                model, x, y, start, eps=eps, step_size=step_size, steps=steps, loss_fn=loss_fn
            )
        )
    if counter is not None:
        counter.add(x.shape[0], forward=steps, backward=steps)
    return (x + delta).detach()
