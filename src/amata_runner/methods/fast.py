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
  one step (so it has no ``method.steps``; the schedule's K stays 1), and the schedule's control is
  read only for its ``strength``.  ``step_size: null`` means ``step_ratio * eps``; the config check
  writes the number back, so the run's resolved config records the step actually taken.
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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from amata_runner.attacks.linf import clip_to_image, project_delta, random_delta, signed_step
from amata_runner.attacks.pgd import attack_mode, frozen_parameters, pgd_linf
from amata_runner.checks import ATTACK_BN_MODES, at_least, one_of, positive_budget, require
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.methods.registry import register_method


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


@dataclass
class FastConfig:
    """FGSM from a uniform random start, alpha = 1.25 eps (Wong, Rice & Kolter, ICLR 2020)."""

    name: str = "fast"
    # L-inf radius, from the dataset's threat model (CIFAR10 8/255, MNIST 0.3)
    eps: Any = "${dataset.threat.eps}"
    # the FGSM step alpha; None: step_ratio * eps, i.e. 1.25 eps (10/255 at 8/255), the paper's
    # and the code's alpha (the check stores the number).  A number (or a fraction) overrides it.
    step_size: Any = None
    step_ratio: float = 1.25
    # clip the random start so that x + delta lies in [0,1] before the gradient, as the CIFAR10
    # code does (its MNIST script does not)
    clamp_start: bool = True
    # BatchNorm mode of the FGSM step and of the early-stop check; train, as the reference (the
    # model is never put in eval mode while training)
    attack_bn: str = "train"
    # Amata+Fast's fixed non-random start (used while the schedule's strength < 1), as a fraction
    # of eps on every pixel.  Ours (the paper gives no value): 0.5 ends the FGSM step at +eps /
    # -0.75 eps per pixel around one fixed point; <= 0.25 would be full-strength FGSM.
    weak_init: float = 0.5
    # the reference's --early-stop (off by default there): after each epoch, PGD-5 of
    # early_stop_step_size on a fixed batch of the validation split (the epoch's first training
    # batch, as the reference, when eval.validation.size=0; train-mode BN, its statistics put back
    # after the check on held-out images); if its robust accuracy fell by more than
    # early_stop_drop (absolute) since the previous epoch, the previous epoch's weights are put
    # back and training ends (catastrophic overfitting).
    early_stop: bool = False
    early_stop_steps: int = 5  # reference: 5
    early_stop_step_size: Any = "${dataset.threat.step_size}"  # reference: 2/255 on CIFAR10
    early_stop_drop: float = 0.2  # reference: 0.2

    @staticmethod
    def normalise(cfg: DictConfig) -> None:
        """``step_size: null`` becomes ``step_ratio * eps``, so the saved config records the step
        actually taken."""
        m = cfg.method
        if m.step_size is None:
            OmegaConf.update(cfg, "method.step_size", float(m.step_ratio) * float(m.eps))

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Budgets positive, the fixed start non-zero, the early-stop settings in range."""
        positive_budget(cfg, "method.eps", upper=1.0)
        m = cfg.method
        require(m.step_ratio > 0, "method.step_ratio", m.step_ratio, "must be > 0")
        positive_budget(cfg, "method.step_size")
        one_of(cfg, "method.attack_bn", ATTACK_BN_MODES)
        require(
            m.weak_init != 0 and -1 <= m.weak_init <= 1,
            "method.weak_init",
            m.weak_init,
            "must be non-zero and in [-1, 1] (a fraction of eps)",
        )
        at_least(cfg, "method.early_stop_steps", 1)
        positive_budget(cfg, "method.early_stop_step_size")
        require(
            0 < m.early_stop_drop <= 1,
            "method.early_stop_drop",
            m.early_stop_drop,
            "must be in (0, 1] (an absolute drop in robust accuracy)",
        )


@register_method("fast", FastConfig, annealed="amata_fast")
class Fast(Method):
    uses_control = True

    def __init__(self, ctx: TrainContext, cfg: FastConfig) -> None:
        super().__init__(ctx)
        self.cfg = cfg
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
        cfg = self.cfg
        if not weak:
            return random_delta(x, cfg.eps, clip=cfg.clamp_start)
        delta = torch.full_like(x, cfg.weak_init * cfg.eps)
        return clip_to_image(delta, x) if cfg.clamp_start else delta

    # ------------------------------------------------------------------ hooks
    def knobs(self, control: Control | None) -> dict[str, float | int]:
        return {"alpha": self.cfg.step_size, "weak_start": int(self.is_weak(control))}

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
        batch = self._check_batch() if self.cfg.early_stop else None
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
        if accuracy - self.prev_robust_acc < -self.cfg.early_stop_drop:
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
        if not self.cfg.early_stop:
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
        if not self.cfg.early_stop or "prev_robust_acc" not in state:
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
        if self.cfg.early_stop and self._epoch_started and self.ctx.validation_batch is None:
            self._first_batch = (x, y)  # no validation split: the reference's first batch
        self._epoch_started = False
        self._in_epoch = True
        x_adv = x + self.perturb(x, y, self.start(x, self.is_weak(control)))
        return self.update(x_adv, y)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """One FGSM step of step_size from ``start``, projected: the training perturbation."""
        model = self.ctx.model
        with attack_mode(model, self.cfg.attack_bn), self.attack_precision():
            stepped = fgsm_delta(model, x, y, start, self.cfg.step_size)
        self.ctx.counter.add(x.shape[0])
        return project_delta(stepped, x, self.cfg.eps)

    def batch_robust_accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """PGD robust accuracy on one batch, in the training BN mode (one host sync)."""
        model, cfg = self.ctx.model, self.cfg
        with attack_mode(model, cfg.attack_bn), self.attack_precision():
            x_adv = pgd_linf(
                model,
                x,
                y,
                eps=cfg.eps,
                step_size=cfg.early_stop_step_size,
                steps=cfg.early_stop_steps,
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
