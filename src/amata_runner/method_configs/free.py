"""Config schema and checks of Free adversarial training (``method=free`` / ``amata_free``).

``method.steps`` is Free's replay count m (each mini-batch is trained on m times in a row); the
schedule group drives it, so ``amata_free`` anneals m.  No torch import here: the CLI checks a
command line before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from amata_runner.checks import at_least, positive_budget


@dataclass
class FreeConfig:
    """Free-m (Shafahi et al. 2019): m replays per batch, one backward each, a carried delta."""

    name: str = "free"
    eps: Any = "${dataset.threat.eps}"
    steps: int = 4  # m, the replays of each mini-batch
    step_size: Any = "${method.eps}"  # the perturbation step; the references use eps
    divide_epochs: bool = True  # run ceil(epochs / m) epochs, as the references do
    clamp_delta_to_image: bool = False  # locuslab's port: keep x + delta in [0,1] in the state


SCHEMA = FreeConfig


def check(cfg: DictConfig) -> None:
    """Budgets positive (fractions such as 8/255 resolved to floats), m >= 1."""
    positive_budget(cfg, "method.eps", upper=1.0)
    positive_budget(cfg, "method.step_size")
    at_least(cfg, "method.steps", 1)
