"""Evaluation attacks: each weakens a trained model, none leaves its threat model, restarts only
ever add adversarial examples, CW-L2 follows its reference, names parse, and runs resume."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks.autoattack import autoattack_linf
from amata_runner.attacks.cw import cw_l2, cw_linf, cw_margin
from amata_runner.attacks.pgd import pgd_linf
from amata_runner.attacks.restarts import _masked_pgd, pgd_restarts
from amata_runner.attacks.suite import (
    SuiteOptions,
    attack_params,
    parse_attack,
    parse_attacks,
    run_suite,
)
from amata_runner.data import load_digits
from amata_runner.errors import ConfigError

EPS = 0.05  # small enough that a clean-trained digits model keeps some accuracy under attack


class Toy:
    model: nn.Module
    images: torch.Tensor  # uint8, as run_suite takes them
    labels: torch.Tensor

    @property
    def x(self) -> torch.Tensor:
        return self.images.float() / 255


@pytest.fixture(scope="module")
def toy() -> Toy:
    """A small conv net trained (clean, ~0.2 s) on the real digits; 120 test examples."""
    torch.manual_seed(0)
    train, test = load_digits(0.2, 0, 28)
    x, y = train.images.float() / 255, train.labels
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        idx = torch.randint(0, len(x), (128,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    out = Toy()
    out.model, out.images, out.labels = model, test.images[:120], test.labels[:120]
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def options(**kw: Any) -> SuiteOptions:
    base: dict[str, Any] = {"eps": EPS, "step_size": EPS / 4, "cw_inf_steps": 10, "cw_l2_steps": 30}
    return SuiteOptions(**{**base, **kw})


def test_every_attack_lowers_accuracy_and_reports_its_distance(toy: Toy) -> None:
    names = ["clean", "pgd10", "pgd5x2", "cw_inf", "cw_l2"]
    res = run_suite(
        toy.model, toy.images, toy.labels, names, options(cw_l2_c=100.0), batch_size=50, seed=0
    )
    assert list(res) == names
    assert res["clean"]["accuracy"] == pytest.approx(accuracy(toy.model, toy.x, toy.labels))
    assert res["clean"]["accuracy"] > 0.9
    for name in names[1:]:
        assert res[name]["accuracy"] < res["clean"]["accuracy"] - 0.1, name
        assert res[name]["examples"] == 120
        assert res[name]["correct"] == round(res[name]["accuracy"] * 120)
    for name in ("pgd10", "pgd5x2", "cw_inf"):  # L-inf attacks: inside the ball
        assert 0 < res[name]["max_linf"] <= EPS + 1e-6
    assert res["clean"]["max_linf"] == 0 and res["clean"]["mean_l2"] == 0
    assert res["pgd5x2"]["params"] == {
        "eps": EPS,
        "step_size": EPS / 4,
        "steps": 5,
        "restarts": 2,
        "random_start": True,
    }


def test_linf_attacks_stay_in_the_ball_and_the_pixel_box(toy: Toy) -> None:
    x, y, g = toy.x, toy.labels, torch.Generator().manual_seed(1)
    for eps, step in [(EPS, EPS / 4), (0.3, 0.2)]:
        outs = [
            pgd_restarts(toy.model, x, y, eps=eps, step_size=step, steps=4, restarts=2),
            cw_linf(toy.model, x, y, eps=eps, step_size=step, steps=4, generator=g),
        ]
        for x_adv in outs:
            assert (x_adv - x).abs().max() <= eps + 1e-6
            assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_cw_l2_stays_in_the_pixel_box(toy: Toy) -> None:
    for init in ("zero", "input", "random"):
        x_adv = cw_l2(toy.model, toy.x, toy.labels, c=100.0, steps=10, lr=0.05, init=init)
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_restarts_never_make_an_example_less_adversarial(toy: Toy) -> None:
    x, y = toy.x, toy.labels
    fooled_before = torch.zeros(len(y), dtype=torch.bool)
    loss_before = torch.full((len(y),), -torch.inf)
    for restarts in (1, 2, 3, 5):
        g = torch.Generator().manual_seed(7)  # the same seed: restart r starts from the same point
        x_adv = pgd_restarts(
            toy.model, x, y, eps=EPS, step_size=EPS / 4, steps=3, restarts=restarts, generator=g
        )
        with torch.no_grad():
            logits = toy.model(x_adv)
        fooled = logits.argmax(1) != y
        loss = F.cross_entropy(logits, y, reduction="none")
        assert (fooled | ~fooled_before).all()  # once fooled, fooled with more restarts
        same = fooled == fooled_before
        assert (loss[same] >= loss_before[same] - 1e-6).all()  # and never a weaker candidate
        fooled_before, loss_before = fooled, loss
    # through the suite as well: accuracy is monotone non-increasing in R
    names = ["pgd3x1", "pgd3x2", "pgd3x4"]
    res = run_suite(toy.model, toy.images, toy.labels, names, options(), batch_size=40, seed=3)
    accs = [res[n]["accuracy"] for n in names]
    assert accs == sorted(accs, reverse=True)
    assert accs[-1] < accs[0]  # and here the extra restarts did find more


def test_a_restart_moves_only_examples_still_classified_correctly(toy: Toy) -> None:
    x, y = toy.x, toy.labels
    eps = 0.15  # large enough that some random starts already fool the model
    start = torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(5))
    start = (x + start).clamp(0, 1) - x
    fooled_at_start = torch.as_tensor(
        [accuracy(toy.model, (x + start)[i : i + 1], y[i : i + 1]) == 0 for i in range(len(y))]
    )
    g = torch.Generator().manual_seed(5)
    with torch.enable_grad():
        delta = _masked_pgd(toy.model, x, y, eps=eps, step_size=0.05, steps=5, generator=g)
    assert fooled_at_start.any() and (~fooled_at_start).any()
    assert torch.equal(delta[fooled_at_start], start[fooled_at_start])
    assert not torch.equal(delta[~fooled_at_start], start[~fooled_at_start])


def test_cw_margin_by_hand() -> None:
    logits = torch.tensor([[2.0, 1.0, -3.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 0])
    assert cw_margin(logits, y, kappa=50.0).tolist() == [-1.0, 5.0]
    assert cw_margin(logits, y, kappa=2.0).tolist() == [-1.0, 2.0]  # capped at kappa


def test_cw_inf_beats_cross_entropy_pgd_of_the_same_steps_or_ties(toy: Toy) -> None:
    # The margin loss aims at the decision boundary, so with equal steps it fools at least about
    # as many examples as CE-PGD (FAT/CAT's reason to report it).
    x, y = toy.x, toy.labels
    g = torch.Generator()
    acc_cw = accuracy(
        toy.model,
        cw_linf(toy.model, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=g.manual_seed(0)),
        y,
    )
    acc_pgd = accuracy(
        toy.model,
        pgd_linf(toy.model, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=g.manual_seed(0)),
        y,
    )
    assert acc_cw <= acc_pgd + 0.05


def test_cw_l2_at_c0_returns_the_input_unchanged(toy: Toy) -> None:
    for init in ("zero", "input", "random"):
        x_adv = cw_l2(toy.model, toy.x, toy.labels, c=0.0, steps=20, init=init, init_radius=0.1)
        assert torch.equal(x_adv, toy.x)
    res = run_suite(
        toy.model, toy.images, toy.labels, ["clean", "cw_l2"], options(cw_l2_c=0.0), batch_size=60,
        seed=0,
    )  # fmt: skip
    assert res["cw_l2"]["mean_l2"] == 0 and res["cw_l2"]["accuracy"] == res["clean"]["accuracy"]


def test_cw_l2_best_keeps_the_closest_success(toy: Toy) -> None:
    x, y = toy.x, toy.labels
    kw: dict[str, Any] = {"c": 1.0, "steps": 40, "lr": 0.01, "init": "input"}
    final = cw_l2(toy.model, x, y, keep="final", **kw)
    best = cw_l2(toy.model, x, y, keep="best", **kw)
    with torch.no_grad():
        fooled_final = toy.model(final).argmax(1) != y
        fooled_best = toy.model(best).argmax(1) != y
    dist_final = (final - x).flatten(1).norm(dim=1)
    dist_best = (best - x).flatten(1).norm(dim=1)
    assert fooled_final.any()
    assert (fooled_best | ~fooled_final).all()  # whatever the last iterate fooled, best fools
    assert (dist_best[fooled_final] <= dist_final[fooled_final] + 1e-5).all()
    assert (dist_best[~fooled_best] == 0).all()  # never fooled: the input itself


def test_attack_names_parse_to_the_grammar() -> None:
    assert parse_attack("pgd20").steps == 20 and parse_attack("pgd20").restarts == 0
    assert (parse_attack("pgd50x10").steps, parse_attack("pgd50x10").restarts) == (50, 10)
    assert [a.name for a in parse_attacks(["clean", "pgd20", "clean", "autoattack"])] == [
        "clean",
        "pgd20",
        "autoattack",
    ]
    assert [a.name for a in parse_attacks("[cw_inf,cw_l2]")] == ["cw_inf", "cw_l2"]
    assert attack_params("cw_inf", options()) == {
        "eps": EPS,
        "step_size": EPS / 4,
        "steps": 10,
        "kappa": 50.0,
        "random_start": True,
    }
    assert attack_params("clean", options()) == {}


@pytest.mark.parametrize("bad", ["bim", "pgd", "pgd0", "pgd20x0", "PGD20", "cw", "pgd20x"])
def test_unknown_attack_name_is_a_one_line_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_attacks(["pgd20", bad], key="eval.final_attacks")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"eval.final_attacks={bad!r}")
    assert "pgd<K>x<R>" in message and "autoattack" in message


def test_bad_options_are_config_errors_before_any_work(toy: Toy) -> None:
    for bad, key in [
        (options(eps=0.0), "eps"),
        (options(cw_l2_init="ones"), "cw_l2_init"),
        (options(autoattack_version="custom"), "autoattack_attacks"),
    ]:
        with pytest.raises(ConfigError) as info:
            run_suite(toy.model, toy.images, toy.labels, ["clean"], bad, batch_size=8, seed=0)
        assert info.value.key == key


def test_suite_leaves_the_model_as_it_found_it(toy: Toy) -> None:
    model = toy.model
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        run_suite(model, toy.images[:8], toy.labels[:8], ["pgd2"], options(), batch_size=4, seed=0)
        assert model.training
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
    finally:
        model.eval()


class DictStore:
    """An in-memory ProgressStore that can simulate a kill after some batches."""

    def __init__(self, kill_after: int | None = None) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.kill_after = kill_after
        self.saves = 0

    def load(self, name: str) -> dict[str, Any] | None:
        return self.states.get(name)

    def save(self, name: str, state: dict[str, Any]) -> None:
        self.states[name] = dict(state)
        self.saves += 1
        if self.kill_after is not None and self.saves >= self.kill_after:
            raise KeyboardInterrupt


def test_a_killed_attack_resumes_at_its_batch_with_the_same_result(toy: Toy) -> None:
    args = (toy.model, toy.images, toy.labels, ["pgd4x2"], options())
    whole = run_suite(*args, batch_size=30, seed=4)["pgd4x2"]
    store = DictStore(kill_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_suite(*args, batch_size=30, seed=4, store=store)
    assert store.states["pgd4x2"]["next"] == 60
    store.kill_after = None
    resumed = run_suite(*args, batch_size=30, seed=4, store=store)["pgd4x2"]
    assert store.saves == 4  # two batches before the kill, the remaining two after
    for field in ("correct", "examples", "max_linf"):
        assert resumed[field] == whole[field]
    assert resumed["mean_l2"] == pytest.approx(whole["mean_l2"], rel=1e-9)


def test_autoattack_wrapper_lowers_accuracy_inside_the_ball(toy: Toy) -> None:
    x, y = toy.x[:24], toy.labels[:24]
    rng = torch.get_rng_state()
    x_adv = autoattack_linf(
        toy.model, x, y, eps=EPS, version="custom", attacks=("apgd-ce",), seed=0, batch_size=24
    )
    assert torch.equal(torch.get_rng_state(), rng)  # AutoAttack's reseeding does not leak out
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert accuracy(toy.model, x_adv, y) < accuracy(toy.model, x, y) - 0.1
    res = run_suite(
        toy.model,
        toy.images[:24],
        toy.labels[:24],
        ["clean", "autoattack"],
        options(autoattack_version="custom", autoattack_attacks=("apgd-ce",)),
        batch_size=24,
        seed=0,
    )
    assert res["autoattack"]["accuracy"] < res["clean"]["accuracy"]
    assert res["autoattack"]["params"] == {
        "eps": EPS,
        "norm": "Linf",
        "version": "custom",
        "attacks": ["apgd-ce"],
    }


def test_missing_autoattack_package_says_which_extra_to_install(
    toy: Toy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import now raises ImportError
    store = DictStore()
    with pytest.raises(ConfigError) as info:
        run_suite(
            toy.model, toy.images, toy.labels, ["clean", "autoattack"], options(), batch_size=8,
            seed=0, store=store,
        )  # fmt: skip
    assert "pip install 'amata-runner[autoattack]'" in str(info.value)
    assert store.saves == 0  # refused before the clean pass ran


@pytest.mark.slow
def test_standard_autoattack_lowers_accuracy(toy: Toy) -> None:
    x, y = toy.x[:8], toy.labels[:8]
    x_adv = autoattack_linf(toy.model, x, y, eps=EPS, seed=0, batch_size=8)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert accuracy(toy.model, x_adv, y) < accuracy(toy.model, x, y)
