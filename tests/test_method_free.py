"""Free-m and Amata+Free: m updates per batch, a carried perturbation, divided epochs, the knobs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from amata_runner.build import build_schedule
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.engine import Trainer
from amata_runner.logging.metrics import read_rows
from amata_runner.methods import build_method
from amata_runner.methods.base import TrainContext
from amata_runner.methods.free import Free, FreeConfig
from conftest import FAST, compose_resolved, cpu_context

N_DIGITS = 1238  # digits training examples (1438 less 200 validation); batch 128 -> 10 per epoch
EPS = 0.1


def signed_linear(pixels: int = 16) -> nn.Module:
    """Two logits +-s.x with s = +1/-1 per pixel: for label 0 the input gradient's sign is -s."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 2, bias=False))
    s = torch.tensor([1.0, -1.0]).repeat(pixels // 2)
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([s, -s]))
    return model


def context(model: nn.Module, lr: float = 0.0) -> TrainContext:
    return cpu_context(model, lr=lr, iters_per_epoch=4, epochs=4)


def batch(b: int, seed: int) -> Batch:
    x = 0.3 + 0.4 * torch.rand(b, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return Batch(x, torch.zeros(b, dtype=torch.long), torch.arange(b))


def record_inputs(model: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("m", [1, 3, 5])
def test_free_makes_m_parameter_updates_per_batch(m: int) -> None:
    ctx = context(signed_linear(), lr=0.1)
    steps: list[int] = []
    ctx.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    method = Free(ctx, FreeConfig(eps=EPS, steps=m))
    before = ctx.model[1].weight.detach().clone()
    method.train_batch(batch(8, 0), Control(steps=m, step_size=EPS))
    assert len(steps) == m
    assert not torch.equal(before, ctx.model[1].weight)
    # every replay is one forward and one backward of the batch
    assert (ctx.counter.forward, ctx.counter.backward) == (m * 8, m * 8)
    method.train_batch(batch(8, 1), Control(steps=m, step_size=EPS))
    assert len(steps) == 2 * m


def test_perturbation_is_carried_across_replays_and_batches() -> None:
    # lr 0 keeps the weights, so every input gradient has the known sign -s.
    model = signed_linear()
    ctx = context(model)
    method = Free(ctx, FreeConfig(eps=EPS, steps=2))
    seen = record_inputs(model)
    alpha = 0.04
    s = torch.tensor([1.0, -1.0]).repeat(8).reshape(1, 1, 4, 4)
    first, second = batch(4, 0), batch(4, 1)

    method.train_batch(first, Control(steps=2, step_size=alpha))
    assert torch.equal(seen[0], first.x)  # delta starts at zero
    torch.testing.assert_close(seen[1], first.x - alpha * s)  # one sign step later
    end_of_first = method.delta.clone()
    torch.testing.assert_close(end_of_first, (-2 * alpha * s).expand(4, 1, 4, 4))

    method.train_batch(second, Control(steps=2, step_size=alpha))
    # batch 2 starts exactly where batch 1 ended ...
    torch.testing.assert_close(seen[2], (second.x + end_of_first).clamp(0, 1))
    # ... and its next step is clipped to the eps-ball: -3 alpha = -0.12 -> -0.1
    torch.testing.assert_close(seen[3], second.x - EPS * s)
    torch.testing.assert_close(method.delta, (-EPS * s).expand(4, 1, 4, 4))


def test_a_smaller_batch_uses_and_updates_only_the_first_rows() -> None:
    ctx = context(signed_linear(), lr=0.05)
    method = Free(ctx, FreeConfig(eps=EPS, steps=1))
    method.train_batch(batch(4, 0), Control(steps=1, step_size=0.03))
    before = method.delta.clone()
    method.train_batch(batch(2, 1), Control(steps=1, step_size=0.03))
    assert method.delta.shape[0] == 4
    assert torch.equal(method.delta[2:], before[2:])
    assert not torch.equal(method.delta[:2], before[:2])
    assert method.delta.abs().max() <= EPS + 1e-7


def test_clamp_delta_to_image_keeps_the_state_in_range() -> None:
    ctx = context(signed_linear())
    method = Free(ctx, FreeConfig(eps=0.3, steps=1, clamp_delta_to_image=True))
    b = Batch(torch.full((2, 1, 4, 4), 0.05), torch.zeros(2, dtype=torch.long), torch.arange(2))
    method.train_batch(b, Control(steps=1, step_size=0.3))
    assert (b.x + method.delta).min() >= 0.0
    plain = Free(context(signed_linear()), FreeConfig(eps=0.3, steps=1))
    plain.train_batch(b, Control(steps=1, step_size=0.3))
    assert (b.x + plain.delta).min() < 0.0  # only the eps-ball, as the paper's PyTorch code


def test_epochs_are_divided_by_m() -> None:
    free = Free(context(signed_linear()), FreeConfig(eps=EPS, steps=4))
    assert [free.epochs(e) for e in (1, 2, 4, 10, 22, 90)] == [1, 1, 1, 3, 6, 23]
    fixed = Free(context(signed_linear()), FreeConfig(eps=EPS, steps=4, divide_epochs=False))
    assert fixed.epochs(22) == 22


def test_free_config_is_the_constant_free_4_baseline() -> None:
    cfg = compose_resolved(["method=free", "epochs=22"])
    method = build_method(cfg.method, context(signed_linear()))
    assert method.epochs(22) == 6
    controls = build_schedule(cfg, 6, 12).epoch_controls()
    assert {(c.steps, c.step_size) for c in controls} == {(4, cfg.method.eps)}  # alpha = eps
    assert method.knobs(controls[0]) == {"m": 4, "alpha": cfg.method.eps}


def test_amata_free_raises_m_from_2_to_4_and_halves_alpha() -> None:
    cfg = compose_resolved(["method=amata_free", "epochs=22"])
    method = build_method(cfg.method, context(signed_linear()))
    assert method.epochs(22) == 22  # the paper's fixed 22 epochs, not divided
    controls = build_schedule(cfg, 22, 12).epoch_controls()
    ms = [c.steps for c in controls]
    alphas = [c.step_size for c in controls]
    eps = cfg.method.eps
    assert ms[0] == 2 and ms[-1] == 4 and set(ms) == {2, 3, 4}
    assert all(a <= b for a, b in itertools.pairwise(ms))
    assert math.isclose(alphas[0], 2 * eps) and math.isclose(alphas[-1], eps)
    assert math.isclose(alphas[0], 2 * alphas[-1])  # "decrease the step size by two times"
    assert all(math.isclose(m * a, 4 * eps) for m, a in zip(ms, alphas, strict=True))


def test_free_end_to_end(tmp_path: Path) -> None:
    summary = Trainer(compose_resolved([*FAST, "method=free"]), tmp_path).run()
    assert summary["epochs"] == 1  # ceil(2 / 4)
    assert summary["iterations"] == 10
    assert summary["forward_passes"] == summary["backward_passes"] == 4 * N_DIGITS
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [(r["m"], r["alpha"]) for r in rows] == [(4, 0.2)]
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    delta = state["method"]["delta"]
    assert delta.shape == (128, 1, 28, 28) and 0 < delta.abs().max() <= 0.2 + 1e-6


def test_amata_free_end_to_end(tmp_path: Path) -> None:
    summary = Trainer(compose_resolved([*FAST, "method=amata_free"]), tmp_path).run()
    assert summary["epochs"] == 2
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["m"] for r in rows] == [2, 3]  # linear from 2 towards 4 over 2 epochs
    assert summary["forward_passes"] == (2 + 3) * N_DIGITS


def test_carried_perturbation_survives_a_checkpoint() -> None:
    method = Free(context(signed_linear(), lr=0.05), FreeConfig(eps=EPS, steps=2))
    method.train_batch(batch(4, 0), Control(steps=2, step_size=0.03))
    resumed = Free(context(signed_linear(), lr=0.05), FreeConfig(eps=EPS, steps=2))
    resumed.load_state_dict(method.state_dict())
    assert torch.equal(resumed.delta, method.delta)
