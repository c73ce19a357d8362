"""GPU-only checks of the compiled step and the bf16 modes (`pytest -m cuda`, the device check)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from amata_runner.attacks import pgd_linf
from amata_runner.engine import Trainer
from amata_runner.models import build_model
from amata_runner.runtime.precision import Precision, maybe_compile
from conftest import FAST, compose_resolved

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CIFAR_SHAPED = [
    "dataset=synthetic",
    "dataset.channels=3",
    "dataset.image_size=32",
    "model=preactresnet18",
    "device=cuda",
]


def _net() -> torch.nn.Module:
    """A small net, so that each test's compilation takes seconds (the device check's budget);
    PreActResNet18 is compiled by the training test below."""
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=10, channels=3, image_size=32, mean=None, std=None)
    return model.cuda().to(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "bf16_update"])
def test_compiled_attack_matches_eager_on_cuda(mode: str) -> None:
    """CUDA-graph compiled PGD: inside the threat model, and the same examples as eager on all but
    a small fraction of pixels (sign steps flip where the two kernels' gradients round apart)."""
    device = torch.device("cuda")
    eager = _net().eval()
    compiled = maybe_compile(_net().eval(), True, device)
    precision = Precision(mode, device)
    x = torch.rand(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    outputs = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        with precision.attack():
            outputs.append(pgd_linf(model, x, y, eps=8 / 255, step_size=2 / 255, steps=5))
    a, b = outputs
    assert b.dtype == torch.float32
    assert (b - x).abs().max() <= 8 / 255 + 1e-6 and b.min() >= 0 and b.max() <= 1
    differ = ((a - b).abs() > 1e-4).float().mean().item()
    assert differ < (0.02 if mode == "fp32" else 0.15)


def test_compiled_update_matches_eager_on_cuda() -> None:
    device = torch.device("cuda")
    models = [_net().train(), maybe_compile(_net().train(), True, device)]
    x = torch.rand(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    grads = []
    for model in models:
        with Precision("bf16_update", device).update():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    cosine = F.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cosine > 0.99


def test_amata_trains_compiled_on_cuda(tmp_path: Path) -> None:
    """PreActResNet18, CUDA graphs, the CUDA default precision: trains and evaluates."""
    cfg = compose_resolved([*FAST, *CIFAR_SHAPED, "method=amata", "compile=true"])
    trainer = Trainer(cfg, tmp_path)
    assert trainer.parts.precision in ("bf16", "bf16_update")
    summary = trainer.run()
    assert summary["train_seconds"] > 0
    assert 0 <= summary["final"]["clean_accuracy"] <= 1
