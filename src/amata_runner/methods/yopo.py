"""YOPO-m-n, "You Only Propagate Once" (Zhang et al., NeurIPS 2019), and Amata+YOPO (Section 3.2).

The network is split at its first layer: z = f0(x; theta_0) is ``model.layer_one`` (after
``model.normalize`` when the model is ``Normalized``), logits = g(z; theta_rest) is
``model.forward_from_layer_one``.  Per mini-batch (x, y), with the model in train mode throughout
(as in the reference code, so BatchNorm uses batch statistics and Dropout is on):

    x' <- x + U(-eps, eps), clipped to [0, 1]
    U <- 0 (gradients of theta_rest),  V <- 0 (gradients of theta_0)
    for j = 1..m:                                        m = method.steps (Amata anneals it: K)
        one full forward/backward at x':  L = mean CE(g(f0(x')), y)
            U <- U + grad_{theta_rest} L                 the CE gradient of the adversarial batch
            p <- -dL/dz                                  the costate of layer one, then frozen
        for s = 1..n:                                    n = method.inner_steps
            H(x') = sum p * f0(x')                       through layer one only
            x' <- clip_[0,1](clip_{x,eps}(x' - sigma * sign(dH/dx')))
        V <- V - grad_{theta_0} H(x')                    layer one's update, through H only
    theta_rest <- theta_rest - lr * U;  theta_0 <- theta_0 - lr * V   (lr = optim.lr / lr_divisor)

Since p = -dL/dz, ``-sign(dH/dx')`` is the sign of the input gradient of the loss linearised at
layer one's output (an ascent step), and ``-grad_{theta_0} H`` is layer one's share of the CE
gradient with the costate frozen from the last full pass; at the x' of that pass it *is* layer
one's CE gradient.  x' carries over from one repeat to the next (the CE of repeat j sees the
perturbation of the inner loop j - 1) but not across mini-batches.  Under a schedule, m = K_t and
sigma = tau / K_t (``control``): Amata+YOPO raises K and lowers sigma (``method=amata_yopo``).
The defaults (``YOPOConfig``) are YOPO-5-10, the reference's MNIST setting; its CIFAR10 setting
YOPO-5-3 is ``method.inner_steps=3`` (eps and sigma follow the dataset's threat model, which is
already the reference's on both).

Choices where the reference code (a1600012888/YOPO-You-Only-Propagate-Once) deviates from the
paper, or depends on details outside the algorithm, each a config key (see docs/methods.md, YOPO):

- ``layer_one_ce`` (default ``none``): does layer one *also* get the CE gradient of the m full
  passes?  The paper updates it only through the Hamiltonian (``none``).  The CIFAR code adds all
  m CE gradients (``all``; also what the MNIST code did under PyTorch 1.0, which the Amata paper
  ran); the MNIST code under PyTorch >= 2 drops only the first repeat's (``after_first``).
- ``clip_start`` (default true): the paper's perturbation lives in the image domain; the
  reference feeds the unclipped random start x + U(-eps, eps) to the first full pass.
- ``lr_divisor`` (default m = ``method.steps``): U and V are *sums* over the m repeats, as in the
  paper's algorithm and the code, and the code compensates with lr = base_lr / K, K fixed in its
  config.  The optimiser therefore steps with ``optim.lr / lr_divisor`` (the learning rate is
  scaled around the step, so weight decay and momentum act exactly as in the code); Amata keeps
  the divisor at K_max while K_t anneals, as the Amata code's fixed config does.
  The reference's base LRs differ from the PGD recipes in both directions (MNIST 0.01 vs 0.1,
  after a collapse at 0.1; CIFAR10 0.2 vs 0.05), so no rule derives them: set ``optim.lr``.
- ``layer_one_milestones`` (default null): the reference steps layer one with a second SGD of the
  same lr, momentum and weight decay; with equal LR schedules that is the engine's optimiser, so
  by default layer one is an ordinary parameter of it.  The MNIST code's layer-one milestones
  [15, 19] (x0.1) are a leftover of a 20-epoch config; setting them here builds that second
  optimiser (its state is in ``state_dict``) and layer one then ignores ``optim.lr_schedule``.
- Not reproduced: the code's extra no-grad forward after the last repeat (monitoring only);
  the reported training loss is that of the last full pass.  Its epoch off-by-one (N + 1 epochs)
  is the run key ``epochs``.

Pass counting.  ``ctx.counter`` counts whole-network passes so that methods compare: each repeat's
full forward adds 1 forward per example and its full backward 1 backward per example (whether or
not that backward continues into layer one's weights), so m of each per example and batch.  The
layer-one-only passes cost a network-dependent fraction of a full pass (one convolution), so they
are counted separately, cumulatively, and reported by ``metrics()`` as
``layer_one_forward_passes`` / ``layer_one_backward_passes``: each inner step is one layer-one
forward and one layer-one backward (input gradient), and each Hamiltonian weight gradient one more
of each, so m * (n + 1) of each per example and batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from amata_runner.attacks.linf import project, random_start, signed_step
from amata_runner.attacks.pgd import frozen_parameters
from amata_runner.checks import at_least, check_attack, one_of, require
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.methods.registry import register_method

# Which of the m full backward passes also put their cross-entropy gradient into layer one.
LAYER_ONE_CE = ("none", "all", "after_first")
LAYER_ONE_GAMMA = 0.1  # the reference's MultiStepLR factor for its layer-one optimiser


@contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, divisor: float) -> Iterator[None]:
    """Step with lr / divisor, then put back the exact lr the engine's LR schedule set."""
    saved = [group["lr"] for group in optimizer.param_groups]
    if divisor != 1:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] / divisor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            group["lr"] = lr


@dataclass
class YOPOConfig:
    """YOPO-m-n (Zhang et al. 2019); the defaults are YOPO-5-10, the reference's MNIST setting."""

    name: str = "yopo"
    # L-inf radius; the reference's 0.3 (MNIST) and 8/255 (CIFAR10) are the threat model's
    eps: Any = "${dataset.threat.eps}"
    # m (Amata's K): outer repeats per mini-batch, a full forward/backward each; 5 in both settings
    steps: int = 5
    # n: first-layer-only perturbation updates per repeat; 10 (MNIST YOPO-5-10), 3 (CIFAR YOPO-5-3)
    inner_steps: int = 10
    # sigma: the inner sign step; 0.01 (MNIST) and 2/255 (CIFAR10) = the threat model's PGD step
    step_size: Any = "${dataset.threat.step_size}"
    # Which of the m full backwards also give layer one their CE gradient: none = the paper (layer
    # one learns only through the Hamiltonian); all = the CIFAR code (and the MNIST code under
    # PyTorch 1.0, which the Amata paper used); after_first = the MNIST code under PyTorch >= 2
    layer_one_ce: str = "none"
    # true: the random start x + U(-eps, eps) is clipped to [0,1] (the image domain of the paper);
    # false: the reference's unclipped start for the first full pass
    clip_start: bool = True
    # The optimiser steps with optim.lr / lr_divisor on the gradients *summed* over the m repeats,
    # as the reference (lr = base_lr / K, K from its config).  Amata+YOPO keeps it at K_max.
    lr_divisor: int = "${method.steps}"  # type: ignore[assignment]
    # None: layer one is stepped by the run's optimiser and LR schedule (equal to the reference's
    # separate layer-one SGD when the schedules agree, as on CIFAR10); a list, e.g. [15,19] (the
    # MNIST code's leftover): a separate layer-one SGD whose lr drops x0.1 at those epochs
    layer_one_milestones: list[int] | None = None

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Budgets positive (fractions such as 8/255 resolved to floats), m, n, divisor >= 1."""
        check_attack(cfg, attack_bn=False)
        at_least(cfg, "method.inner_steps", 1)
        at_least(cfg, "method.lr_divisor", 1)
        one_of(cfg, "method.layer_one_ce", LAYER_ONE_CE)
        milestones = OmegaConf.select(cfg, "method.layer_one_milestones")
        if milestones is not None:
            values = list(milestones)
            require(
                all(m > 0 for m in values) and values == sorted(set(values)),
                "method.layer_one_milestones",
                values,
                "must be null or strictly increasing positive epochs",
            )


@register_method("yopo", YOPOConfig, annealed="amata_yopo")
class YOPO(Method):
    uses_control = True
    knob = "steps"  # m: the schedule anneals the outer repeats

    def __init__(self, ctx: TrainContext, cfg: YOPOConfig) -> None:
        super().__init__(ctx)
        if cfg.layer_one_ce not in LAYER_ONE_CE:
            raise ValueError(
                f"layer_one_ce must be one of {LAYER_ONE_CE}, got {cfg.layer_one_ce!r}"
            )
        self.cfg = cfg
        model = ctx.model
        self._layer_one: nn.Module = model.layer_one
        self._rest: Callable[[torch.Tensor], torch.Tensor] = model.forward_from_layer_one
        self._normalize: Callable[[torch.Tensor], torch.Tensor] | None = getattr(
            model, "normalize", None
        )
        self.layer_one_forward = 0
        self.layer_one_backward = 0
        self._layer_one_optimizer = (
            self._build_layer_one_optimizer() if cfg.layer_one_milestones is not None else None
        )

    # ------------------------------------------------------------------ the algorithm
    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        if control is None:
            raise ValueError("YOPO needs a control (m, sigma) from a schedule")
        x, y = batch.x.detach(), batch.y
        m, sigma = control.steps, control.step_size
        self.ctx.model.train()
        x_adv = random_start(x, self.cfg.eps, clip=self.cfg.clip_start)
        self.ctx.optimizer.zero_grad(set_to_none=True)
        if self._layer_one_optimizer is not None:
            self._layer_one_optimizer.zero_grad(set_to_none=True)
        for j in range(m):
            logits, loss, grad_z = self._full_pass(x_adv, y, self._ce_into_layer_one(j))
            x_adv = self._inner_loop(x, x_adv, grad_z, sigma)
            self._hamiltonian_backward(x_adv, grad_z)
        self._step()
        b = x.shape[0]
        self.ctx.counter.add(b, forward=m, backward=m)
        self.layer_one_forward += b * m * (self.cfg.inner_steps + 1)
        self.layer_one_backward += b * m * (self.cfg.inner_steps + 1)
        return StepOutput(loss.float() * b, (logits.argmax(1) == y).sum())

    def _f0(self, x: torch.Tensor) -> torch.Tensor:
        """Layer one on pixels in [0, 1] (normalising first when the model is Normalized)."""
        return self._layer_one(x if self._normalize is None else self._normalize(x))

    def _ce_into_layer_one(self, repeat: int) -> bool:
        ce = self.cfg.layer_one_ce
        return ce == "all" or (ce == "after_first" and repeat > 0)

    def _full_pass(
        self, x_adv: torch.Tensor, y: torch.Tensor, ce_into_layer_one: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward/backward the whole net: CE gradients into theta_rest (and theta_0 if asked).

        Layer one's output is cut from its graph so the same backward yields dL/dz, the costate;
        layer one's own weight gradient is formed only when ``ce_into_layer_one``.
        """
        with torch.set_grad_enabled(ce_into_layer_one), self.ctx.autocast():
            z_full = self._f0(x_adv)
        z = z_full.detach().requires_grad_(True)
        with self.ctx.autocast():
            logits = self._rest(z)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        grad_z = z.grad
        assert grad_z is not None
        if ce_into_layer_one:
            z_full.backward(grad_z)
        return logits.detach(), loss.detach(), grad_z.detach()

    def _inner_loop(
        self, x: torch.Tensor, x_adv: torch.Tensor, grad_z: torch.Tensor, sigma: float
    ) -> torch.Tensor:
        """n sign steps on H through layer one only (its parameters frozen: input grads only).

        The input gradient of -H = <dL/dz, f0(x')> is a vector-Jacobian product with dL/dz, the
        ascent direction.  An unclipped start (``clip_start=false``) is clamped into [0, 1]
        inside f0, as in the reference.
        """
        eps, clip_start = self.cfg.eps, self.cfg.clip_start
        with frozen_parameters(self._layer_one), torch.enable_grad():
            for _ in range(self.cfg.inner_steps):
                x_adv.requires_grad_(True)
                with self.attack_precision():
                    z = self._f0(x_adv if clip_start else x_adv.clamp(0.0, 1.0))
                (grad,) = torch.autograd.grad(z, x_adv, grad_outputs=grad_z)
                x_adv = project(signed_step(x_adv.detach(), grad, sigma), x, eps)
        return x_adv.detach()

    def _hamiltonian_backward(self, x_adv: torch.Tensor, grad_z: torch.Tensor) -> None:
        """Accumulate -grad_{theta_0} H(x') = d<dL/dz, f0(x'; theta_0)>/d theta_0 into layer one."""
        with self.ctx.autocast():
            z = self._f0(x_adv)
        z.backward(grad_z)

    def _step(self) -> None:
        """One optimiser step on the summed gradients, at lr / lr_divisor."""
        optimizer, layer_one_opt = self.ctx.optimizer, self._layer_one_optimizer
        divisor = float(self.cfg.lr_divisor)  # an int in the config; the step divides by a float
        if layer_one_opt is None:
            with scaled_lr(optimizer, divisor):
                optimizer.step()
            return
        # Layer one has its own optimiser: hide its gradients from the engine's (SGD skips
        # parameters without a gradient, momentum and weight decay included).
        params = list(self._layer_one.parameters())
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        with scaled_lr(optimizer, divisor):
            optimizer.step()
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        with scaled_lr(layer_one_opt, divisor):
            layer_one_opt.step()

    # ------------------------------------------------------------------ the reference's layer one
    def _build_layer_one_optimizer(self) -> torch.optim.SGD:
        """SGD over layer one with the engine optimiser's hyper-parameters (the reference's)."""
        group = self.ctx.optimizer.param_groups[0]
        self._layer_one_base_lr = float(group["lr"])
        return torch.optim.SGD(
            self._layer_one.parameters(),
            lr=self._layer_one_base_lr,
            momentum=group.get("momentum", 0.0),
            weight_decay=group.get("weight_decay", 0.0),
            nesterov=group.get("nesterov", False),
        )

    def start_epoch(self, epoch: int, control: Control | None) -> None:
        """Layer one's own MultiStep LR, a pure function of the epoch (so resume needs no state)."""
        del control
        if self._layer_one_optimizer is None:
            return
        decays = bisect.bisect_right(self.cfg.layer_one_milestones or [], epoch)
        for group in self._layer_one_optimizer.param_groups:
            group["lr"] = self._layer_one_base_lr * LAYER_ONE_GAMMA**decays

    # ------------------------------------------------------------------ bookkeeping
    def knobs(self, control: Control | None) -> dict[str, float | int]:
        """K = m (the repeats Amata anneals), n inner steps, sigma the inner step."""
        if control is None:
            return {}
        return {"K": control.steps, "n": self.cfg.inner_steps, "sigma": control.step_size}

    def metrics(self) -> dict[str, float]:
        """Layer-one-only passes so far, per example (cumulative, like ``forward_passes``)."""
        return {
            "layer_one_forward_passes": self.layer_one_forward,
            "layer_one_backward_passes": self.layer_one_backward,
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "layer_one_forward_passes": self.layer_one_forward,
            "layer_one_backward_passes": self.layer_one_backward,
        }
        if self._layer_one_optimizer is not None:
            state["layer_one_optimizer"] = self._layer_one_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layer_one_forward = int(state.get("layer_one_forward_passes", 0))
        self.layer_one_backward = int(state.get("layer_one_backward_passes", 0))
        if self._layer_one_optimizer is not None and "layer_one_optimizer" in state:
            self._layer_one_optimizer.load_state_dict(state["layer_one_optimizer"])
