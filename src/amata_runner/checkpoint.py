"""Checkpoints that survive a crash mid-write and load under ``torch.load(weights_only=True)``.

Every file is written to a temporary name in the same directory, flushed to disk and then renamed
over the old one, so a reader always sees either the previous complete checkpoint or the new one.
Only tensors and plain containers are stored (RNG states as tensors, the config as a dict), which is
what the safe ``weights_only`` unpickler accepts; nothing is executed on load.

``last.ckpt`` is rotated: before a new one replaces it, the current one is kept as
``last.prev.ckpt`` (a hard link, so there is never a moment without a complete ``last``). A ``last``
that was truncated or damaged after it was written (a disk or copy fault, not our writes) is then
not the end of the run: :func:`load_latest` warns and continues from the previous one.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from amata_runner.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"
BEST = "best.ckpt"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(path: Path, exc: OSError) -> StorageError:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return StorageError(
        exc.errno or 0, f"could not write {path}: {reason}; the previous file was kept intact"
    )


def save_atomic(obj: dict[str, Any], path: Path, *, keep_previous: bool = False) -> None:
    """torch.save to ``path`` without ever leaving a partial file under that name.

    With ``keep_previous`` the file being replaced stays available as ``last.prev.ckpt``.
    A failed write (e.g. a full disk) removes its temporary file and raises :class:`StorageError`;
    the existing checkpoint is untouched.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _storage_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if keep_previous and path.exists():
        _keep_previous(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _keep_previous(path: Path) -> None:
    """Make ``last.prev.ckpt`` the current ``last`` (a hard link; a copy where links fail)."""
    previous = path.with_name(PREVIOUS)
    link = path.with_name(f".{PREVIOUS}.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        shutil.copyfile(path, link)
    os.replace(link, previous)


def copy_atomic(source: Path, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; an unreadable file is a one-line error naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError("ckpt", str(path), "no such checkpoint file") from exc
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("ckpt", str(path), f"unreadable checkpoint ({reason})") from exc


def load_latest(
    run_dir: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of a run: ``last``, else (with a warning) ``last.prev``.

    None when the run has neither; :class:`ConfigError` when every file present is unreadable.
    """
    candidates = [p for p in (run_dir / LAST, run_dir / PREVIOUS) if p.exists()]
    if not candidates:
        return None
    failure: ConfigError | None = None
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location)
        except ConfigError as exc:
            log.warning("%s", exc)
            failure = failure or exc
            continue
        if failure is not None:
            log.warning("continuing from the previous checkpoint %s", path)
        return state, path
    assert failure is not None
    raise failure


def rng_state() -> dict[str, Any]:
    """The global torch RNG streams training draws from (random starts, dropout, init)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
