"""ERM: standard training on clean inputs, the paper's no-defence row in Table 2."""

from __future__ import annotations

from omegaconf import DictConfig

from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method, StepOutput, TrainContext
from amata_runner.schedules import Control


class ERM(Method):
    uses_control = False

    def train_batch(self, batch: Batch, control: Control | None) -> StepOutput:
        return self.update(batch.x, batch.y)


def build(cfg: DictConfig, ctx: TrainContext) -> ERM:
    del cfg
    return ERM(ctx)
