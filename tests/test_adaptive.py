"""schedule=adaptive: K chosen online, by adequacy (the smallest K whose
g(K) = ||grad_theta loss(A_K x)||^2 reaches (1 - epsilon) max g) or by the hamiltonian (the argmax
of H = g(K) - gamma K)."""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from amata_runner import engine
from amata_runner.control.adaptive import AdaptiveSchedule, build_adaptive, choose
from amata_runner.control.criterion import ProbeBatch
from amata_runner.data.datasets import load_digits
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.logging.metrics import read_rows
from amata_runner.runtime import clock
from amata_runner.runtime.interrupts import Preempted
from amata_runner.runtime.passes import PassCounter
from conftest import FAST, compose_resolved

ADAPTIVE = ("method=pgd", "schedule=adaptive", "schedule.k_min=1", "schedule.probe_batch_size=32")
# The first design's settings: H's argmax, a decision every epoch, two probe batches.
HAMILTONIAN = ("schedule.rule=hamiltonian", "schedule.every=1", "schedule.probe_batches=2")


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
        rule="hamiltonian",
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
        rule="hamiltonian",
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
    summary = run(tmp_path, *HAMILTONIAN, "epochs=2", "schedule.candidates=[1,3]")
    assert summary["train_seconds"] == 200.0  # two decisions; the batches take no fake time
    rows = read_rows(tmp_path / "metrics.jsonl")
    probe = 2 * 32 * ((1 + 1) + (3 + 1))  # 2 probe batches of 32, candidates K=1 and K=3
    per_epoch = summary["examples"] // 2
    training = sum((r["K"] + 1) * per_epoch for r in rows)  # PGD-K training: K+1 passes each
    assert summary["forward_passes"] == training + 2 * probe
    assert all("H_K1" in r and "H_K3" in r and r["adaptive_choice"] == r["K"] for r in rows)


@pytest.mark.parametrize(
    "rule",
    [
        ("schedule.rule=hamiltonian", "schedule.unit=iteration", "schedule.every=5"),
        ("schedule.rule=adequacy", "schedule.budget=0.5", "schedule.epsilon=0.01"),
    ],
    ids=["hamiltonian-every-5-iterations", "adequacy-every-auto"],
)
def test_adaptive_runs_resume_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule: tuple[str, ...]
) -> None:
    args = (*rule, "eval.unit=iteration", "eval.every=6")
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
        ("schedule.rule=greedy", "schedule.rule"),
        ("schedule.epsilon=1", "schedule.epsilon"),
        ("schedule.budget=0", "schedule.budget"),
        ("schedule.every=often", "schedule.every"),
        ("schedule.k_min=often", "schedule.k_min"),
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


def tiny_adequacy(
    counter: PassCounter | None, *, every: int | None, budget: float = 1.0, mode: str = "monotone"
) -> tuple[torch.nn.Module, ProbeBatch, AdaptiveSchedule]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    x = torch.rand(8, 1, 4, 4)
    probe = ProbeBatch(x=x, y=torch.arange(8) % 3, start=torch.zeros_like(x))
    schedule = AdaptiveSchedule(
        candidates=[1, 2, 3, 4],
        tau=0.6,
        eps=0.3,
        every=every,
        unit="iteration",
        mode=mode,
        probes=[probe],
        iters_per_epoch=100,
        counter=counter,
        rule="adequacy",
        epsilon=0.05,
        budget=budget,
    )
    return model, probe, schedule


def test_adequacy_takes_the_smallest_k_within_epsilon_of_the_best_computed_by_hand() -> None:
    counter = PassCounter()
    model, probe, schedule = tiny_adequacy(counter, every=1, mode="free")
    g = {k: hand_h(model, probe, k, 0.6, 0.3) for k in (1, 2, 3, 4)}
    control = schedule.decide(model, 0, 0)
    assert schedule.last is not None
    probed = schedule.last.h
    # K_max first (the reference), then upwards from the lowest candidate until one is adequate
    assert min(probed) == 1 and 4 in probed
    assert probed == pytest.approx({k: g[k] for k in probed}, rel=1e-6)
    best = max(probed.values())
    adequate = [k for k in sorted(probed) if probed[k] >= 0.95 * best]
    assert control.steps == adequate[0]
    assert all(probed[k] < 0.95 * best for k in probed if k < control.steps)
    assert set(probed) == {*range(1, control.steps + 1), 4}  # nothing probed beyond the choice
    assert control.step_size == pytest.approx(0.6 / control.steps)
    assert counter.forward == counter.backward == 8 * sum(k + 1 for k in probed)
    assert schedule.probe_passes == counter.forward + counter.backward


def test_monotone_adequacy_never_probes_below_the_current_k(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, _, schedule = tiny_adequacy(None, every=1)
    g_by_decision = iter(
        [
            {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0},  # all alike: K = 1
            {1: 1.0, 2: 2.0, 3: 2.99, 4: 3.0},  # K = 3 (2.99 >= 0.95 * 3)
            {1: 9.0, 2: 9.0, 3: 1.0, 4: 1.0},  # small K look best, but K never falls: 3 is kept
            {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.0},  # only K_max is adequate
        ]
    )
    asked: list[list[int]] = []

    def scores(model: Any, ks: list[int], gamma: float) -> dict[int, float]:
        asked.append(list(ks))
        return {k: table[k] for k in ks}

    monkeypatch.setattr(schedule, "_scores", scores)
    chosen = []
    for i in range(4):
        table = next(g_by_decision)
        chosen.append(schedule.decide(None, 0, i).steps)  # type: ignore[arg-type]
    assert chosen == [1, 3, 3, 4]
    assert asked == [[4], [1], [4], [1], [2], [3], [4], [3], [4], [3]]


def test_every_auto_keeps_the_probe_within_its_budget_of_the_passes() -> None:
    counter = PassCounter()
    model, _, schedule = tiny_adequacy(counter, every=None, budget=0.1)
    per_iteration = 2 * 16 * (schedule.current + 1)  # PGD-K training on 16 images: K+1 each way
    decided_at, training, probing = [], 0, 0
    for i in range(400):
        before = schedule.probe_passes
        control = schedule.decide(model, 0, i)
        if schedule.probe_passes > before:
            decided_at.append((i, training, schedule.probe_passes - before))
            probing = schedule.probe_passes
        per_iteration = 2 * 16 * (control.steps + 1)
        counter.add(16, forward=control.steps + 1, backward=control.steps + 1)
        training += per_iteration
    assert len(decided_at) >= 3
    for (_, start, cost), (_, next_start, _) in itertools.pairwise(decided_at):
        # due at the first iteration once training has done cost / budget passes since
        assert cost / 0.1 <= next_start - start < cost / 0.1 + 2 * 16 * 5
    assert probing <= 0.1 * training + decided_at[-1][2]  # the last probe is not yet paid for


def test_k_min_auto_starts_at_one_and_belongs_to_the_adaptive_schedule_only() -> None:
    train_set, _ = load_digits()
    counter = PassCounter()
    auto = compose_resolved(["method=pgd", "schedule=adaptive"])
    assert auto.schedule.k_min == "auto" and auto.schedule.rule == "adequacy"
    schedule = build_adaptive(auto, train_set, torch.device("cpu"), 10, counter)
    assert schedule.candidates == list(range(1, 11)) and schedule.current == 1
    three = compose_resolved(["method=pgd", "schedule=adaptive", "schedule.k_min=3"])
    schedule = build_adaptive(three, train_set, torch.device("cpu"), 10, counter)
    assert schedule.candidates == list(range(3, 11)) and schedule.current == 3
    with pytest.raises(ConfigError) as info:
        compose_resolved(["method=amata", "schedule.k_min=auto"])
    assert info.value.key == "schedule.k_min"


def test_adequacy_run_on_digits_reports_its_probe_and_never_lowers_k(tmp_path: Path) -> None:
    summary = run(
        tmp_path, "schedule.k_min=auto", "epochs=3", "schedule.budget=0.2", "eval.subset=32"
    )
    rows = read_rows(tmp_path / "metrics.jsonl")
    ks = [r["K"] for r in rows]
    assert all(a <= b for a, b in itertools.pairwise(ks))
    assert any("g_K3" in r for r in rows) and not any(k.startswith("H_K") for k in rows[0])
    fraction = rows[-1]["adaptive_probe_fraction"]
    assert 0 < fraction <= 0.5  # 20% budget, plus the first probe that training has yet to repay
    assert summary["forward_passes"] > 0
