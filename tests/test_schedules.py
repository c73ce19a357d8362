"""The annealing schedules: end points, monotonicity, rounding and the alpha = tau / K budget."""

from __future__ import annotations

import itertools
import math

import pytest

from amata_runner.control.schedules import Schedule, anneal_fraction


def make(name: str = "linear", **kw: object) -> Schedule:
    args: dict[str, object] = dict(
        name=name, k_min=2, k_max=10, step_size=2 / 255, epochs=100, iters_per_epoch=50
    )
    args.update(kw)
    return Schedule(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["linear", "exponential"])
@pytest.mark.parametrize("endpoint", ["paper", "inclusive"])
def test_annealing_starts_at_k_min_and_is_monotone(name: str, endpoint: str) -> None:
    schedule = make(name, endpoint=endpoint)
    ks = [c.steps for c in schedule.epoch_controls()]
    assert ks[0] == 2
    assert all(a <= b for a, b in itertools.pairwise(ks))
    alphas = [c.step_size for c in schedule.epoch_controls()]
    assert all(a >= b for a, b in itertools.pairwise(alphas))


def test_inclusive_endpoint_reaches_k_max_in_the_last_epoch() -> None:
    for epochs in (2, 3, 7, 100):
        ks = [c.steps for c in make(endpoint="inclusive", epochs=epochs).epoch_controls()]
        assert ks[0] == 2 and ks[-1] == 10


def test_paper_endpoint_is_algorithm_1_literally() -> None:
    # K_t = K_min + (K_max - K_min) t / T, rounded half up, t = 0..T-1.
    schedule = make(epochs=4)
    assert [c.steps for c in schedule.epoch_controls()] == [2, 4, 6, 8]  # 2, 4, 6, 8 exactly
    cifar = [c.steps for c in make(epochs=100).epoch_controls()]
    assert cifar[-1] == 10  # round(9.92): the paper's CIFAR10 run does reach K_max
    assert cifar.count(2) == 7  # t = 0..6: 8t/100 < 0.5
    assert math.isclose(sum(cifar) / 100, 5.96)
    for t, c in enumerate(make(epochs=100).epoch_controls()):
        assert c.steps == math.floor(2 + 8 * t / 100 + 0.5)


def test_alpha_times_k_is_tau() -> None:
    explicit = make(tau=20 / 255)
    for c in explicit.epoch_controls():
        assert math.isclose(c.steps * c.step_size, 20 / 255)
    derived = make(tau=None)  # tau = step_size * k_max
    for c in derived.epoch_controls():
        assert math.isclose(c.steps * c.step_size, 10 * 2 / 255)
    assert derived.at(99).step_size == 2 / 255  # the last control is PGD-10's exactly


def test_constant_schedule_is_the_baseline() -> None:
    schedule = make("constant", k_min=40, k_max=40, step_size=0.01, epochs=5)
    assert {(c.steps, c.step_size) for c in schedule.epoch_controls()} == {(40, 0.01)}


def test_exponential_matches_equation_16() -> None:
    schedule = make("exponential", eta=0.5, epochs=10, endpoint="paper")
    for t in range(10):
        expected = 2 + 8 * (1 - math.exp(-0.5 * t)) / (1 - math.exp(-0.5 * 10))
        assert math.isclose(schedule.k_value(t), expected)
        assert schedule.at(t).steps == math.floor(expected + 0.5)
    assert anneal_fraction("exponential", 10, 10, eta=3.0) == 1.0


def test_iteration_unit_changes_inside_an_epoch() -> None:
    schedule = make(unit="iteration", epochs=2, iters_per_epoch=8, endpoint="inclusive")
    ks = [schedule.at(e, i).steps for e in range(2) for i in range(8)]
    assert ks[0] == 2 and ks[-1] == 10
    assert len(set(ks[:8])) > 1  # moves within the first epoch
    assert all(a <= b for a, b in itertools.pairwise(ks))
    assert schedule.per_iteration and not make(unit="epoch").per_iteration


def test_bad_bounds_rejected() -> None:
    with pytest.raises(ValueError):
        make(k_min=11)
