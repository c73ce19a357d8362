"""ATTA: per-example perturbations kept across epochs, through augmentation, reset on schedule."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from amata_runner import engine
from amata_runner.attacks.linf import project_delta
from amata_runner.build import build_schedule
from amata_runner.data import Batch, DeviceLoader, ImageSet
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.logging.metrics import read_rows
from amata_runner.methods import build_method
from amata_runner.methods.atta import ATTA, ATTAConfig
from amata_runner.methods.registry import method_spec
from conftest import FAST, compose_resolved, cpu_context

SHAPE = (3, 8, 8)
N = 40
EPS = 0.1


def make_loader(augment: str, seed: int = 0) -> DeviceLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, *SHAPE), generator=g, dtype=torch.uint8)
    images[: N // 2, :, :2] = 0  # saturated pixels, so clipping to [0,1] matters
    images[N // 2 :, :, -2:] = 255
    labels = torch.randint(0, 10, (N,), generator=g)
    return DeviceLoader(
        ImageSet(images, labels), 16, "cpu", shuffle=True, drop_last=False, augment=augment, seed=1
    )


def make_method(seed: int = 0, **kwargs: Any) -> ATTA:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SHAPE[0] * SHAPE[1] * SHAPE[2], 10))
    ctx = cpu_context(
        model, lr=0.5, num_train=N, image_shape=SHAPE, num_classes=10, iters_per_epoch=3, epochs=10
    )
    args: dict[str, Any] = {"eps": EPS, "steps": 2, "step_size": 0.04, "reset": 100, **kwargs}
    return ATTA(ctx, ATTAConfig(**args))


def clean_images(loader: DeviceLoader) -> torch.Tensor:
    return loader._images.float() / 255  # the un-augmented frame the perturbations live in


def record_attacks(method: ATTA) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wrap ``method.attack`` to log (start, end) perturbations in the batch frame."""
    log: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = method.attack

    def attack(x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        end = original(x, y, delta)
        log.append((delta.clone(), end.clone()))
        return end

    method.attack = attack  # type: ignore[method-assign]
    return log


def run_epoch(method: ATTA, loader: DeviceLoader, epoch: int) -> list[Batch]:
    method.start_epoch(epoch, None)
    batches = list(loader)
    for batch in batches:
        method.train_batch(batch, None)
    return batches


# ------------------------------------------------------------------ the stored perturbations
@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_perturbations_survive_an_epoch_through_the_new_augmentation(augment: str) -> None:
    loader, method = make_loader(augment), make_method()
    initial = method.delta.clone()
    run_epoch(method, loader, 0)
    after_epoch_1 = method.delta.clone()
    assert not torch.equal(after_epoch_1, initial)  # the attack moved them

    log = record_attacks(method)
    batches = run_epoch(method, loader, 1)
    seen = torch.zeros(N, dtype=torch.bool)
    for batch, (start, end) in zip(batches, log, strict=True):
        stored = after_epoch_1[batch.index]
        moved = stored if batch.crop is None else batch.crop.apply(stored)
        # epoch 2 starts from epoch 1's end perturbation, moved through epoch 2's crop + flip
        # (and clipped around x: a no-op but for init noise no epoch-1 crop had reached)
        torch.testing.assert_close(start, project_delta(moved, batch.x, EPS), atol=1e-6, rtol=0)
        back = end if batch.crop is None else batch.crop.invert(end, stored)
        assert torch.equal(method.delta[batch.index], back)  # and stores its own end back
        seen[batch.index] = True
    assert seen.all()
    if augment == "crop_flip":  # the crops really differ between the two epochs
        assert any(b.crop.flip.any() and not b.crop.flip.all() for b in batches)


@pytest.mark.parametrize(("augment", "init_std"), [("crop_flip", 0.0), ("none", 0.001)])
def test_stored_perturbations_stay_in_the_ball_and_in_range(augment: str, init_std: float) -> None:
    """In the un-augmented frame: |delta| <= eps and x + delta in [0,1] for every example.

    (With crops and init noise, pixels no crop has reached since the last reset still hold the
    raw noise, which is clipped whenever it is used; init_std=0 isolates the attack's values.)
    """
    loader, method = make_loader(augment), make_method(init_std=init_std)
    x = clean_images(loader)
    for epoch in range(3):
        run_epoch(method, loader, epoch)
        delta = method.delta
        assert delta.abs().max() <= EPS + 1e-6
        assert (x + delta).min() >= -1e-6 and (x + delta).max() <= 1 + 1e-6
        assert delta.abs().max() > 0.5 * EPS  # not trivially zero
    saturated = delta[: N // 2, :, :2]  # black rows: only non-negative perturbations survive
    assert saturated.min() >= -1e-6


def test_reset_restarts_from_noise_or_zero() -> None:
    method = make_method(init_std=0.001)
    assert 0.0008 < method.delta.std() < 0.0012 and method.resets == 0
    method.delta.fill_(0.05)
    method.start_epoch(4, None)  # 1-based epoch 5: 5 % 100 != 0, kept
    assert (method.delta == 0.05).all()
    method.start_epoch(99, None)  # 1-based epoch 100: reset
    assert 0.0008 < method.delta.std() < 0.0012 and method.resets == 1
    zero = make_method(init_std=0.0)
    zero.delta.fill_(0.05)
    zero.reset_perturbations()
    assert (zero.delta == 0).all()


def reset_epochs(overrides: list[str], epochs: int) -> tuple[list[int], list[int]]:
    """(0-based epochs at whose start the stored perturbations were reset, the reset periods)."""
    cfg = compose_resolved(overrides)
    method = build_method(cfg.method, make_method().ctx)
    schedule = build_schedule(cfg, epochs, 3)
    resets, periods = [], []
    for epoch in range(epochs):
        before = method.delta.clone()
        control = schedule.at(epoch)
        method.start_epoch(epoch, control)
        periods.append(method.knobs(control)["reset"])
        if not torch.equal(before, method.delta):
            resets.append(epoch)
    return resets, periods


def test_resets_follow_the_reference_rule_and_the_amata_schedule() -> None:
    # ATTA: before 1-based epochs 3, 6, 9 (e % reset == 0), the attack's K = 3 notwithstanding
    resets, periods = reset_epochs(["method=atta", "method.reset=3", "method.steps=4"], 10)
    assert resets == [2, 5, 8] and periods == [3] * 10
    # the reference default (10 of 38 epochs): 1-based 10, 20, 30
    resets, _ = reset_epochs(["method=atta", "epochs=38"], 38)
    assert resets == [9, 19, 29]
    # Amata+ATTA: reset = 2 during the first five epochs (1-based 2, 4), then 10 (10, 20)
    resets, periods = reset_epochs(["method=amata_atta", "epochs=25"], 25)
    assert resets == [1, 3, 9, 19]
    assert periods == [2] * 5 + [10] * 20


def test_composition_schedule_drives_only_the_reset_period() -> None:
    plain = compose_resolved(["method=atta", "dataset.threat.steps=3"])
    assert (plain.method.steps, plain.method.reset) == (3, 10)
    k_max = method_spec(plain.method.name).k_max(plain)  # K_max: method.reset, ATTA's knob
    assert (plain.schedule.name, plain.schedule.k_min, k_max) == ("constant", 10, 10)
    controls = build_schedule(plain, 15, 12).epoch_controls()
    assert {c.steps for c in controls} == {10}  # the reset period, not the attack's K = 3

    amata = compose_resolved(["method=amata_atta", "epochs=38", "method.reset=8"])
    assert (amata.method.name, amata.schedule.name, amata.schedule.switch) == (
        "amata_atta",
        "step",
        5,
    )
    controls = build_schedule(amata, 38, 12).epoch_controls()
    assert [c.steps for c in controls] == [2] * 5 + [8] * 33
    method = build_method(amata.method, make_method().ctx)
    for control in (controls[0], controls[-1]):  # the attack's K and alpha never move
        knobs = method.knobs(control)
        assert (knobs["K"], knobs["alpha"]) == (amata.method.steps, amata.method.step_size)

    # another schedule anneals the reset period the same way
    linear = compose_resolved(["method=atta", "schedule=linear", "epochs=9"])
    assert [c.steps for c in build_schedule(linear, 9, 1).epoch_controls()][::4] == [2, 6, 9]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.reset=0", "method.reset"),
        ("method.steps=0", "method.steps"),
        ("method.init_std=-0.1", "method.init_std"),
        ("method.eps=0", "method.eps"),
        ("method.attack_bn=frozen", "method.attack_bn"),
    ],
)
def test_bad_settings_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_resolved(["method=atta", override])


def test_fraction_budgets_are_parsed() -> None:
    cfg = compose_resolved(["method=amata_atta", "method.eps=8/255", "method.step_size=2/255"])
    assert cfg.method.eps == pytest.approx(8 / 255)
    assert cfg.method.step_size == pytest.approx(2 / 255)


# ------------------------------------------------------------------ update, passes, state
def test_extra_batch_division_quirk_scales_the_data_gradient_by_one_over_b() -> None:
    loader = make_loader("none")
    batch = next(iter(loader))
    steps = {}
    for quirk in (False, True):
        method = make_method(init_std=0.0, extra_batch_division=quirk)
        before = [p.detach().clone() for p in method.ctx.model.parameters()]
        out = method.train_batch(batch, None)
        after = list(method.ctx.model.parameters())
        steps[quirk] = [a.detach() - b for a, b in zip(after, before, strict=True)]
        assert out.loss_sum > 0  # the plain summed CE either way
    b = batch.x.shape[0]
    for plain, quirk in zip(steps[False], steps[True], strict=True):
        torch.testing.assert_close(quirk * b, plain, rtol=1e-4, atol=1e-6)


def test_passes_and_state_round_trip() -> None:
    loader = make_loader("crop_flip")
    method = make_method(steps=3)
    run_epoch(method, loader, 0)
    assert method.ctx.counter.forward == method.ctx.counter.backward == N * (3 + 1)
    method.reset_perturbations()
    run_epoch(method, loader, 1)

    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = make_method(seed=5)
    assert not torch.equal(fresh.delta, method.delta)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.delta, method.delta) and fresh.resets == method.resets == 1
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict({"delta": torch.zeros(3, *SHAPE), "resets": 0})


# ------------------------------------------------------------------ end to end
class Crash(Exception):
    pass


def test_atta_end_to_end_and_exact_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [*FAST, "method=atta", "method.reset=2"]  # reset before epoch 2
    (tmp_path / "ref").mkdir()
    (tmp_path / "split").mkdir()
    summary = Trainer(compose_resolved(args), tmp_path / "ref").run()
    n, k = 1238, 3  # digits training examples (less 200 validation); K = dataset.threat.steps
    assert summary["forward_passes"] == summary["backward_passes"] == 2 * n * (k + 1)
    rows = read_rows(tmp_path / "ref" / "metrics.jsonl")
    assert [(r["K"], r["reset"], r["atta_resets"]) for r in rows] == [(3, 2, 0.0), (3, 2, 1.0)]
    ref = torch.load(tmp_path / "ref" / "last.ckpt", weights_only=True)
    assert ref["method"]["delta"].shape == (n, 1, 28, 28)

    calls = {"n": 0}
    original = engine.Trainer.control

    def control(self: Trainer, epoch: int, iteration: int = 0) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:  # crash as epoch 2 starts
            raise Crash
        return original(self, epoch, iteration)

    with monkeypatch.context() as patch:
        patch.setattr(engine.Trainer, "control", control)
        with pytest.raises(Crash):
            Trainer(compose_resolved(args), tmp_path / "split").run()
    resumed = Trainer(compose_resolved([*args, "resume=true"]), tmp_path / "split").run()
    assert resumed["final"] == summary["final"]
    new = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    assert torch.equal(new["method"]["delta"], ref["method"]["delta"])


def test_amata_atta_end_to_end(tmp_path: Path) -> None:
    # switch 1 so both phases fit in FAST's two epochs: reset period 2 then 10
    cfg = compose_resolved([*FAST, "method=amata_atta", "schedule.switch=1"])
    summary = Trainer(cfg, tmp_path).run()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [(r["K"], r["reset"]) for r in rows] == [(3, 2), (3, 10)]
    assert summary["method"] == "amata_atta" and summary["final"]["examples"] == 359


def test_atta_with_crop_flip_end_to_end(tmp_path: Path) -> None:
    cfg = compose_resolved(
        [
            *FAST,
            "method=atta",
            "dataset=synthetic",
            "dataset.channels=3",
            "dataset.image_size=32",
            "dataset.augment=crop_flip",
            "model=preactresnet18",
            "dataset.num_train=64",
            "dataset.num_test=32",
            "eval.validation.size=0",
            "batch_size=32",
            "epochs=2",
            "dataset.threat.steps=1",
            "eval.attack.steps=1",
            "eval.final_attacks=[pgd1]",
        ]
    )
    summary = Trainer(cfg, tmp_path).run()
    assert summary["forward_passes"] == 2 * 64 * (1 + 1)
    delta = torch.load(tmp_path / "last.ckpt", weights_only=True)["method"]["delta"]
    assert delta.shape == (64, 3, 32, 32)
    assert delta.abs().max() <= cfg.method.eps + 1e-6
    # one step of alpha per epoch from 0.001 noise: attacked pixels were stored back
    assert delta.abs().max() > cfg.method.step_size
