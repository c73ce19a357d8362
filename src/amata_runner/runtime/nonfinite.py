"""What a NaN or Inf loss does to a run: ``nonfinite=stop`` (default) or ``nonfinite=skip``.

stop: every batch's loss is folded into one on-device "all finite" flag (no host sync per batch);
the flag is read at each evaluation point and before each checkpoint, and a non-finite value stops
the run there with a clear message, *before* anything poisoned is written, so the last good
checkpoint stays the one to resume from (with a smaller learning rate, say).

skip: the optimiser refuses any step whose gradients are not all finite and counts it (the count is
in metrics rows and summary.json). Deciding per step needs one host sync per optimiser step, which
is why it is not the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from amata_runner.runtime.distributed import Dist


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf (``nonfinite=stop``)."""


class GuardedSGD(torch.optim.SGD):
    """SGD that, with ``skip_nonfinite``, drops a step whose gradients hold a NaN or Inf.

    Under ``torchrun`` (``job.enabled``) it is also where data parallelism happens: gradients are
    averaged over ranks before the step and ``module``'s buffers broadcast from rank 0 after it
    (see distributed.py for why not DDP's wrapper).
    """

    def __init__(
        self,
        params: Any,
        *,
        skip_nonfinite: bool = False,
        job: Dist | None = None,
        module: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, **kwargs)
        self.skip_nonfinite = skip_nonfinite
        self.skipped = 0
        self.attempted = 0  # steps asked for (taken + skipped)
        self.job = job or Dist()
        self.module = module

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all().item())

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        if self.job.enabled:
            self.job.average_gradients([p for g in self.param_groups for p in g["params"]])
        self.attempted += 1
        if self.skip_nonfinite and not self._grads_finite():  # averaged: every rank agrees
            self.skipped += 1
            self.zero_grad(set_to_none=True)
            return None
        result = super().step(closure)
        if self.job.enabled and self.module is not None:
            self.job.broadcast_module(self.module, parameters=False)
        return result
