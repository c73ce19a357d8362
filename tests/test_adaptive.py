"""schedule=adaptive: K chosen online as argmax of H = ||grad_theta loss(A_K x)||^2 - gamma K."""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from amata_runner import clock, engine
from amata_runner.adaptive import AdaptiveSchedule, choose
from amata_runner.criterion import ProbeBatch
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.interrupts import Preempted
from amata_runner.logging.metrics import read_rows
from amata_runner.passes import PassCounter
from conftest import FAST, compose_resolved

ADAPTIVE = ("method=pgd", "schedule=adaptive", "schedule.k_min=1", "schedule.probe_batch_size=32")


def run(tmp: Path, *overrides: str) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    return Trainer(compose_resolved([*FAST, *ADAPTIVE, *overrides]), tmp).run()


def test_choose_is_the_argmax_and_monotone_never_goes_down() -> None:
    h = {2: 1.0, 3: 1.5, 5: 1.2, 8: 1.5}
    assert choose(h, None, "monotone") == 3  # the first decision; ties go to the cheaper K
    assert choose(h, 4, "monotone") == 8  # 2 and 3 are below the current K: not allowed
    assert choose(h, 4, "free") == 3
    assert choose(h, 9, "monotone") == 9  # nothing at or above: keep K


def hand_h(model: torch.nn.Module, probe: ProbeBatch, k: int, tau: float, eps: float) -> float:
    """H(K) the long way: K sign steps of tau/K from the probe's start, then the gradient norm."""
    x, y, delta = probe.x, probe.y, probe.start.clone()
    for _ in range(k):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + tau / k * g.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    model.zero_grad()
    F.cross_entropy(model(x + delta), y).backward()
    norm = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
    model.zero_grad()
    return norm


def test_a_decision_takes_the_argmax_of_h_computed_by_hand() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(8, 1, 4, 4)
    probe = ProbeBatch(x=x, y=torch.arange(8) % 3, start=torch.zeros_like(x))
    counter = PassCounter()
    schedule = AdaptiveSchedule(
        candidates=[1, 2, 4],
        tau=0.3,
        gamma=0.01,
        eps=0.3,
        every=1,
        unit="epoch",
        mode="free",
        probes=[probe],
        iters_per_epoch=10,
        counter=counter,
    )
    control = schedule.decide(model, 0, 0)
    expected = {k: hand_h(model, probe, k, 0.3, 0.3) - 0.01 * k for k in (1, 2, 4)}
    assert schedule.last is not None
    assert schedule.last.h == pytest.approx(expected, rel=1e-6)
    assert control.steps == max(expected, key=lambda k: expected[k])
    assert control.step_size == pytest.approx(0.3 / control.steps)
    assert counter.forward == counter.backward == 8 * ((1 + 1) + (2 + 1) + (4 + 1))
    assert schedule.decide(model, 0, 5) == control  # not a decision point: nothing recomputed
    assert counter.forward == 8 * 10


def test_monotone_mode_never_lowers_k(monkeypatch: pytest.MonkeyPatch) -> None:
    preferences = iter([3, 1, 2, 5, 4, 1])  # the K the probe would prefer at each decision
    schedule = AdaptiveSchedule(
        candidates=[1, 2, 3, 4, 5],
        tau=0.3,
        gamma=0.0,
        eps=0.3,
        every=2,
        unit="iteration",
        mode="monotone",
        probes=[],
        iters_per_epoch=4,
    )

    def h(model: Any) -> dict[int, float]:
        best = next(preferences)
        return {k: -abs(k - best) for k in schedule.candidates}

    monkeypatch.setattr(schedule, "h_of_candidates", h)
    ks = [schedule.decide(None, i // 4, i % 4).steps for i in range(12)]  # type: ignore[arg-type]
    assert ks == [3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 5]
    assert all(a <= b for a, b in itertools.pairwise(ks))


def test_the_probe_runs_on_the_train_clock_and_its_passes_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = {"t": 0.0}
    monkeypatch.setattr(clock, "perf_counter", lambda: now["t"])
    real = AdaptiveSchedule.h_of_candidates

    def slow_probe(self: AdaptiveSchedule, model: Any) -> dict[int, float]:
        now["t"] += 100.0
        return real(self, model)

    monkeypatch.setattr(AdaptiveSchedule, "h_of_candidates", slow_probe)
    summary = run(tmp_path, "epochs=2", "schedule.candidates=[1,3]")
    assert summary["train_seconds"] == 200.0  # two decisions; the batches take no fake time
    rows = read_rows(tmp_path / "metrics.jsonl")
    probe = 2 * 32 * ((1 + 1) + (3 + 1))  # 2 probe batches of 32, candidates K=1 and K=3
    per_epoch = summary["examples"] // 2
    training = sum((r["K"] + 1) * per_epoch for r in rows)  # PGD-K training: K+1 passes each
    assert summary["forward_passes"] == training + 2 * probe
    assert all("H_K1" in r and "H_K3" in r and r["adaptive_choice"] == r["K"] for r in rows)


def test_adaptive_runs_resume_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("schedule.unit=iteration", "schedule.every=5", "eval.unit=iteration", "eval.every=6")
    reference = run(tmp_path / "ref", *args)
    calls = {"n": 0}
    original = engine.Trainer._add_loss

    def add_loss(self: Trainer, loss_sum: torch.Tensor) -> None:
        original(self, loss_sum)
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(engine.Trainer, "_add_loss", add_loss)
        with pytest.raises(Preempted):
            run(tmp_path / "cut", *args)
    resumed = run(tmp_path / "cut", *args, "resume=true")
    strip = [
        {k: v for k, v in r.items() if k != "train_seconds"}
        for r in read_rows(tmp_path / "ref" / "metrics.jsonl")
    ]
    again = [
        {k: v for k, v in r.items() if k != "train_seconds"}
        for r in read_rows(tmp_path / "cut" / "metrics.jsonl")
    ]
    assert again == strip
    assert resumed["final"] == reference["final"]
    assert resumed["forward_passes"] == reference["forward_passes"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("schedule.mode=greedy", "schedule.mode"),
        ("schedule.gamma=-1", "schedule.gamma"),
        ("schedule.candidates=[0,2]", "schedule.candidates"),
        ("schedule.every=0", "schedule.every"),
        ("schedule.probe_batches=0", "schedule.probe_batches"),
    ],
)
def test_bad_adaptive_settings_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_resolved([*ADAPTIVE, override])
    assert info.value.key == key
