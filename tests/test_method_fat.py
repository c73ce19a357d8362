"""FAT: early-stopped PGD-K-tau stops each example tau steps after its first misclassification."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from amata_runner.attacks.early_stop import early_stopped_pgd
from amata_runner.attacks.linf import random_start
from amata_runner.data.loader import Batch
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.logging.metrics import read_rows
from amata_runner.methods import build_method
from amata_runner.methods.base import TrainContext
from amata_runner.methods.fat import FAT, FATConfig, FATRule, tau_at
from amata_runner.runtime.passes import PassCounter
from conftest import FAST, compose_resolved, cpu_context

ALPHA = 0.01
THRESHOLD = 2.0


def make_ctx(model: nn.Module, counter: PassCounter | None = None) -> TrainContext:
    return cpu_context(model, counter=counter, image_shape=(1, 2, 2))


def threshold_model() -> nn.Module:
    """Logits (0, sum(x) - 2) on 1x2x2 images: class 1 once the pixel sum passes 2.

    For label 0 the CE gradient is positive in every pixel, so each PGD step of size ALPHA raises
    the sum by exactly 4 * ALPHA: when an example flips is known in advance.
    """
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        linear.bias.copy_(torch.tensor([0.0, -THRESHOLD]))
    return nn.Sequential(nn.Flatten(), linear).eval()


def flipping_at(flips: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-0 images that the threshold model first misclassifies after ``flips[i]`` steps."""
    sums = torch.tensor([THRESHOLD - 4 * ALPHA * f + 2 * ALPHA for f in flips])
    x = (sums / 4).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return x, torch.zeros(len(flips), dtype=torch.long)


def reference_adjust_tau(epoch: int, dynamictau: bool, tau: int = 0) -> int:
    """FAT.py's adjust_tau, as the reference writes it (called there with epoch + 1)."""
    if dynamictau:
        if epoch <= 50:
            return 0
        if epoch <= 90:
            return 1
        return 2
    return tau


@pytest.mark.parametrize("tau", [0, 1, 2, 3])
def test_stops_exactly_tau_steps_after_the_first_misclassification(tau: int) -> None:
    steps = 6
    flips = list(range(steps + 3))  # 0: already wrong at the start ... beyond K: never in time
    x, y = flipping_at(flips)
    model = threshold_model()
    with torch.no_grad():  # the construction: the first misclassified point is x^{flips[i]}
        for f, xi in zip(flips, x, strict=True):
            moved = xi + ALPHA * torch.arange(f + 1).view(-1, 1, 1, 1)
            wrong = model(moved).argmax(1) != 0
            assert wrong.tolist() == [False] * f + [True]
    out = early_stopped_pgd(
        model, x, y, x.clone(), eps=0.5, step_size=ALPHA, steps=steps, rule=FATRule(y, tau)
    )
    expected = [min(f + tau, steps) for f in flips]
    assert out.steps.tolist() == expected
    assert out.active.tolist() == [f + tau >= steps for f in flips]  # the others stopped
    assert torch.allclose(out.x_adv, x + ALPHA * torch.tensor(expected).view(-1, 1, 1, 1))
    if tau == 0:
        assert out.steps[0] == 0 and torch.equal(out.x_adv[0], x[0])  # wrong at the start


def test_method_reports_the_steps_taken_and_counts_full_batch_passes() -> None:
    flips = [0, 1, 2, 3, 4, 5, 6, 7]
    x, y = flipping_at(flips)
    counter = PassCounter()
    method = FAT(
        make_ctx(threshold_model(), counter),
        FATConfig(
            eps=0.5,
            steps=4,
            step_size=ALPHA,
            random_start=False,
            omega=0.0,
            dynamic_tau=False,
            tau=1,
        ),
    )
    method.start_epoch(0, None)
    assert method.knobs(None) == {"K": 4, "alpha": ALPHA, "tau": 1}
    method.train_batch(Batch(x, y, torch.arange(8)), None)
    # every example goes through all K forward+backward passes, stopped or not, plus the update
    assert (counter.forward, counter.backward) == (8 * 5, 8 * 5)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh = FAT(make_ctx(threshold_model()), FATConfig(eps=0.5, steps=4, step_size=ALPHA))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    rows = method.metrics()
    assert fresh.metrics() == rows
    taken = [min(f + 1, 4) for f in flips]
    assert rows["mean_steps"] == pytest.approx(sum(taken) / 8)  # the useful work
    assert rows["stopped_fraction"] == pytest.approx(sum(f + 1 < 4 for f in flips) / 8)
    assert set(method.metrics().values()) == {None}  # reset after each read


def test_tau_schedule_matches_the_reference() -> None:
    for epoch in range(130):  # 0-based, as the engine calls start_epoch
        assert tau_at(epoch) == reference_adjust_tau(epoch + 1, True)
        assert tau_at(epoch, dynamic=False, tau=3) == reference_adjust_tau(epoch + 1, False, 3)
    assert [tau_at(e) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]
    method = FAT(
        make_ctx(threshold_model()),
        FATConfig(eps=0.1, steps=2, step_size=0.05, tau_milestones=[2, 4]),
    )
    seen = []
    for epoch in range(6):
        method.start_epoch(epoch, None)
        seen.append(method.knobs(None)["tau"])
    assert seen == [0, 0, 1, 1, 2, 2]
    # the reference's type=bool flags could not be switched off; here they can
    fixed = FAT(
        make_ctx(threshold_model()),
        FATConfig(eps=0.1, steps=2, step_size=0.05, dynamic_tau=False, tau=2),
    )
    fixed.start_epoch(100, None)
    assert fixed.knobs(None)["tau"] == 2


def test_perturbations_stay_in_the_eps_ball_and_pixel_range() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    x = torch.rand(32, 1, 8, 8)
    x[:8] = 0.0
    x[8:16] = 1.0
    y = torch.randint(0, 3, (32,))
    for eps, alpha, steps in [(0.1, 0.05, 5), (0.3, 0.5, 3), (8 / 255, 2 / 255, 10)]:
        for tau, noise in [(0, 0.0), (2, 0.05)]:  # large omega noise must be projected too
            start = random_start(x, eps)
            out = early_stopped_pgd(
                net,
                x,
                y,
                start,
                eps=eps,
                step_size=alpha,
                steps=steps,
                rule=FATRule(y, tau),
                noise=noise,
            )
            assert (out.x_adv - x).abs().max() <= eps + 1e-6
            assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1


def test_config_defaults_and_bad_values() -> None:
    cfg = compose_resolved(["method=fat"])
    m = cfg.method
    threat = cfg.dataset.threat
    assert (m.eps, m.steps, m.step_size) == (threat.eps, threat.steps, threat.step_size)
    assert (m.omega, m.dynamic_tau, m.tau, list(m.tau_milestones)) == (0.001, True, 0, [50, 90])
    assert (m.random_start, m.attack_bn) == (True, "eval")
    cifar = compose_resolved(["dataset=cifar10", "method=fat"])
    assert (cifar.method.steps, cifar.method.step_size) == (10, pytest.approx(2 / 255))
    assert isinstance(build_method(m, make_ctx(threshold_model())), FAT)
    for override, key in [
        ("method.tau_milestones=[90,50]", "method.tau_milestones"),
        ("method.tau=-1", "method.tau"),
        ("method.omega=-0.1", "method.omega"),
        ("method.attack_bn=frozen", "method.attack_bn"),
        ("method.steps=0", "method.steps"),
        ("method.eps=0", "method.eps"),
    ]:
        with pytest.raises(ConfigError) as info:
            compose_resolved(["method=fat", override])
        assert info.value.key == key


def test_end_to_end_on_digits(tmp_path: Path) -> None:
    cfg = compose_resolved([*FAST, "method=fat", "method.steps=2", "method.tau_milestones=[1]"])
    summary = Trainer(cfg, tmp_path).run()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["tau"] for r in rows] == [0, 1]  # tau grows after epoch 1
    assert all(r["K"] == 2 and r["alpha"] == pytest.approx(0.05) for r in rows)
    for r in rows:
        assert 0 <= r["mean_steps"] <= 2 and 0 <= r["stopped_fraction"] <= 1
    # digits: 1238 training images (1438 less 200 validation); per image 2 attack passes and 1
    # update, both epochs
    assert rows[-1]["forward_passes"] == rows[-1]["backward_passes"] == 1238 * 3 * 2
    assert summary["final"]["examples"] == 359
