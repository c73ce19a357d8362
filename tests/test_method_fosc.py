"""FOSC / dynamic adversarial training: the criterion, the masked early stop, its schedule."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks.early_stop import early_stopped_pgd
from amata_runner.attacks.linf import random_start
from amata_runner.data.loader import Batch
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.logging.metrics import read_rows
from amata_runner.methods import build_method
from amata_runner.methods.base import StepOutput, TrainContext
from amata_runner.methods.fosc import FOSC, FOSCConfig, FOSCRule, criterion_at, fosc_linf
from amata_runner.runtime.passes import PassCounter
from conftest import FAST, compose_resolved, cpu_context


def linear_model(features: int, seed: int = 0) -> nn.Module:
    """Two classes, logits linear in the input: the CE gradient's sign never changes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 2)).eval()


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 16), nn.Tanh(), nn.Linear(16, 3)
    ).eval()


def make_ctx(model: nn.Module, counter: PassCounter | None = None) -> TrainContext:
    return cpu_context(model, counter=counter, image_shape=(1, 8, 8), num_classes=3)


class Recorder(nn.Module):
    """Wraps a net and keeps every input it is called with: the attack's trajectory x^0..x^K."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.net(x)


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def test_fosc_is_zero_at_the_maximiser_of_a_linear_loss() -> None:
    model = linear_model(64)
    x = 0.3 + 0.4 * torch.rand(16, 1, 8, 8)  # far enough from 0 and 1 that no pixel is clipped
    y = torch.randint(0, 2, (16,))
    eps, alpha = 0.1, 0.03  # the corner is reached after ceil(0.1 / 0.03) = 4 steps
    rule = FOSCRule(x, eps, c=-1.0)  # never stops: run all K steps
    out = early_stopped_pgd(
        model, x, y, x.clone(), eps=eps, step_size=alpha, steps=10, rule=rule, final_check=True
    )
    w = model[1].weight.detach()
    direction = torch.sign(w[1 - y] - w[y]).view_as(x)  # sign of grad_x CE for a 2-class linear net
    assert torch.allclose(out.x_adv, x + eps * direction, atol=1e-6)  # the ball's corner
    scale = eps * input_grad(model, out.x_adv, y).flatten(1).abs().sum(1)
    assert (rule.value.abs() <= 1e-5 * scale).all()  # FOSC == 0 at the maximiser
    # ... and it is positive before the corner is reached (here after 2 steps from the clean image)
    early_stopped_pgd(
        model, x, y, x.clone(), eps=eps, step_size=alpha, steps=2, rule=rule, final_check=True
    )
    assert (rule.value > 0.3 * scale).all()
    # The reference's quirk: measured from a random start instead of the clean image, FOSC at the
    # maximiser is -<x - start, g>, not 0 (of either sign), which is why the paper's origin is the
    # default.
    start = random_start(x, eps, generator=torch.Generator().manual_seed(0))
    g = input_grad(model, out.x_adv, y)
    from_start = fosc_linf(out.x_adv, g, start, eps)
    assert torch.allclose(from_start, -((x - start) * g).flatten(1).sum(1), atol=1e-5)
    assert (from_start.abs() > 1e-4 * scale).all()
    assert (fosc_linf(out.x_adv, g, x, eps).abs() <= 1e-5 * scale).all()


def test_criterion_stops_each_example_when_its_fosc_reaches_c() -> None:
    model = linear_model(64)
    x = 0.3 + 0.4 * torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 2, (16,))
    rule = FOSCRule(x, 0.1, c=1e-5)  # stop at (numerically) zero FOSC, i.e. at the corner
    out = early_stopped_pgd(model, x, y, x.clone(), eps=0.1, step_size=0.03, steps=10, rule=rule)
    assert out.steps.tolist() == [4] * 16  # the step that reaches the corner, then no more
    assert not out.active.any()


def test_early_stop_freezes_converged_examples() -> None:
    net = small_net()
    model = Recorder(net)
    x = torch.rand(32, 1, 8, 8)
    y = torch.randint(0, 3, (32,))
    eps, alpha, steps = 0.3, 0.05, 8
    start = random_start(x, eps, generator=torch.Generator().manual_seed(1))
    # c = the median over examples of the lowest FOSC an unstopped run meets after a step (half
    # way between two examples' values, clear of rounding): half of the examples reach it (and
    # stop), the others never do
    free = Recorder(net)
    early_stopped_pgd(
        free, x, y, start, eps=eps, step_size=alpha, steps=steps, rule=FOSCRule(x, eps, c=-1.0)
    )
    lowest = torch.stack(
        [fosc_linf(p, input_grad(net, p, y), x, eps) for p in free.inputs[1:]], dim=1
    ).amin(1)
    ranked = lowest.sort().values
    c = (ranked[15] + ranked[16]).item() / 2
    rule = FOSCRule(x, eps, c=c)
    out = early_stopped_pgd(
        model, x, y, start, eps=eps, step_size=alpha, steps=steps, rule=rule, final_check=True
    )
    path = model.inputs  # x^0 .. x^K
    assert len(path) == steps + 1
    fosc = torch.stack([fosc_linf(p, input_grad(net, p, y), x, eps) for p in path], dim=1)
    stopped = 0
    for i in range(x.shape[0]):
        hits = [k for k in range(1, steps) if fosc[i, k] <= c]  # checked after each step
        first = hits[0] if hits else steps
        assert out.steps[i].item() == first
        for k in range(first + 1, steps + 1):  # never moves again
            assert torch.equal(path[k][i], path[first][i])
        for k in range(1, first + 1):  # moved at every step before
            assert not torch.equal(path[k][i], path[k - 1][i])
        stopped += int(first < steps)
    assert stopped == 16
    assert torch.allclose(rule.value, fosc[:, steps], atol=1e-5)  # FOSC of the produced examples


def test_perturbations_stay_in_the_eps_ball_and_pixel_range() -> None:
    net = small_net()
    x = torch.rand(32, 1, 8, 8)
    x[:8] = 0.0  # boundary pixels: the [0,1] clip must bind
    x[8:16] = 1.0
    y = torch.randint(0, 3, (32,))
    for eps, alpha, steps in [(0.1, 0.05, 5), (0.3, 0.5, 3), (8 / 255, 2 / 255, 10)]:
        for c in (-1.0, 0.05):
            start = random_start(x, eps)
            out = early_stopped_pgd(
                net, x, y, start, eps=eps, step_size=alpha, steps=steps, rule=FOSCRule(x, eps, c)
            )
            assert (out.x_adv - x).abs().max() <= eps + 1e-6
            assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1


def test_criterion_falls_linearly_to_zero_over_the_configured_epochs() -> None:
    values = [criterion_at(t, 0.5, 100) for t in range(120)]
    assert values[0] == 0.5
    assert values[50] == pytest.approx(0.25)
    steps = [a - b for a, b in itertools.pairwise(values[:101])]
    assert steps == pytest.approx([0.005] * 100)  # linear, reaching 0 at epoch 100
    assert values[100:] == [0.0] * 20  # then full PGD-K
    method = FOSC(
        make_ctx(small_net()),
        FOSCConfig(eps=0.1, steps=2, step_size=0.025, c_max=0.4, dynamic_epochs=4),
    )
    seen = []
    for epoch in range(6):
        method.start_epoch(epoch, None)
        seen.append(method.knobs(None)["c"])
    assert seen == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    assert method.knobs(None)["K"] == 2 and method.knobs(None)["alpha"] == 0.025


def test_passes_metrics_and_state_round_trip() -> None:
    counter = PassCounter()
    ctx = make_ctx(small_net(), counter)
    method = FOSC(ctx, FOSCConfig(eps=0.2, steps=3, step_size=0.05, c_max=0.05))
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 3, (20,))
    out = method.train_batch(Batch(x, y, torch.arange(20)), None)
    assert out.loss_sum.shape == () and 0 <= out.correct.item() <= 20
    # the full batch at K + 1 attack evaluations (the last measures FOSC) + the update
    assert (counter.forward, counter.backward) == (20 * 5, 20 * 5)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh = FOSC(make_ctx(small_net()), FOSCConfig(eps=0.2, steps=3, step_size=0.05))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    rows = method.metrics()
    assert fresh.metrics() == rows
    assert 0 <= rows["mean_steps"] <= 3 and 0 <= rows["stopped_fraction"] <= 1
    assert rows["mean_fosc"] >= -1e-6  # FOSC >= 0 from the clean origin (up to box clipping)
    assert set(method.metrics().values()) == {None}  # reset after each read
    c2 = PassCounter()
    no_final = FOSC(
        make_ctx(small_net(), c2),
        FOSCConfig(
            eps=0.2,
            steps=3,
            step_size=0.05,
            final_fosc=False,
        ),
    )
    no_final.train_batch(Batch(x, y, torch.arange(20)), None)
    assert (c2.forward, c2.backward) == (20 * 4, 20 * 4)


@pytest.mark.parametrize("final_fosc", [True, False])
def test_loss_weighting_quirk_weights_by_the_attack_mode_loss_from_the_second_epoch(
    final_fosc: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = PassCounter()
    method = FOSC(
        make_ctx(small_net(), counter),
        FOSCConfig(
            eps=0.2,
            steps=2,
            step_size=0.1,
            c_max=0.0,
            loss_weighting=True,
            final_fosc=final_fosc,
        ),
    )
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = method._weighted_update

    def spy(x_adv: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> StepOutput:
        with torch.no_grad():
            calls.append((weights, F.cross_entropy(method.ctx.model(x_adv), y, reduction="none")))
        return original(x_adv, y, weights)

    monkeypatch.setattr(method, "_weighted_update", spy)
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 3, (12,))
    method.start_epoch(0, None)
    method.train_batch(Batch(x, y, torch.arange(12)), None)
    assert calls == []  # epoch 0 is unweighted, as in the reference
    method.start_epoch(1, None)
    before = counter.forward
    method.train_batch(Batch(x, y, torch.arange(12)), None)
    ((weights, expected),) = calls
    assert torch.allclose(weights, expected, atol=1e-5)  # CE at the produced examples, eval mode
    attack = 2 + int(final_fosc)
    assert counter.forward - before == 12 * (attack + 1 + int(not final_fosc))


def test_weighted_update_minimises_the_weighted_mean() -> None:
    model = small_net()
    method = FOSC(make_ctx(model), FOSCConfig(eps=0.2, steps=1, step_size=0.1))
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    weights = torch.rand(6)
    reference = small_net()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    (weights * F.cross_entropy(reference(x), y, reduction="none")).mean().backward()
    opt.step()
    out = method._weighted_update(x, y, weights)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert out.loss_sum.item() == pytest.approx(
        F.cross_entropy(small_net()(x), y, reduction="sum").item(), rel=1e-5
    )


def test_config_defaults_follow_the_reference_rule_and_bad_values_fail() -> None:
    cfg = compose_resolved(["method=fosc"])
    m = cfg.method
    assert (m.name, m.steps, m.c_max, m.dynamic_epochs) == ("fosc", 10, 0.5, 100)
    assert m.step_size == pytest.approx(m.eps / 4)  # null -> eps / 4
    assert (m.fosc_origin, m.loss_weighting, m.final_fosc, m.attack_bn) == (
        "clean",
        False,
        True,
        "eval",
    )
    cifar = compose_resolved(["dataset=cifar10", "method=fosc"])
    assert cifar.method.step_size == pytest.approx(2 / 255)  # eps/4 = the CIFAR threat step
    assert compose_resolved(["method=fosc", "method.step_size=1/100"]).method.step_size == 0.01
    assert isinstance(build_method(m, make_ctx(small_net())), FOSC)
    for override, key in [
        ("method.fosc_origin=middle", "method.fosc_origin"),
        ("method.c_max=-0.1", "method.c_max"),
        ("method.dynamic_epochs=0", "method.dynamic_epochs"),
        ("method.steps=0", "method.steps"),
        ("method.step_size=0", "method.step_size"),
        ("method.eps=2", "method.eps"),
    ]:
        with pytest.raises(ConfigError) as info:
            compose_resolved(["method=fosc", override])
        assert info.value.key == key


def test_end_to_end_on_digits(tmp_path: Path) -> None:
    cfg = compose_resolved([*FAST, "method=fosc", "method.steps=2", "method.dynamic_epochs=2"])
    summary = Trainer(cfg, tmp_path).run()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["c"] for r in rows] == pytest.approx([0.5, 0.25])
    assert all(r["K"] == 2 and r["alpha"] == pytest.approx(0.05) for r in rows)  # eps/4
    for r in rows:
        assert 1 <= r["mean_steps"] <= 2 and 0 <= r["stopped_fraction"] <= 1
        assert r["mean_fosc"] >= 0
    # digits: 1238 training images (1438 less 200 validation); per image 2 + 1 attack passes and
    # 1 update, both epochs
    assert rows[-1]["forward_passes"] == rows[-1]["backward_passes"] == 1238 * 4 * 2
    assert summary["final"]["examples"] == 359
