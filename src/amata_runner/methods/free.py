"""Free adversarial training (Shafahi et al., NeurIPS 2019) and Amata+Free (paper Section 3.2).

    delta <- 0                        (one tensor of a batch's shape, made once, never reset)
    for epoch = 1 .. ceil(E / m):     (the replays already revisit every batch m times)
        for each mini-batch (x, y):
            repeat m times:
                L <- CE(h_theta(clip_[0,1](x + delta)), y)
                g_theta, g_delta <- grad L           (ONE backward gives both gradients)
                theta <- theta - eta * g_theta       (the step uses the gradient at the old delta)
                delta <- clip_[-eps,eps](delta + alpha * sign(g_delta))

The perturbation is carried from replay to replay, from batch to batch and from epoch to epoch: the
first replay of a batch starts from where the previous batch left delta.  Each replay is one
forward and one backward of the batch, so Free-m costs what PGD-(m-1) costs per batch but makes m
parameter updates.

Choices, all from the reference implementations (docs/methods.md, Free):

- m is ``method.steps`` and comes from the schedule's control (constant: Free-m; ``amata_free``:
  m rises from 2 to 4).  alpha is the control's step size, tau / m; under the constant schedule that
  is ``method.step_size``, which defaults to eps as in every Free repository (fgsm_step = eps).
  Amata+Free sets tau = 4 eps, so alpha halves from 2 eps (m = 2) to eps (m = 4), the paper's
  "increase m from 2 to 4 and decrease the PGD step size also by two times".
- BatchNorm stays in train mode throughout (every Free implementation does; there is no separate
  attack pass whose mode could differ).
- delta is clipped to the eps-ball only and the model sees clip_[0,1](x + delta), as in the PyTorch
  repository the paper ran (mahyarnajibi) and the TF original.  ``clamp_delta_to_image=true`` also
  keeps x + delta inside [0,1] in the carried state, as locuslab's port does.
- The state has the shape of the first (full) batch.  A smaller batch (the last of an epoch) uses
  and updates only the first B rows and the others keep their values, as the reference's
  ``noise[:B]`` does; a larger batch than any before grows the state with zeros.
- ``epochs(E)`` is ceil(E / m) when ``divide_epochs`` is on (the references' rule, default); the
  paper ran Amata+Free for a fixed 22 epochs, so ``amata_free`` turns it off.  m here is the
  configured ``method.steps``, not the annealed one.
- The training loss and accuracy reported for a batch are those of its last replay.

Pass counting: each replay adds 1 forward and 1 backward per example (the backward through the
whole network yields the parameter and the input gradient together).  No host syncs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from amata_runner.attacks.linf import project_delta, signed_step
from amata_runner.checks import check_attack
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.methods.registry import register_method


@dataclass
class FreeConfig:
    """Free-m (Shafahi et al. 2019): m replays per batch, one backward each, a carried delta."""

    name: str = "free"
    # L-inf radius of the carried perturbation, from the dataset's threat model
    eps: Any = "${dataset.threat.eps}"
    # m, the replays of each mini-batch (the schedule's integer knob K). 4 is the Free run the Amata
    # paper compares with on ImageNet (mahyarnajibi/FreeAdversarialTraining, n_repeats 4); the TF
    # CIFAR original and locuslab's port use 8.
    steps: int = 4
    # alpha, the sign step of the perturbation per replay; eps in every Free repository
    # (fgsm_step = eps). Under a schedule alpha = tau / m with tau = step_size * k_max by default.
    step_size: Any = "${method.eps}"
    # run ceil(epochs / m) epochs, as the references do (ImageNet: ceil(90 / 4) = 23)
    divide_epochs: bool = True
    # also keep x + delta in [0,1] in the carried state (locuslab's port); false clips delta to the
    # eps-ball only and clamps the model input, as the PyTorch repository the paper ran and the TF
    # original do
    clamp_delta_to_image: bool = False

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Budgets positive (fractions such as 8/255 resolved to floats), m >= 1."""
        check_attack(cfg, attack_bn=False)


@register_method("free", FreeConfig, annealed="amata_free")
class Free(Method):
    uses_control = True
    knob = "steps"  # m: the schedule anneals the replays

    def __init__(self, ctx: TrainContext, cfg: FreeConfig) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        self.delta: torch.Tensor | None = None  # the carried perturbation, fp32, batch-shaped

    # ------------------------------------------------------------------ hooks
    def epochs(self, configured: int) -> int:
        """ceil(E / m): the m replays already make each epoch m passes over the data."""
        if not self.cfg.divide_epochs:
            return configured
        return max(1, math.ceil(configured / self.cfg.steps))  # the configured m, not the annealed

    def knobs(self, control: Control | None) -> dict[str, float | int]:
        if control is None:
            return {}
        return {"m": control.steps, "alpha": control.step_size}

    def state_dict(self) -> dict[str, Any]:
        """The carried perturbation, so a resumed run starts the next batch where this one ended."""
        return {} if self.delta is None else {"delta": self.delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        delta = state.get("delta")
        self.delta = None if delta is None else delta.to(self.ctx.device, torch.float32)

    # ------------------------------------------------------------------ training
    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        if control is None:
            raise ValueError("Free needs a control (m, alpha) from a schedule")
        out: StepOutput | None = None
        for _ in range(control.steps):
            out = self.replay(batch.x, batch.y, control.step_size)
        assert out is not None  # control.steps >= 1 (checked with the config)
        return out

    def replay(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> StepOutput:
        """One forward and one backward at x + delta: an SGD step on theta, a sign step on delta."""
        model, optimizer = self.ctx.model, self.ctx.optimizer
        model.train()
        b = x.shape[0]
        delta = self.perturbation(x).clone().requires_grad_(True)
        with self.ctx.autocast():
            logits = model((x + delta).clamp(0.0, 1.0))
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.ctx.counter.add(b)
        self._advance(x, delta.detach(), delta.grad, alpha)
        return StepOutput(loss.detach().float() * b, (logits.argmax(1) == y).sum())

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """The carried delta's first B rows for a batch like ``x`` (made or grown as needed)."""
        b = x.shape[0]
        if self.delta is None or self.delta.shape[0] < b or self.delta.shape[1:] != x.shape[1:]:
            grown = torch.zeros((b, *x.shape[1:]), device=x.device, dtype=torch.float32)
            if self.delta is not None and self.delta.shape[1:] == x.shape[1:]:
                grown[: self.delta.shape[0]] = self.delta
            self.delta = grown
        return self.delta[:b]

    def _advance(
        self, x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor | None, alpha: float
    ) -> None:
        """delta <- clip_eps(delta + alpha sign(g)) on the batch's rows of the carried state."""
        if grad is None:  # the input did not reach the loss (cannot happen with a real model)
            return
        new = project_delta(
            signed_step(delta, grad, alpha), x, self.cfg.eps, clip=self.cfg.clamp_delta_to_image
        )
        assert self.delta is not None
        self.delta[: x.shape[0]] = new
