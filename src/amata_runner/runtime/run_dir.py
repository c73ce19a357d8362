"""Who may write a run directory, and what a run says about itself there.

One run directory belongs to one process at a time. Two runs started into the same
``hydra.run.dir`` (a copied command line, a requeue racing the original job) would interleave
their metrics and overwrite each other's checkpoints, so the first process holds an exclusive
advisory lock (``fcntl.flock`` on ``.lock``) for its whole life; the kernel drops it when the
process dies, so even kill -9 leaves no stale lock. A second process is refused before it writes
anything, with the holder's pid, host and start time.

``status.json`` is the run's own account of how it ended (running, completed, preempted,
interrupted, failed). It is replaced atomically; on a full disk, where a new file cannot be
created, it is rewritten in place, so it never keeps claiming ``running`` for a run that ended.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from amata_runner.errors import ConfigError, StorageError

LOCK = ".lock"
STATUS = "status.json"
# Files that hold a run's results: a fresh start refuses a directory holding any of them.
RESULT_FILES = ("metrics.jsonl", "metrics.csv", "summary.json", "eval.json")


class RunDirBusy(Exception):
    """Another live process holds the run directory."""


def storage_error(
    path: Path, exc: OSError, kept: str = "the previous file was kept intact"
) -> StorageError:
    """One line for a failed write: which file, why (a full disk named as such), what survived."""
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return StorageError(exc.errno or 0, f"could not write {path}: {reason}; {kept}")


class RunLock:
    """An exclusive lock on a run directory for the life of this process (or until released)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fd: int | None = None
        self._previous = b""

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirBusy` naming the holder (writing nothing)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(self.path, exc, "nothing was written") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_fd(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise storage_error(self.path, exc, "nothing was written") from exc
            raise RunDirBusy(_busy_message(self.path.parent, holder)) from None
        self._fd = fd
        self._previous = _read_fd(fd)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # On a full disk the lock holds all the same; only the holder's name is missing.
        with contextlib.suppress(OSError):
            _rewrite_fd(fd, (json.dumps(holder) + "\n").encode())

    def restore(self) -> None:
        """Put back what the lock file said before we took it (a refused start leaves no trace)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                _rewrite_fd(self._fd, self._previous)
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 4096, 0)
    except OSError:
        return b""


def _rewrite_fd(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _busy_message(run_dir: Path, holder_bytes: bytes) -> str:
    try:
        holder = json.loads(holder_bytes.decode())
        who = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        who = "a process that is still starting"
    return (
        f"{run_dir} is in use by another run ({who}); wait for it to end, or choose another "
        "hydra.run.dir"
    )


def result_files(run_dir: Path) -> list[str]:
    """The result files and checkpoints a directory already holds (sorted names)."""
    found = [name for name in RESULT_FILES if (run_dir / name).exists()]
    found += [p.name for p in run_dir.glob("*.ckpt")]
    return sorted(found)


def refuse_fresh_start_over_results(run_dir: Path) -> None:
    """A fresh start (``resume=false``) never overwrites what a run left behind."""
    held = result_files(run_dir)
    if held:
        raise ConfigError(
            "resume",
            False,
            f"{run_dir} already holds a run ({', '.join(held)}); pass resume=true to continue it "
            "or choose a fresh hydra.run.dir",
        )


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` beside ``path``, fsync it and rename it over ``path``: a reader sees the old
    file or the new one, never a part.  On failure the temporary file is removed and the
    ``OSError`` raised (the callers decide what a full disk means for their file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:  # the text's own newlines
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def read_status(run_dir: Path) -> dict[str, Any] | None:
    try:
        status = json.loads((run_dir / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(run_dir: Path, status: str, error: str | None = None, **extra: Any) -> None:
    """Record how the run stands; on a full disk rewrite the existing file in place.

    Raises :class:`StorageError` only when neither way works."""
    payload: dict[str, Any] = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if error is not None:
        payload["error"] = error
    payload.update(extra)
    text = json.dumps(payload, indent=2) + "\n"
    path = run_dir / STATUS
    try:
        replace_file(path, text)
        return
    except OSError as exc:
        if not path.exists():
            raise storage_error(path, exc, "nothing else was changed") from exc
        first = exc
    try:  # the file's existing blocks need no new space: overwrite them
        fd = os.open(path, os.O_WRONLY)
        try:
            data = text.encode()
            size = os.fstat(fd).st_size
            # Padding with spaces keeps the file valid JSON without needing a truncate-and-grow.
            os.pwrite(fd, data + b" " * max(0, size - len(data)), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise storage_error(path, first, "it still holds the previous status") from exc
