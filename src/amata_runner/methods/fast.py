"""Fast adversarial training, FGSM-RS (Wong, Rice & Kolter, ICLR 2020), and Amata+Fast (Sec. 3.2).

    for each mini-batch (x, y):
        delta <- U(-eps, eps)^d            the original: a uniform random start in the eps-ball
              |  c * eps * 1               Amata+Fast's weak phase (strength < 1): a FIXED start
        delta <- clip_[0,1](x + delta) - x
        delta <- delta + alpha * sign(grad_delta CE(h(x + delta), y))         alpha = 1.25 eps
        delta <- clip_[0,1](x + clip_[-eps,eps](delta)) - x
        theta <- theta - eta_i * grad_theta CE(h(x + delta), y)     eta_i: cyclic, per iteration
    after each epoch (early_stop only): PGD-5 on a check batch; if its robust accuracy fell by more
    than 0.2 since the previous epoch, put back the previous epoch's weights and stop.

The cyclic learning rate (0 -> optim.lr -> 0 over the run, stepped every iteration) is the
engine's ``optim.lr_schedule=cyclic``, set by ``conf/method/fast.yaml``.

Choices (docs/methods.md, Fast; locuslab/fast_adversarial ``CIFAR10/train_fgsm.py``, the code
the Amata paper ran Amata+Fast with):

- BatchNorm in train mode for the FGSM step and the early-stop check (``attack_bn``): the
  reference never puts the model in eval mode while training.
- ``clamp_start`` (default on): the random start is clipped so x + delta lies in [0,1] before the
  gradient, as the CIFAR code does (its MNIST script does not; the paper's algorithm box is silent
  on the image box).
- The step is ``method.step_size`` (1.25 eps unless set), never the schedule's: Fast always takes
  one step, and the schedule's control is read only for its ``strength``.
- Amata+Fast's weak phase (``strength < 1``, the first ``schedule.switch`` epochs of
  ``amata_fast``): delta starts at the fixed, non-random ``weak_init * eps`` on every pixel
  (default 0.5).  After the alpha = 1.25 eps step and the projection a pixel ends at +eps where
  the gradient sign is + and at (weak_init - 1.25) eps = -0.75 eps where it is -, around one fixed
  point instead of a random one: a weaker attack.  weak_init <= 0.25 would give the full-strength
  zero-start FGSM, 1 the weakest (-0.25 eps).  The paper names no value; this is ours.
- Early stop (``early_stop``, off by default as in the reference): the reference's rule,
  PGD-``early_stop_steps`` of ``early_stop_step_size`` with a random start on a check batch,
  robust accuracy compared with the previous epoch's (0 before the first). The check batch is a
  fixed batch of the validation split (``TrainContext.validation_batch``: held-out training
  images, never test images; the same images every epoch, so the comparison is not blurred by
  batch-to-batch noise); without a validation split (``eval.validation.size=0``) it is the epoch's
  first training batch, as in the reference. On a
  drop of more than ``early_stop_drop`` the weights kept at the end of the last good epoch are
  loaded back and ``stop_requested`` ends the run.  The check reads one number to the host per
  epoch (unavoidable: training stops on it); it is training work, so the engine runs it on the
  train clock and its seconds are in ``train_seconds`` (and its passes are counted).

Pass counting, per example: FGSM step 1 forward + 1 backward (input gradient only, parameters
frozen); update 1 forward + 1 backward; the early-stop check (one batch per epoch, when on)
K forwards + K backwards for its PGD and 1 forward for the accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from amata_runner.attacks.linf import clip_to_image, project_delta, random_delta, signed_step
from amata_runner.attacks.pgd import attack_mode, frozen_parameters, pgd_linf
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method, StepOutput, TrainContext


def fgsm_delta(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, step_size: float
) -> torch.Tensor:
    """start + step_size * sign(grad_delta CE(model(x + delta), y)) at delta = start, unprojected.

    Input gradient only (parameters frozen); the model's mode and precision are the caller's.
    """
    with frozen_parameters(model), torch.enable_grad():
        delta = start.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")  # sum: sign ignores scale
        (grad,) = torch.autograd.grad(loss, delta)
    return signed_step(start.detach(), grad, step_size)


class Fast(Method):
    uses_control = True

    def __init__(
        self,
        ctx: TrainContext,
        *,
        eps: float,
        step_size: float,
        clamp_start: bool = True,
        attack_bn: str = "train",
        weak_init: float = 0.5,
        early_stop: bool = False,
        early_stop_steps: int = 5,
        early_stop_step_size: float = 2 / 255,
        early_stop_drop: float = 0.2,
    ) -> None:
        super().__init__(ctx)
        self.eps = eps
        self.step_size = step_size
        self.clamp_start = clamp_start
        self.attack_bn = attack_bn
        self.weak_init = weak_init
        self.early_stop = early_stop
        self.early_stop_steps = early_stop_steps
        self.early_stop_step_size = early_stop_step_size
        self.early_stop_drop = early_stop_drop
        self.prev_robust_acc = 0.0  # the reference starts from 0, so epoch 1 never stops
        self._first_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kept: dict[str, torch.Tensor] | None = None  # weights after the last good epoch
        self._checked: float | None = None  # the last check's accuracy, for metrics()
        self._epoch_started = True
        self._in_epoch = False  # a batch of the current epoch was trained, its check not yet run

    # ------------------------------------------------------------------ the start
    @staticmethod
    def is_weak(control: Control | None) -> bool:
        """Amata+Fast's weak phase: the schedule is below full strength."""
        return control is not None and control.strength < 1.0

    def start(self, x: torch.Tensor, weak: bool) -> torch.Tensor:
        """The FGSM start: uniform in the eps-ball, or the fixed weak_init * eps when weak."""
        if not weak:
            return random_delta(x, self.eps, clip=self.clamp_start)
        delta = torch.full_like(x, self.weak_init * self.eps)
        return clip_to_image(delta, x) if self.clamp_start else delta

    # ------------------------------------------------------------------ hooks
    def knobs(self, control: Control | None) -> dict[str, float | int]:
        return {"alpha": self.step_size, "weak_start": int(self.is_weak(control))}

    def start_epoch(self, epoch: int, control: Control | None) -> None:
        del epoch, control
        self._epoch_started = True

    def metrics(self) -> dict[str, float]:
        if self._checked is None:
            return {}
        checked, self._checked = self._checked, None
        return {"early_stop_robust_acc": checked}

    def _check_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch this epoch's check runs on: the validation batch (pixels to [0,1]), or the
        epoch's first training batch without a validation split; None before any batch."""
        if not self._in_epoch:
            return None
        held = self.ctx.validation_batch
        if held is None:
            return self._first_batch
        images, labels = held
        return images.float().div(255.0), labels

    def stop_requested(self) -> bool:
        """The reference's early stop: True (weights restored) when robust accuracy collapsed."""
        batch = self._check_batch() if self.early_stop else None
        if batch is None:
            return False
        # Under torchrun every rank checks its own share of the batch; the mean makes them agree.
        # Held-out images must not shape the model they judge: in train-mode BatchNorm the check's
        # forwards would fold them into the running statistics, so those are put back after it.
        held_out = self.ctx.validation_batch is not None
        with _buffers_kept(self.ctx.model) if held_out else nullcontext():
            local = self.batch_robust_accuracy(*batch)
        accuracy = self.ctx.job.mean(local, self.ctx.device)
        self._first_batch = None
        self._in_epoch = False
        self._checked = accuracy
        if accuracy - self.prev_robust_acc < -self.early_stop_drop:
            if self._kept is not None:
                self.ctx.model.load_state_dict(self._kept)
            return True
        self.prev_robust_acc = accuracy
        self._kept = _snapshot(self.ctx.model)
        return False

    def resume_epoch(self, epoch: int, control: Control | None) -> None:
        """Mid-epoch: the epoch's first batch is already in the restored state; keep it."""
        del epoch, control

    def state_dict(self) -> dict[str, Any]:
        """The previous epoch's check; mid-epoch also the kept weights (and the batch to check,
        when it is the epoch's first training batch).

        At an epoch end the kept weights are the checkpoint's own model; inside an epoch the model
        has moved on, so they (and the epoch's first batch) are saved explicitly.
        """
        if not self.early_stop:
            return {}
        state: dict[str, Any] = {"prev_robust_acc": float(self.prev_robust_acc)}
        if self._in_epoch:
            state["mid_epoch"] = True
            if self._first_batch is not None:
                state["first_batch"] = list(self._first_batch)
            if self._kept is not None:
                state["kept"] = self._kept
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The engine loads the model before the method; an epoch-end checkpoint is written after
        # the check, so the model then holds exactly the weights the check kept.
        if not self.early_stop or "prev_robust_acc" not in state:
            return
        self.prev_robust_acc = float(state["prev_robust_acc"])
        if state.get("mid_epoch", "first_batch" in state):
            if "first_batch" in state:
                x, y = state["first_batch"]
                self._first_batch = (x.to(self.ctx.device), y.to(self.ctx.device))
            self._epoch_started = False
            self._in_epoch = True
            kept = state.get("kept")
            self._kept = None if kept is None else {k: v.clone() for k, v in kept.items()}
        else:
            self._kept = _snapshot(self.ctx.model)

    # ------------------------------------------------------------------ training
    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        x, y = batch.x, batch.y
        if self.early_stop and self._epoch_started and self.ctx.validation_batch is None:
            self._first_batch = (x, y)  # no validation split: the reference's first batch
        self._epoch_started = False
        self._in_epoch = True
        x_adv = x + self.perturb(x, y, self.start(x, self.is_weak(control)))
        return self.update(x_adv, y)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """One FGSM step of step_size from ``start``, projected: the training perturbation."""
        model = self.ctx.model
        with attack_mode(model, self.attack_bn), self.attack_precision():
            stepped = fgsm_delta(model, x, y, start, self.step_size)
        self.ctx.counter.add(x.shape[0])
        return project_delta(stepped, x, self.eps)

    def batch_robust_accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """PGD robust accuracy on one batch, in the training BN mode (one host sync)."""
        model = self.ctx.model
        with attack_mode(model, self.attack_bn), self.attack_precision():
            x_adv = pgd_linf(
                model,
                x,
                y,
                eps=self.eps,
                step_size=self.early_stop_step_size,
                steps=self.early_stop_steps,
                random_start=True,
                counter=self.ctx.counter,
            )
            with torch.no_grad():
                correct = (model(x_adv).argmax(1) == y).sum()
        self.ctx.counter.add(x.shape[0], forward=1, backward=0)
        return correct.item() / x.shape[0]


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics and counters) when the block ends."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build(cfg: DictConfig, ctx: TrainContext) -> Fast:
    return Fast(
        ctx,
        eps=float(cfg.eps),
        step_size=float(cfg.step_size),
        clamp_start=bool(cfg.clamp_start),
        attack_bn=str(cfg.attack_bn),
        weak_init=float(cfg.weak_init),
        early_stop=bool(cfg.early_stop),
        early_stop_steps=int(cfg.early_stop_steps),
        early_stop_step_size=float(cfg.early_stop_step_size),
        early_stop_drop=float(cfg.early_stop_drop),
    )
