"""Where a number came from: what is needed to trust and repeat a run, recorded with its results.

``summary.json`` (and the W&B / TensorBoard config) carries the command line, the versions of the
packages that compute the numbers, the git commit (and whether the checkout had uncommitted
changes) when the runner runs from a checkout, the host, Python, CUDA/cuDNN and the GPU's name when
it trains on CUDA, and when the run started and ended.
"""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("amata-runner", "torch", "torchvision", "timm", "hydra-core", "omegaconf", "numpy")
_GIT_TIMEOUT_S = 10


def now() -> str:
    """The current time, ISO 8601 with its UTC offset (``2026-12-03T12:19:27+00:00``)."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: the console script's name and its arguments, shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    prog = Path(argv[0]).name
    orig = list(getattr(sys, "orig_argv", []))
    if prog.endswith(".py") and "-m" in orig[:-1]:  # python -m amata_runner.cli.train ...
        prog = f"python -m {orig[orig.index('-m') + 1]}"
    return " ".join([prog, *(shlex.quote(a) for a in argv[1:])])


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(cwd: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(source: Path | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the checkout the code runs from; None for an installed wheel.

    The package's own ``__init__.py`` must be tracked by that repository: a wheel installed in a
    virtualenv that happens to sit inside some other checkout does not count.
    """
    source = source or Path(__file__).resolve().parent
    if _git(source, "ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    commit = _git(source, "rev-parse", "HEAD")
    if commit is None:
        return None
    changes = _git(source, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": None if changes is None else bool(changes),
        "root": _git(source, "rev-parse", "--show-toplevel"),
    }


def cuda_state(device: Any) -> dict[str, Any] | None:
    """CUDA and cuDNN versions and the GPU's name, when ``device`` is a CUDA device."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "gpu": torch.cuda.get_device_name(device),
        "gpu_count": torch.cuda.device_count(),
    }


def collect(device: Any = None, *, started: str | None = None, ended: bool = True) -> dict:
    """The provenance block: ``ended`` adds the end timestamp (omitted from the start config)."""
    block: dict[str, Any] = {
        "command": command_line(),
        "cwd": os.getcwd(),
        "packages": package_versions(),
        "git": git_state(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cuda": cuda_state(device) if device is not None else None,
        "started": started or now(),
    }
    if ended:
        block["ended"] = now()
    return block
