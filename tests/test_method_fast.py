"""Fast (FGSM-RS) and Amata+Fast: the 1.25 eps step from a random start, the weak fixed start, the
early stop on catastrophic overfitting, the cyclic LR config, and end-to-end runs."""

from __future__ import annotations

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
from amata_runner.methods.fast import Fast, FastConfig, fgsm_delta
from conftest import FAST, compose_resolved, cpu_context

N_DIGITS = 1238  # digits training examples (1438 less 200 validation); batch 128 -> 10 per epoch
EPS = 0.1
ORIGINAL = Control(steps=1, step_size=1.25 * EPS, strength=1.0)
WEAK = Control(steps=1, step_size=1.25 * EPS, strength=0.0)
SIGNS = torch.tensor([1.0, -1.0]).repeat(8).reshape(1, 1, 4, 4)


def signed_linear(signs: torch.Tensor = SIGNS) -> nn.Module:
    """Two logits +-s.x with s = +1/-1 per pixel: for label 0 the input gradient's sign is -s."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False))
    s = signs.flatten()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([s, -s]))
    return model


def context(model: nn.Module, lr: float = 0.0) -> TrainContext:
    return cpu_context(model, lr=lr, num_train=256, iters_per_epoch=4, epochs=4)


def robust_linear() -> nn.Module:
    """Logits +-sum(x): label 0 wins by 2|x|_1 >= 9.6 on [0.3, 0.7] pixels, and an eps = 0.1
    perturbation moves the margin by at most 2 * 16 * eps = 3.2, so robust accuracy is 1."""
    return signed_linear(torch.ones(16))


def fast(model: nn.Module, **kw: object) -> Fast:
    settings: dict[str, object] = {"early_stop_step_size": 2 / 255, **kw}
    config = FastConfig(eps=EPS, step_size=1.25 * EPS, **settings)  # type: ignore[arg-type]
    return Fast(context(model), config)


def batch(b: int = 256) -> Batch:
    """Pixels in [0.3, 0.7]: no start or step is clipped by the image box."""
    x = 0.3 + 0.4 * torch.rand(b, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return Batch(x, torch.zeros(b, dtype=torch.long), torch.arange(b))


def record_inputs(model: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


def test_fgsm_step_is_1_25_eps_before_projection() -> None:
    model, b = signed_linear(), batch(8)
    start = torch.empty_like(b.x).uniform_(-EPS, EPS)
    stepped = fgsm_delta(model, b.x, b.y, start, 1.25 * EPS)
    torch.testing.assert_close(stepped, start - 1.25 * EPS * SIGNS)  # the loss-ascent sign, -s


def test_fast_steps_1_25_eps_from_a_uniform_random_start_in_the_ball() -> None:
    model, b = signed_linear(), batch()
    method = fast(model)
    seen = record_inputs(model)
    method.train_batch(b, ORIGINAL)
    start, trained = seen[0] - b.x, seen[1] - b.x  # the FGSM forward, then the update's
    # a random start inside the eps-ball, spread over it (uniform: mean 0, std eps / sqrt 3)
    assert start.abs().max() <= EPS + 1e-6
    assert abs(start.mean().item()) < 0.01
    assert math.isclose(start.std().item(), EPS / math.sqrt(3), rel_tol=0.05)
    # the update sees the start moved by alpha = 1.25 eps along the sign, projected to the ball
    torch.testing.assert_close(trained, (start - 1.25 * EPS * SIGNS).clamp(-EPS, EPS))
    # so it ends on the far face wherever start +- 1.25 eps leaves the ball: P = 1.25 / 2
    on_face = (trained.abs() - EPS).abs() < 1e-6
    assert math.isclose(on_face.float().mean().item(), 0.625, abs_tol=0.04)
    assert (method.ctx.counter.forward, method.ctx.counter.backward) == (2 * 256, 2 * 256)


def test_start_is_clipped_to_the_image() -> None:
    x = torch.zeros(4, 1, 4, 4)
    assert fast(signed_linear()).start(x, weak=False).min() >= 0.0
    assert fast(signed_linear(), clamp_start=False).start(x, weak=False).min() < 0.0


def test_weak_phase_starts_from_a_fixed_non_zero_point() -> None:
    model, b = signed_linear(), batch(8)
    method = fast(model, weak_init=0.5)
    seen = record_inputs(model)
    method.train_batch(b, WEAK)
    method.train_batch(b, WEAK)
    for start in (seen[0] - b.x, seen[2] - b.x):  # the same start every time
        torch.testing.assert_close(start, torch.full_like(b.x, 0.5 * EPS))
    # +eps where the sign is +, (0.5 - 1.25) eps = -0.75 eps where it is -
    expected = torch.where(SIGNS < 0, torch.tensor(EPS), torch.tensor(-0.75 * EPS))
    torch.testing.assert_close(seen[1] - b.x, expected.expand_as(b.x))
    assert method.knobs(WEAK) == {"alpha": 1.25 * EPS, "weak_start": 1}
    assert method.knobs(ORIGINAL) == {"alpha": 1.25 * EPS, "weak_start": 0}


def test_early_stop_on_collapse_restores_the_previous_weights() -> None:
    model, b = robust_linear(), batch(16)
    method = fast(model, early_stop=True, early_stop_steps=5, early_stop_step_size=0.025)
    good = {k: v.clone() for k, v in model.state_dict().items()}

    method.start_epoch(0, ORIGINAL)
    method.train_batch(b, ORIGINAL)  # lr 0: the weights stay as they are, robust
    assert method.stop_requested() is False
    assert method.metrics() == {"early_stop_robust_acc": 1.0}
    assert method.state_dict() == {"prev_robust_acc": 1.0}

    method.start_epoch(1, ORIGINAL)
    method.train_batch(b, ORIGINAL)
    with torch.no_grad():  # simulate catastrophic overfitting: the weights turn against label 0
        model[1].weight.neg_()
    before = method.ctx.counter.forward
    assert method.stop_requested() is True
    assert method.metrics() == {"early_stop_robust_acc": 0.0}
    for key, value in model.state_dict().items():
        assert torch.equal(value, good[key]), key  # the previous epoch's weights are back
    # the check's cost: PGD-5 (5 forwards) and one forward on the 16 examples of the first batch
    assert method.ctx.counter.forward - before == 6 * 16


def test_early_stop_state_resumes_with_the_checkpointed_weights_kept() -> None:
    model, b = robust_linear(), batch(16)
    method = fast(model, early_stop=True)
    method.start_epoch(0, ORIGINAL)
    method.train_batch(b, ORIGINAL)
    method.stop_requested()
    resumed_model = robust_linear()  # the engine loads the checkpoint's model first
    resumed = fast(resumed_model, early_stop=True)
    resumed.load_state_dict(method.state_dict())
    assert resumed.prev_robust_acc == 1.0
    with torch.no_grad():
        resumed_model[1].weight.neg_()  # a collapse in the next epoch
    resumed.start_epoch(1, ORIGINAL)
    resumed.train_batch(b, ORIGINAL)
    assert resumed.stop_requested() is True
    assert torch.equal(resumed_model[1].weight, model[1].weight)


def test_early_stop_ignores_a_small_drop_and_is_off_by_default() -> None:
    model, b = robust_linear(), batch(16)
    method = fast(model, early_stop=True)
    method.start_epoch(0, ORIGINAL)
    method.train_batch(b, ORIGINAL)
    assert method.stop_requested() is False
    method.prev_robust_acc = 1.1  # a drop of 0.1 <= 0.2: keep going
    method.start_epoch(1, ORIGINAL)
    method.train_batch(b, ORIGINAL)
    assert method.stop_requested() is False

    off = fast(robust_linear())
    off.start_epoch(0, ORIGINAL)
    off.train_batch(b, ORIGINAL)
    with torch.no_grad():
        off.ctx.model[1].weight.neg_()
    assert off.stop_requested() is False and off.metrics() == {} and off.state_dict() == {}


def test_fast_config_derives_alpha_1_25_eps() -> None:
    cfg = compose_resolved(["method=fast", "method.eps=8/255"])
    assert math.isclose(cfg.method.step_size, 10 / 255)
    controls = build_schedule(cfg, 15, 12).epoch_controls()
    assert {(c.steps, c.strength) for c in controls} == {(1, 1.0)}  # always the original start
    assert cfg.method.early_stop is False  # the reference's default


@pytest.mark.parametrize("name", ["fast", "amata_fast"])
def test_fast_configs_select_the_cyclic_lr(name: str) -> None:
    cifar = compose_resolved([f"method={name}", "dataset=cifar10"])
    assert (cifar.optim.lr_schedule, cifar.optim.lr, cifar.optim.cycle_momentum) == (
        "cyclic",
        0.2,  # the reference's CIFAR10 peak
        True,
    )
    assert compose_resolved([f"method={name}"]).optim.lr == 0.05  # digits: 0.2 collapses
    assert compose_resolved([f"method={name}", "optim.lr=0.1"]).optim.lr == 0.1


def test_amata_fast_is_weak_then_original() -> None:
    cfg = compose_resolved(["method=amata_fast", "epochs=15"])
    controls = build_schedule(cfg, 15, 12).epoch_controls()
    assert [c.strength for c in controls] == [0.0] * 5 + [1.0] * 10
    assert {c.steps for c in controls} == {1}
    method = build_method(cfg.method, context(signed_linear()))
    assert [method.knobs(c)["weak_start"] for c in controls] == [1] * 5 + [0] * 10
    x = torch.full((2, 1, 4, 4), 0.5)
    weak = method.start(x, method.is_weak(controls[0]))
    torch.testing.assert_close(weak, torch.full_like(x, 0.5 * cfg.method.eps))  # fixed, non-zero
    random = method.start(x, method.is_weak(controls[-1]))
    assert random.unique().numel() > 1 and random.abs().max() <= cfg.method.eps


def test_fast_end_to_end_with_early_stop(tmp_path: Path) -> None:
    cfg = compose_resolved([*FAST, "method=fast", "method.early_stop=true"])
    summary = Trainer(cfg, tmp_path).run()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert all(r["alpha"] == 0.25 and r["weak_start"] == 0 for r in rows)  # 1.25 * eps 0.2
    assert all(0.0 <= r["early_stop_robust_acc"] <= 1.0 for r in rows)
    # 2 passes per example per epoch, plus the check (PGD-5 + 1 forward) on one batch per epoch
    epochs = summary["epochs"]
    assert summary["forward_passes"] == epochs * (2 * N_DIGITS + 6 * 128)
    assert summary["backward_passes"] == epochs * (2 * N_DIGITS + 5 * 128)


def test_amata_fast_end_to_end(tmp_path: Path) -> None:
    cfg = compose_resolved([*FAST, "method=amata_fast", "schedule.switch=1"])
    summary = Trainer(cfg, tmp_path).run()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["weak_start"] for r in rows] == [1, 0]
    assert summary["forward_passes"] == summary["backward_passes"] == 2 * 2 * N_DIGITS


def test_the_validation_check_leaves_batchnorm_statistics_untouched() -> None:
    """Held-out images judge the model; they must not update its running statistics."""
    from amata_runner.methods.fast import Fast, FastConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 16, 2),
    )
    ctx = cpu_context(model, image_shape=(1, 4, 4))
    ctx.validation_batch = (
        torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8),
        torch.randint(0, 2, (8,)),
    )
    fast = Fast(
        ctx,
        FastConfig(
            eps=0.1,
            step_size=0.125,
            attack_bn="train",
            early_stop=True,
            early_stop_step_size=2 / 255,
        ),
    )
    fast._in_epoch = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast.stop_requested()
    assert fast._checked is not None  # the check ran
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
