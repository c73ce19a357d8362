"""Device, kernel and seed set-up, shared by amata-run, amata-eval and amata-landscape.

One function decides what ``device=auto`` means and what a device that cannot be used says, so the
tools that train a model and the tools that read one back cannot drift apart.
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch

from amata_runner.errors import ConfigError

DEVICE_NAMES = "auto|cpu|cuda(:\\d+)?"


def select_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU; a name this machine cannot run on is a
    ``device`` :class:`ConfigError` (before any checkpoint or data is loaded onto it)."""
    if re.fullmatch(DEVICE_NAMES, name) is None:
        raise ConfigError("device", name, "allowed: auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "device", name, "no CUDA device is available here; use device=auto or device=cpu"
        )
    return torch.device(name)


def configure_backend(device: torch.device, deterministic: bool) -> None:
    """Fast kernels by default; bitwise-repeatable ones when ``deterministic`` is set."""
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    """Every global generator a run draws from (Python, NumPy, torch), so a seed is one run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
