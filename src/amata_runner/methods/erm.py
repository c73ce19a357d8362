"""ERM: standard training on clean inputs, the paper's no-defence row in Table 2."""

from __future__ import annotations

from dataclasses import dataclass

from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.methods.registry import register_method


@dataclass
class ERMConfig:
    """Standard training on clean inputs: the no-attack baseline."""

    name: str = "erm"


@register_method("erm", ERMConfig)
class ERM(Method):
    uses_control = False

    def __init__(self, ctx: TrainContext, cfg: ERMConfig | None = None) -> None:
        super().__init__(ctx)
        self.cfg = cfg or ERMConfig()

    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        return self.update(batch.x, batch.y)
