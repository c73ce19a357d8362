"""Checkpoints that survive a crash mid-write and load under ``torch.load(weights_only=True)``.

Every file is written to a temporary name in the same directory, flushed to disk and then renamed
over the old one, so a reader always sees either the previous complete checkpoint or the new one.
Only tensors and plain containers are stored (RNG states as tensors, the config as a dict), which is
what the safe ``weights_only`` unpickler accepts; nothing is executed on load.

``last.ckpt`` is rotated: before a new one replaces it, the current one is kept as
``last.prev.ckpt`` (a hard link, so there is never a moment without a complete ``last``). A ``last``
that was truncated or damaged after it was written (a disk or copy fault, not our writes) is then
not the end of the run: :func:`load_latest` warns and continues from the previous one.

Each checkpoint carries a SHA-256 digest of its own contents (every tensor's bytes, dtype and
shape, and every other value), checked on load: a flipped bit in the weights would otherwise load
silently and change every number that follows. The state is serialised in memory and then written
with plain file I/O, so a full disk is an ``OSError`` (ENOSPC) rather than an opaque serialiser
error.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from amata_runner.errors import ConfigError
from amata_runner.runtime.run_dir import storage_error

log = logging.getLogger(__name__)

LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"
BEST = "best.ckpt"
CHECKSUM = "checksum"  # the key holding {"sha256": hex digest of everything else}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _update_digest(digest: Any, value: Any) -> None:
    """Feed ``value`` into ``digest`` in a canonical order (dict order is kept by torch.save)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            digest.update(repr(key).encode())
            _update_digest(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _update_digest(digest, item)
    else:
        digest.update(f"V{value!r}".encode())


def content_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents, its own checksum entry excluded."""
    digest = hashlib.sha256()
    _update_digest(digest, {k: v for k, v in state.items() if k != CHECKSUM})
    return digest.hexdigest()


def save_atomic(obj: dict[str, Any], path: Path, *, keep_previous: bool = False) -> None:
    """torch.save to ``path`` without ever leaving a partial file under that name.

    With ``keep_previous`` the file being replaced stays available as ``last.prev.ckpt``.
    A failed write (e.g. a full disk) removes its temporary file and raises :class:`StorageError`;
    the existing checkpoint is untouched.
    """
    buffer = io.BytesIO()
    torch.save({**obj, CHECKSUM: {"sha256": content_digest(obj)}}, buffer)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, exc) from exc
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
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, exc) from exc
    _fsync_dir(path.parent)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; an unreadable file is a one-line error naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError("ckpt", str(path), "no such checkpoint file") from exc
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("ckpt", str(path), f"unreadable checkpoint ({reason})") from exc
    stored = state.get(CHECKSUM) if isinstance(state, dict) else None
    if isinstance(stored, dict):  # checkpoints written before checksums existed have none
        if stored.get("sha256") != content_digest(state):
            raise ConfigError(
                "ckpt", str(path), "damaged checkpoint (its contents do not match its checksum)"
            )
        del state[CHECKSUM]
    return state


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
