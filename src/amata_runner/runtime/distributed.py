"""Data-parallel training under ``torchrun``: one process per device, gradients averaged.

Why not ``DistributedDataParallel``'s wrapper: every method here runs attack passes with the
parameters frozen and only input gradients taken (``torch.autograd.grad``), interleaved with the
update's backward; DDP's reducer expects every forward under grad mode to be followed by a
parameter backward, and would hang or error on the attack passes. So the synchronisation DDP does
is done where it belongs, in the optimiser step every method already goes through:

- before each step the parameter gradients are averaged over ranks (one all-reduce of a flat
  buffer); after it the buffers (BatchNorm running statistics) are broadcast from rank 0, as DDP's
  ``broadcast_buffers`` does — so every rank holds the same model at all times;
- the parameters are broadcast from rank 0 once at the start.

Each rank trains on its slice of every global batch (``batch_size`` is the global batch; each rank
takes ``batch_size / world_size`` of it), decisions that must agree (stop signals, a NaN loss,
Fast's early stop) are reduced over ranks, every rank evaluates the same fixed examples (so they
agree without a broadcast), and rank 0 alone writes files and talks to W&B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads from_env() before torch
    import torch
    from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (world 1 = a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter gradient by its mean over ranks (one flat all-reduce)."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_module(self, module: nn.Module, *, parameters: bool = True) -> None:
        """Rank 0's buffers (and parameters) on every rank."""
        if not self.enabled:
            return
        import torch.distributed as dist

        tensors = list(module.buffers())
        if parameters:
            tensors += [p.data for p in module.parameters()]
        for tensor in tensors:
            dist.broadcast(tensor, 0)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on any (stop signals, a non-finite loss)."""
        if not self.enabled:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def mean(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's string on every rank (e.g. the run directory Hydra chose there)."""
        if not self.enabled:
            assert text is not None
            return text
        import torch.distributed as dist

        box = [text]
        dist.broadcast_object_list(box, src=0)
        assert box[0] is not None
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def from_env() -> Dist:
    """The job as ``torchrun`` describes it in RANK / WORLD_SIZE / LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(
        rank=int(os.environ.get("RANK", "0")),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_process_group(job: Dist, use_cuda: bool) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on CPUs) once per process."""
    import torch
    import torch.distributed as dist

    if not job.enabled or dist.is_initialized():
        return
    if use_cuda:
        torch.cuda.set_device(job.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
