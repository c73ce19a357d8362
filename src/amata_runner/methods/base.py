"""The one interface every training method implements: train on this batch.

A method owns the inner maximisation *and* the parameter update(s), because the methods the paper
combines with Amata differ exactly there (Free replays a batch m times, YOPO updates the first layer
inside its inner loop, ATTA keeps per-example perturbations across epochs).  The engine only hands
over batches and the schedule's current control, and reads back device tensors it sums lazily.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.runtime.distributed import Dist
from amata_runner.runtime.passes import PassCounter


@dataclass
class StepOutput:
    """Device tensors (no host sync): summed training loss and correct predictions on the batch."""

    loss_sum: torch.Tensor
    correct: torch.Tensor


@dataclass
class TrainContext:
    """What a method needs from the engine.

    ``num_train`` and ``image_shape`` let methods keep per-example state (ATTA) or per-batch
    state (Free) of the right size; ``iters_per_epoch`` lets them reason about epochs.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    counter: PassCounter
    autocast: Callable[[], AbstractContextManager[Any]]
    device: torch.device
    num_train: int
    image_shape: tuple[int, int, int]
    num_classes: int
    iters_per_epoch: int
    epochs: int
    job: Dist = field(default_factory=Dist)  # torchrun ranks (world 1: a single process)
    # A fixed batch of validation images (uint8, labels) for a method's own checks (Fast's early
    # stop); None without a validation split. Never test images.
    validation_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    # The attack's precision (precision=bf16_update: fp32 attack, bf16 update); None = autocast.
    attack_autocast: Callable[[], AbstractContextManager[Any]] | None = None


class Method(ABC):
    """One training step on one batch; ``uses_control`` says whether a schedule drives it.

    ``knob`` names the key of the method's config that the schedule anneals: the schedule's K runs
    from ``schedule.k_min`` up to ``cfg.method[knob]`` (PGD's steps, Free's and YOPO's m, ATTA's
    reset period), and the plain baseline (the constant schedule) uses that value throughout.
    None: the control's K stays 1 (Fast reads only the schedule's strength).
    """

    uses_control: ClassVar[bool] = False
    knob: ClassVar[str | None] = None

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        """Train on ``batch`` (pixels in [0,1]) under ``control`` (None for unscheduled methods)."""

    def start_epoch(self, epoch: int, control: Control | None) -> None:
        """Called before each epoch (0-based), for methods with per-epoch schedules of their own."""
        del epoch, control

    def resume_epoch(self, epoch: int, control: Control | None) -> None:
        """Called instead of ``start_epoch`` when a run resumes in the middle of ``epoch``.

        The method's state already reflects the epoch's start (it is in the checkpoint), so only
        what ``start_epoch`` derives without side effects may be redone; a method whose
        ``start_epoch`` draws random numbers or resets state must override this.
        """
        self.start_epoch(epoch, control)

    def epochs(self, configured: int) -> int:
        """How many epochs to run for ``epochs=configured`` (Free divides by its replays)."""
        return configured

    def knobs(self, control: Control | None) -> dict[str, float | int]:
        """The strength knobs to record in metrics rows."""
        if control is None:
            return {}
        return {"K": control.steps, "alpha": control.step_size}

    def stop_requested(self) -> bool:
        """True ends training after the current epoch (Fast's early stop on catastrophic
        overfitting); the final evaluation and checkpoint still happen."""
        return False

    def metrics(self) -> dict[str, float]:
        """Method-specific measurements since the last call (read at evaluation points only)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State a method carries across batches (none for PGD/ERM), saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def attack_precision(self) -> AbstractContextManager[Any]:
        """The autocast context of the attack's forward/backward passes (see precision.py)."""
        attack = self.ctx.attack_autocast
        return (self.ctx.autocast if attack is None else attack)()

    def update(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """One SGD step on the mean cross-entropy of (x, y), the model in train mode."""
        model, optimizer = self.ctx.model, self.ctx.optimizer
        model.train()
        with self.ctx.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.ctx.counter.add(x.shape[0])
        n = x.shape[0]
        return StepOutput(loss.detach().float() * n, (logits.argmax(1) == y).sum())

    def pair_update(
        self,
        x: torch.Tensor,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> StepOutput:
        """One SGD step on ``loss_fn(f(x), f(x_adv), y)`` (TRADES, MART), the model in train mode.

        The clean and adversarial batches go through the network separately (BatchNorm sees each
        batch's own statistics, as in both references); accuracy is counted on ``x_adv``."""
        model, optimizer = self.ctx.model, self.ctx.optimizer
        model.train()
        with self.ctx.autocast():
            logits = model(x)
            logits_adv = model(x_adv)
            loss = loss_fn(logits.float(), logits_adv.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = x.shape[0]
        self.ctx.counter.add(n, forward=2, backward=2)
        return StepOutput(loss.detach().float() * n, (logits_adv.argmax(1) == y).sum())
