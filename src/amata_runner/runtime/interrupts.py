"""Stopping a run on request without losing it: SIGTERM, SIGINT and SIGUSR1.

Clusters announce preemption with a signal (SLURM sends SIGUSR1 or SIGTERM some time before it
kills a job) and people press Ctrl-C. The first signal only sets a flag; the training loop polls it
between steps (a host-side bool, no device sync), finishes the step it is in, writes a checkpoint,
flushes its files and exits with :data:`PREEMPTED_EXIT`, so ``resume=true`` continues exactly. A
second signal means "now": :class:`ForcedStop` is raised at once; every file the runner writes is
replaced atomically, so stopping anywhere leaves the previous complete version in place. Only
inside :meth:`StopRequests.deferred` (a checkpoint being written) does "now" wait for the write to
finish, so the run never ends with a half-written checkpoint as its newest state.

``amata-run`` installs the handlers for the whole life of a job, not only around the training
loop: a signal during start-up or during the final evaluation is a stop request like any other.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, ClassVar

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: try again (with resume=true)
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after its checkpoint was written."""

    def __init__(self, signum: int, what: str = "after saving a checkpoint") -> None:
        self.signum = signum
        self.what = what
        name = signal.Signals(signum).name if signum else "a stop request"
        self.stopped = f"stopped by {name} {what}"
        super().__init__(f"{self.stopped}; rerun with resume=true")

    def continue_with(self, command: str) -> str:
        """The message with the exact command that continues the run (amata-run knows it)."""
        return f"{self.stopped}; to continue: {command}"


class ForcedStop(BaseException):
    """A second stop signal: leave now (BaseException so no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")


class StopRequests:
    """Context manager turning stop signals into :attr:`signum` while training runs.

    Handlers can only be installed from the main thread; elsewhere (a launcher's worker thread) the
    signals keep their previous behaviour and :attr:`signum` stays None.
    """

    active: ClassVar[StopRequests | None] = None  # the one listening while training runs

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._deferring = False
        self._forced: int | None = None  # a second signal that arrived while deferring

    @property
    def installed(self) -> bool:
        """Its handlers are the ones listening now."""
        return StopRequests.active is self

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int) -> None:
        """A stop asked for by other means than our own handlers (a launcher's requeue signal)."""
        self._handle(signum, None)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is not None:
            if self._deferring:
                self._forced = signum
                return
            raise ForcedStop(signum)
        self.signum = signum
        log.warning(
            "%s received: finishing the current step, then saving a checkpoint "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A second signal waits until the block (a file being written) has finished."""
        outer = self._deferring
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = outer
        if not outer and self._forced is not None:
            raise ForcedStop(self._forced)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            StopRequests.active = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if StopRequests.active is self:
            StopRequests.active = None
