"""ERM: standard training on clean inputs, the paper's no-defence row in Table 2."""

from __future__ import annotations

import torch

from amata_runner.methods.base import Method, StepOutput
from amata_runner.schedules import Control


class ERM(Method):
    uses_control = False

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, control: Control | None) -> StepOutput:
        return self.update(x, y)
