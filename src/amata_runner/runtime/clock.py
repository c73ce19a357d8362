"""The train-only clock: the x axis of every error-versus-time curve.

It counts training work only.  It synchronises the device before every reading, because CUDA
kernels run asynchronously and an unsynchronised ``perf_counter`` would charge queued training work
to whatever runs next (typically evaluation), and it is stopped around evaluation, checkpointing
and logging.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter

import torch


class TrainClock:
    def __init__(self, device: torch.device, elapsed: float = 0.0) -> None:
        self.device = device
        self._elapsed = elapsed
        self._started_at: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def start(self) -> None:
        if self._started_at is None:
            self._sync()
            self._started_at = perf_counter()

    def stop(self) -> None:
        if self._started_at is not None:
            self._sync()
            self._elapsed += perf_counter() - self._started_at
            self._started_at = None

    @property
    def seconds(self) -> float:
        """Training seconds so far (includes the current stretch when running, after a sync)."""
        if self._started_at is None:
            return self._elapsed
        self._sync()
        return self._elapsed + perf_counter() - self._started_at

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the clock for the duration (evaluation, checkpoints, logging), then resume."""
        was_running = self.running
        self.stop()
        try:
            yield
        finally:
            if was_running:
                self.start()
