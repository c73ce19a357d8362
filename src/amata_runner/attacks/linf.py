"""The L-inf primitives every attack and training method builds on: the uniform random start, the
projection onto the eps-ball intersected with [0,1], and the signed gradient step.

Why they are written this way:
- Two forms of the same point.  Some methods carry the perturbation delta (PGD, ATTA, Free, Fast,
  the criterion's probes), others the image x' = x + delta (early-stopped PGD, YOPO, CW-L2's
  random start).  ``x + ((x + d).clamp(0, 1) - x)`` and ``(x + d).clamp(0, 1)`` are the same
  point but not the same floats, so each form keeps its own arithmetic (``random_delta`` /
  ``random_start``, ``project_delta`` / ``project``): a run is bitwise what it was before the
  primitives existed, and a resumed or re-run experiment still reproduces.
- The ball is clipped before the image box, everywhere.  x is in [0,1], so the two intervals of a
  pixel meet and the two clips give their intersection in either order; the order is fixed so the
  floats stay the ones every method has always computed.
- Randomness comes from ``generator`` when one is given and from torch's global stream otherwise
  (training methods, whose stream the engine seeds and checkpoints).  Each start is exactly one
  ``uniform_`` draw of x's size, so swapping one call site for another consumes the same numbers.
"""

from __future__ import annotations

import torch


def uniform_noise(
    x: torch.Tensor, eps: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """U(-eps, eps) shaped like x.

    A generator on another device than x (the criterion's and the landscape's CPU generators) draws
    on its own device and the noise is moved to x's, so one seed gives one start on every device.
    """
    if generator is None or generator.device == x.device:
        return torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    noise = torch.empty(x.shape, dtype=x.dtype, device=generator.device)
    return noise.uniform_(-eps, eps, generator=generator).to(x.device)


def clip_to_image(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The perturbation that keeps x + delta in [0,1] (delta's own size is not bounded here)."""
    return (x + delta).clamp_(0.0, 1.0) - x


def random_delta(
    x: torch.Tensor,
    eps: float,
    generator: torch.Generator | None = None,
    *,
    clip: bool = True,
) -> torch.Tensor:
    """A perturbation drawn uniformly from the eps-ball; with ``clip``, x + delta is in [0,1].

    ``clip=False`` is Fast's ``clamp_start=false`` (its MNIST reference feeds the raw start).
    """
    noise = uniform_noise(x, eps, generator)
    return clip_to_image(noise, x) if clip else noise


def random_start(
    x: torch.Tensor,
    eps: float,
    generator: torch.Generator | None = None,
    *,
    clip: bool = True,
) -> torch.Tensor:
    """x + U(-eps, eps), the image-form start; with ``clip``, clipped to [0,1].

    ``clip=False`` is YOPO's ``clip_start=false`` (the reference's unclipped first pass).
    """
    x_adv = x + uniform_noise(x, eps, generator)
    return x_adv.clamp_(0.0, 1.0) if clip else x_adv


def project_delta(
    delta: torch.Tensor, x: torch.Tensor, eps: float, *, clip: bool = True
) -> torch.Tensor:
    """The perturbation clipped to the eps-ball, then (with ``clip``) so that x + delta is in [0,1].

    ``clip=False`` is Free's carried state, which the references keep in the ball only (the model
    sees the clipped image); ``clamp_delta_to_image`` turns the clip on.
    """
    delta = delta.clamp(-eps, eps)
    return clip_to_image(delta, x) if clip else delta


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The image clipped into the L-inf ball of radius eps around x, then into [0,1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def signed_step(
    point: torch.Tensor, grad: torch.Tensor, step_size: float | torch.Tensor
) -> torch.Tensor:
    """point + step_size * sign(grad), unprojected; the ascent step of every L-inf attack.

    The sign is taken in ``point``'s dtype, so a low-precision gradient cannot round the step size
    (a no-op for the fp32 gradients of fp32 inputs).  A tensor ``step_size`` broadcasts per
    example: the restarts protocol passes ``moving * step_size`` to freeze fooled examples.
    """
    return point + step_size * grad.sign().to(point.dtype)
