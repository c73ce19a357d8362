"""Checkpoints that survive a crash mid-write and load under ``torch.load(weights_only=True)``.

Every file is written to a temporary name in the same directory, flushed to disk and then renamed
over the old one, so a reader always sees either the previous complete checkpoint or the new one.
Only tensors and plain containers are stored (RNG states as tensors, the config as a dict), which is
what the safe ``weights_only`` unpickler accepts; nothing is executed on load.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from amata_runner.errors import ConfigError

LAST = "last.ckpt"
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


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to ``path`` without ever leaving a partial file under that name."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
