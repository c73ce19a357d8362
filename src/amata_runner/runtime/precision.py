"""Training precision (``precision=``) and the compiled step (``compile=``).

Precision modes (evaluation is always fp32, whatever is chosen here):

- ``fp32``: no autocast anywhere.
- ``bf16``: bf16 autocast for the attack's forward/backward *and* the weight update.
- ``bf16_update``: the attack (the sign steps that build the training examples) in fp32, the
  weight update under bf16 autocast.  A PGD step is ``sign(grad_x)``: bf16 input gradients flip
  the sign of some pixels, which may weaken the training attack; this mode keeps the attack exact
  and takes bf16's speed where the weight gradient is only averaged.
- ``auto``: what the evidence in docs/benchmarks.md supports on CUDA (see ``AUTO_CUDA``); fp32
  on the CPU.

Methods whose attack and update share one backward (Free, YOPO's layer-one pass) run that pass
under the update's precision.

``compile=true`` wraps the model's forward in ``torch.compile`` (inductor; on CUDA in
``reduce-overhead`` mode, i.e. CUDA graphs, since training batches have a static shape), so both
the attack's forward/backward and the update's go through the compiled graph.  One compiled module
serves every K of Amata's schedule: the attack loop is Python around it, so a new K is more calls,
not a new graph.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from amata_runner.config import PRECISIONS

# precision=auto on CUDA, chosen from the bf16-vs-fp32 sweep in docs/benchmarks.md: bf16 lost no
# robustness beyond seed noise (PGD +0.2/+0.8 points paired; bf16_update, whose attack is fp32,
# scatters as widely), and a bf16 attack on a fixed model is as strong as an fp32 one.
AUTO_CUDA = "bf16"


def training_precision(precision: str, device: torch.device) -> str:
    """The concrete mode for ``precision`` on ``device`` (``auto`` resolved)."""
    if precision == "auto":
        return AUTO_CUDA if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _bf16(device: torch.device) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class Precision:
    """The two autocast contexts of a training step: the attack's and the update's."""

    mode: str
    device: torch.device

    def update(self) -> AbstractContextManager[Any]:
        return _bf16(self.device) if self.mode in ("bf16", "bf16_update") else nullcontext()

    def attack(self) -> AbstractContextManager[Any]:
        return _bf16(self.device) if self.mode == "bf16" else nullcontext()

    @property
    def autocasts(self) -> tuple[Callable[[], AbstractContextManager[Any]], ...]:
        """(update, attack) as callables, the form TrainContext takes."""
        return self.update, self.attack


def compile_mode(device: torch.device, static_shapes: bool = True) -> str | None:
    """torch.compile's mode: CUDA graphs (reduce-overhead) on CUDA when shapes are static."""
    if device.type == "cuda" and static_shapes:
        return "reduce-overhead"
    return None  # inductor's default mode


class CompiledForward(nn.Module):
    """``model`` with its forward compiled; parameters, buffers and state_dict stay the model's.

    Only the forward passes go through ``torch.compile``: ``train()``/``eval()``,
    ``parameters()`` and checkpoints act on the wrapped model itself (its state_dict keys are
    unchanged).  Autograd runs through the compiled graphs (AOTAutograd), so the attack's input
    gradient and the update's weight gradient are both compiled.  YOPO's split (``layer_one``,
    ``forward_from_layer_one``) is compiled piece by piece; other attributes are the model's.
    ``dynamic=False``: a batch of a new size is one more graph, never a dynamic-shape graph.
    """

    def __init__(
        self, model: nn.Module, device: torch.device, backend: str | Callable[..., Any] = "inductor"
    ) -> None:
        super().__init__()
        self.inner = model
        options: dict[str, Any] = {"backend": backend, "dynamic": False}
        if backend == "inductor":
            options["mode"] = compile_mode(device)
        # Not registered as submodules: modules()/parameters() list the model once.
        object.__setattr__(self, "_compiled", torch.compile(model, **options))
        if hasattr(model, "layer_one") and hasattr(model, "forward_from_layer_one"):
            object.__setattr__(self, "_layer_one", torch.compile(model.layer_one, **options))
            rest = torch.compile(model.forward_from_layer_one, **options)
            object.__setattr__(self, "_rest", rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compiled(x)

    @property
    def layer_one(self) -> nn.Module:
        return self._layer_one

    def forward_from_layer_one(self, h: torch.Tensor) -> torch.Tensor:
        return self._rest(h)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    # The wrapped model's own state, not "inner."-prefixed keys.
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.inner.load_state_dict(*args, **kwargs)


def maybe_compile(model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """The module the training step calls: ``model`` itself, or its compiled forward."""
    return CompiledForward(model, device) if enabled else model
