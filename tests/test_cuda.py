"""GPU-only checks (``pytest -m cuda`` on a CUDA machine): the fast path keeps the contracts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amata_runner.attacks import pgd_linf
from amata_runner.engine import Trainer
from amata_runner.models import build_model
from conftest import FAST, compose_resolved

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CIFAR_SHAPED = [
    "dataset=synthetic",
    "dataset.channels=3",
    "dataset.image_size=32",
    "dataset.augment=crop_flip",
    "model=preactresnet18",
]


def test_bf16_attack_stays_in_the_threat_model() -> None:
    model = (
        build_model(
            "preactresnet18", num_classes=10, channels=3, image_size=32, mean=None, std=None
        )
        .cuda()
        .to(memory_format=torch.channels_last)
    )
    x = torch.rand(64, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x_adv = pgd_linf(model, x, y, eps=8 / 255, step_size=2 / 255, steps=5)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_amata_trains_on_cuda_with_bf16_and_channels_last(tmp_path: Path) -> None:
    cfg = compose_resolved([*FAST, *CIFAR_SHAPED, "device=cuda"])
    trainer = Trainer(cfg, tmp_path)
    assert trainer.parts.precision == "bf16"
    conv = next(m for m in trainer.parts.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    summary = trainer.run()
    assert summary["device"].startswith("cuda")
    assert summary["train_seconds"] > 0
    assert 0 <= summary["final"]["clean_accuracy"] <= 1
