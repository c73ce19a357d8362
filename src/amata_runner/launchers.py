"""What our Hydra launchers add to the plugins' (SLURM through submitit, joblib on one machine).

The presets in ``conf/hydra/launcher`` (``pip install -e ".[cluster]"``) use launchers declared in
``hydra_plugins.amata_runner_launchers`` (Hydra loads launcher classes only from that namespace)
as the plugins' launchers plus the mixins here, for two reasons:

- submitit announces a time limit (and, where the cluster sends it, a preemption) with SIGUSR2,
  and its handler requeues at once, killing the step in flight: the work since the last
  checkpoint is lost and status.json still says "running". Here the signal goes to the runner's
  own stop handling first (finish the step, write a mid-epoch checkpoint, exit 75, see
  :mod:`amata_runner.runtime.interrupts`) and only then does submitit requeue the job, with the same
  overrides into the same directory. Every job is launched with ``resume=auto``, so the requeued
  job continues from that checkpoint and a first attempt starts from scratch.
- joblib's worker processes all see every GPU; here each worker takes one for its lifetime.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from hydra.core.utils import JobReturn
from omegaconf import DictConfig

from amata_runner.runtime.interrupts import PREEMPTED_EXIT, StopRequests

log = logging.getLogger(__name__)


def with_resume_auto(overrides: Sequence[str]) -> list[str]:
    """A job's overrides plus ``resume=auto``, unless the command line chose ``resume`` itself."""
    keys = {o.lstrip("+~").partition("=")[0] for o in overrides}
    return list(overrides) if "resume" in keys else [*overrides, "resume=auto"]


class RequeueSignal:
    """While a submitit job runs, route its requeue signal through the runner's graceful stop.

    submitit's handler for the signal is kept and called once the runner has saved its checkpoint
    (:meth:`requeue`); when the signal arrives outside training (start-up, final evaluation) there
    is nothing newer to save and it is called at once.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.received = False
        self._submitit_handler: Any = None

    def __enter__(self) -> RequeueSignal:
        self._submitit_handler = signal.getsignal(self.signum)
        signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(self.signum, self._submitit_handler or signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received = True
        if StopRequests.active is not None:  # training: finish the step, checkpoint, exit 75
            StopRequests.active.request(signum)
        else:
            self.requeue()

    def requeue(self) -> None:
        """Let submitit requeue the job (it exits; on ranks other than 0 it returns)."""
        if callable(self._submitit_handler):
            self._submitit_handler(self.signum, None)


class SubmititJobs:
    """What our SLURM and local submitit launchers add to the plugin's (see the module doc)."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        jobs = [with_resume_auto(overrides) for overrides in job_overrides]
        return super().launch(jobs, initial_job_idx)  # type: ignore[misc]

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Run one job inside its submitit process (also what a requeued job runs again)."""
        import submitit

        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:  # tasks_per_node > 1: a data-parallel run, as torchrun does
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True
            )
        with RequeueSignal(environment._usr_sig()) as requeue:
            try:
                return super().__call__(*args, **kwargs)  # type: ignore[misc]
            except SystemExit as exc:
                if exc.code == PREEMPTED_EXIT and requeue.received:
                    requeue.requeue()
                raise


# ----------------------------------------------------------------------------- joblib


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        gpus = []
        for name in (d.strip() for d in listed.split(",")):
            if not name or name.startswith("-"):  # CUDA stops at the first invalid entry (-1)
                break
            gpus.append(name)
        return gpus
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


_claimed: dict[str, tuple[int, int]] = {}  # lock dir -> (slot, open lock fd), per process


def claim_slot(lock_dir: Path, slots: int) -> int:
    """This process's worker slot in ``[0, slots)``, held until the process ends.

    Each slot is an exclusive ``flock`` on a file in ``lock_dir``: the kernel releases it when the
    process dies, so a worker that joblib replaces frees its slot (and GPU) for the next one.
    """
    import fcntl  # POSIX, where SLURM and multi-GPU machines are

    key = str(lock_dir)
    if key in _claimed:
        return _claimed[key][0]
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(slots):
            fd = os.open(lock_dir / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _claimed[key] = (slot, fd)
            return slot
        time.sleep(0.1)  # a worker that is being replaced still holds its slot for a moment


class OneGpuPerWorker:
    """A task function that pins the joblib worker running it to one GPU, before CUDA starts."""

    def __init__(
        self, task: Callable[[DictConfig], Any], gpus: list[str], slots: int, lock_dir: Path
    ) -> None:
        self.task = task
        self.gpus = gpus
        self.slots = slots
        self.lock_dir = lock_dir

    def __call__(self, cfg: DictConfig) -> Any:
        slot = claim_slot(self.lock_dir, self.slots)
        gpu = self.gpus[slot % len(self.gpus)]
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("joblib worker %d of %d: CUDA_VISIBLE_DEVICES=%s", slot, self.slots, gpu)
        return self.task(cfg)


class GpuPerWorker:
    """What our joblib launcher adds to the plugin's: one GPU per worker (n_jobs -1: #GPUs)."""

    joblib: dict[str, Any]
    config: DictConfig | None
    task_function: Callable[[DictConfig], Any] | None

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        gpus = visible_gpus()
        if not gpus or self.task_function is None or self.config is None:
            return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        if int(self.joblib.get("n_jobs") or -1) < 1:
            self.joblib["n_jobs"] = len(gpus)
        task = self.task_function
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        digest = hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:12]
        lock_dir = Path(tempfile.gettempdir()) / f"amata-gpu-slots-{digest}"  # local, not NFS
        self.task_function = OneGpuPerWorker(task, gpus, int(self.joblib["n_jobs"]), lock_dir)
        try:
            return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        finally:
            self.task_function = task
