"""The optimal-control criterion C (paper eq. 14), its config node and the Table 1 experiment."""

from __future__ import annotations

import copy
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from amata_runner.config import EvalConfig, RunConfig
from amata_runner.control.criterion import (
    CriterionProbe,
    InnerControl,
    criterion,
    h_values,
    make_probes,
    summarise_criterion,
)
from amata_runner.control.criterion_config import (
    ControlGrid,
    CriterionConfig,
    check_criterion,
    control_grid,
    normalise_criterion,
)
from amata_runner.data import ImageSet
from amata_runner.errors import ConfigError
from conftest import compose_resolved

CPU = torch.device("cpu")
EPS = 0.3
SHAPE = (1, 3, 3)  # tiny images: (C, H, W)
REPO = Path(__file__).resolve().parents[1]


def tiny_data(n: int = 48, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, classes, (n,), generator=g)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, 12), nn.Tanh(), nn.Linear(12, 3))


def probes_for(random_start: bool = True, batches: int = 2, batch_size: int = 8) -> list:
    images, labels = tiny_data()
    return make_probes(
        images,
        labels,
        batches=batches,
        batch_size=batch_size,
        eps=EPS,
        random_start=random_start,
        seed=1,
        device=CPU,
    )


PRODUCT = ControlGrid(
    tuple(InnerControl(k, a) for k in (1, 2, 4) for a in (0.02, 0.1)),
    axes=((1, 2, 4), (0.02, 0.1)),
)


# ------------------------------------------------------------------------------------ C itself
def test_c_is_nonnegative_for_every_control_and_zero_at_the_maximiser() -> None:
    model, probes = tiny_mlp(), probes_for()
    outside = InnerControl(3, 0.05)  # a current control that is not in G
    results = {
        c: criterion(model, probes, current=c, grid=PRODUCT, gamma=0.01, eps=EPS)
        for c in (*PRODUCT.controls, outside)
    }
    h = results[outside].h
    assert set(h) == {*PRODUCT.controls, outside}  # exhaustive: every control evaluated
    assert len(set(h.values())) > 2  # the controls really differ, so the test has teeth
    for current, result in results.items():
        assert result.value >= 0
        assert result.value == pytest.approx(max(h.values()) - h[current], abs=1e-12)
        assert result.h == {c: h[c] for c in result.h}  # H is a function of the control alone
    best = max(h, key=h.__getitem__)
    at_best = results[best]
    assert at_best.value == 0.0 and at_best.best == best
    assert all(results[c].value > 0 for c in PRODUCT.controls if h[c] < h[best])


def test_current_control_matching_a_member_of_g_up_to_rounding_is_that_member() -> None:
    """A schedule's tau / K and a configured alpha may differ in the last bit."""
    model, probes = tiny_mlp(), probes_for(batches=1)
    tau_family = ControlGrid((InnerControl(3, 0.3 / 3), InnerControl(1, 0.3)))
    result = criterion(model, probes, current=(1, 0.1 * 3), grid=tau_family, gamma=0.0, eps=EPS)
    assert result.current == InnerControl(1, 0.3)
    assert len(result.h) == 2


def numpy_h(
    weight: np.ndarray,
    bias: np.ndarray,
    probes: list,
    steps: int,
    alpha: float,
    gamma: float,
) -> float:
    """H for a linear softmax classifier in closed form, float64, step by step."""

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    squares = []
    for probe in probes:
        x = probe.x.reshape(probe.x.shape[0], -1).double().numpy()
        delta = probe.start.reshape(x.shape).double().numpy()
        onehot = np.eye(weight.shape[0])[probe.y.numpy()]
        for _ in range(steps):
            p = softmax((x + delta) @ weight.T + bias)
            grad_x = (p - onehot) @ weight  # d/dx of the summed CE, one row per example
            delta = np.clip(delta + alpha * np.sign(grad_x), -EPS, EPS)
            delta = np.clip(x + delta, 0.0, 1.0) - x
        x_adv = x + delta
        residual = (softmax(x_adv @ weight.T + bias) - onehot) / x.shape[0]  # d mean-CE / d logits
        grad_w, grad_b = residual.T @ x_adv, residual.sum(axis=0)
        squares.append((grad_w**2).sum() + (grad_b**2).sum())
    return float(np.mean(squares)) - gamma * steps


def test_two_point_criterion_matches_a_hand_computation() -> None:
    torch.manual_seed(3)
    linear = nn.Linear(9, 3)
    model = nn.Sequential(nn.Flatten(), linear)
    probes = probes_for(random_start=True)
    weight = linear.weight.detach().double().numpy()
    bias = linear.bias.detach().double().numpy()
    grid = [InnerControl(1, 0.2), InnerControl(6, 0.03)]
    current = InnerControl(2, 0.05)
    gamma = 0.002
    hand = {c: numpy_h(weight, bias, probes, c.steps, c.step_size, gamma) for c in [*grid, current]}
    result = criterion(model, probes, current=current, grid=grid, gamma=gamma, eps=EPS)
    for control, value in hand.items():
        assert result.h[control] == pytest.approx(value, rel=1e-5)
    expected_c = max(hand.values()) - hand[current]
    assert expected_c > 0  # the current control is not the maximiser here
    assert result.value == pytest.approx(expected_c, rel=1e-4)
    assert result.best == max(hand, key=hand.__getitem__)


def test_shared_pgd_paths_give_the_same_h_as_separate_runs() -> None:
    model, probes = tiny_mlp(), probes_for()
    together = h_values(model, probes, list(PRODUCT.controls), eps=EPS, gamma=0.04)
    for control in PRODUCT.controls:
        alone = h_values(model, probes, [control], eps=EPS, gamma=0.04)
        assert alone[control] == together[control]


def test_tpe_search_lies_between_the_current_value_and_the_exhaustive_maximum() -> None:
    pytest.importorskip("optuna")
    model, probes = tiny_mlp(), probes_for()
    current = InnerControl(1, 0.02)
    exact = criterion(model, probes, current=current, grid=PRODUCT, gamma=0.01, eps=EPS)
    tpe = criterion(
        model,
        probes,
        current=current,
        grid=PRODUCT,
        gamma=0.01,
        eps=EPS,
        search="tpe",
        trials=4,
        seed=0,
    )
    assert tpe.h_current <= tpe.h_best <= exact.h_best
    assert 0 <= tpe.value <= exact.value
    assert 2 <= len(tpe.h) <= 5  # the current control plus at most 4 trials
    assert all(tpe.h[c] == exact.h[c] for c in tpe.h)  # same H, found by another search
    again = criterion(
        model,
        probes,
        current=current,
        grid=PRODUCT,
        gamma=0.01,
        eps=EPS,
        search="tpe",
        trials=4,
        seed=0,
    )
    assert again.h == tpe.h  # seeded: repeatable


def test_tpe_without_optuna_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # makes `import optuna` fail
    with pytest.raises(ConfigError) as err:
        criterion(
            tiny_mlp(), probes_for(), current=(1, 0.1), grid=PRODUCT, gamma=0, eps=EPS, search="tpe"
        )
    assert err.value.key == "eval.criterion.search" and "criterion" in err.value.allowed


# ------------------------------------------------------------------------------------ probes
class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 2)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def criterion_node(**overrides: Any) -> SimpleNamespace:
    values = {**vars(CriterionConfig()), "eps": EPS, "tau": 0.4, "probe_batch_size": 8}
    values.update(overrides)
    return SimpleNamespace(**values)


def test_the_probe_leaves_rng_parameters_grads_bn_buffers_and_optimiser_alone() -> None:
    torch.manual_seed(0)
    model = BNNet().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = tiny_data()
    x = images[:8].float() / 255
    nn.functional.cross_entropy(model(x), labels[:8]).backward()
    optimizer.step()  # momentum buffers exist
    nn.functional.cross_entropy(model(x), labels[:8]).backward()  # .grad holds a fresh gradient
    before = copy.deepcopy(
        (model.state_dict(), [p.grad for p in model.parameters()], optimizer.state_dict())
    )
    rng = torch.get_rng_state()

    probe = CriterionProbe(criterion_node(steps=[1, 2]), ImageSet(images, labels), CPU)
    first = probe.measure(model, 2, 0.2)
    second = probe.measure(model, 2, 0.2)

    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    state, grads, optim_state = before
    for key, value in model.state_dict().items():  # parameters and BN running stats / counter
        assert torch.equal(value, state[key]), key
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    momentum = optimizer.state_dict()["state"]
    for key, buffers in optim_state["state"].items():
        assert torch.equal(momentum[key]["momentum_buffer"], buffers["momentum_buffer"])
    assert first == second  # a deterministic function of the model and the control
    assert set(first) >= {"criterion_C", "criterion_H_current", "criterion_best_K"}
    assert first["criterion_C"] >= 0
    assert first["criterion_best_alpha"] in {0.4, 0.2}  # tau / K for K in {1, 2}


def test_probes_are_fixed_by_their_seed_and_stay_in_the_threat_model() -> None:
    a, b = probes_for(), probes_for()
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa.x, pb.x) and torch.equal(pa.start, pb.start)
        assert pa.start.abs().max() <= EPS + 1e-7
        assert (pa.x + pa.start).min() >= 0 and (pa.x + pa.start).max() <= 1
    assert not torch.equal(a[0].x, a[1].x)  # different batches
    images, labels = tiny_data(n=10)
    with pytest.raises(ConfigError) as err:
        make_probes(
            images,
            labels,
            batches=2,
            batch_size=8,
            eps=EPS,
            random_start=True,
            seed=0,
            device=CPU,
        )
    assert err.value.key == "eval.criterion.probe_batches"


def test_summary_averages_c_over_the_rows_that_measured_it() -> None:
    rows = [{"criterion_C": 1.0}, {"robust_error": 0.5}, {"criterion_C": 3.0}]
    assert summarise_criterion(rows) == {"C": 2.0, "points": 2, "last_C": 3.0}
    assert summarise_criterion([{"robust_error": 0.5}]) is None


# ------------------------------------------------------------------------------------ config
@pytest.fixture(scope="module")
def base_cfg() -> DictConfig:
    cfg = compose_resolved([])
    with open_dict(cfg):
        cfg.eval.criterion = OmegaConf.structured(CriterionConfig)
    return cfg


def normalise_and_check(cfg: DictConfig) -> None:
    """What resolve_config does to the node: fill and convert once, then check (reads only)."""
    normalise_criterion(cfg)
    before = OmegaConf.to_container(cfg)
    check_criterion(cfg)
    assert OmegaConf.to_container(cfg) == before  # the check wrote nothing


def with_criterion(base: DictConfig, *overrides: str) -> DictConfig:
    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        for item in overrides:
            key, value = item.split("=", 1)
            OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=False)
    return cfg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("eval.criterion.gamma=-0.1", "eval.criterion.gamma"),
        ("eval.criterion.steps=[]", "eval.criterion.steps"),
        ("eval.criterion.steps=[0,5]", "eval.criterion.steps"),
        ("eval.criterion.search=grid", "eval.criterion.search"),
        ("eval.criterion.step_sizes=[0.01,-1]", "eval.criterion.step_sizes"),
        ("eval.criterion.pairs=[[0.01,40]]", "eval.criterion.pairs"),
        ("eval.criterion.tau=0", "eval.criterion.tau"),
        ("eval.criterion.every=0", "eval.criterion.every"),
        ("eval.criterion.trials=0", "eval.criterion.trials"),
        ("eval.criterion.probe_batches=0", "eval.criterion.probe_batches"),
        ("eval.criterion.eps=2", "eval.criterion.eps"),
    ],
)
def test_check_rejects_bad_values_naming_the_key(
    base_cfg: DictConfig, override: str, key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        normalise_and_check(with_criterion(base_cfg, override))
    assert err.value.key == key


def test_check_refuses_methods_without_a_pgd_control(base_cfg: DictConfig) -> None:
    cfg = with_criterion(base_cfg, "eval.criterion.enabled=true", "method.name=erm")
    with pytest.raises(ConfigError) as err:
        normalise_and_check(cfg)
    assert err.value.key == "eval.criterion.enabled"
    normalise_and_check(with_criterion(base_cfg, "method.name=erm"))  # disabled: fine


def test_check_fills_the_run_defaults_and_reads_fractions(base_cfg: DictConfig) -> None:
    cfg = with_criterion(base_cfg, "eval.criterion.step_sizes=[2/255,0.01]")
    normalise_and_check(cfg)
    node = cfg.eval.criterion
    assert node.eps == cfg.method.eps == 0.2  # digits' threat model, through the method
    assert node.tau == pytest.approx(0.05 * 10)  # dataset.threat.step_size * steps
    assert node.probe_batch_size == cfg.batch_size
    assert list(node.step_sizes) == [pytest.approx(2 / 255), 0.01]
    normalise_and_check(cfg)  # idempotent: a resumed run resolves to the same config


def test_control_grid_forms() -> None:
    tau_family = control_grid(criterion_node(steps=[5, 10, 5], tau=0.4))
    assert tau_family.controls == (InnerControl(5, 0.4 / 5), InnerControl(10, 0.4 / 10))
    assert tau_family.axes is None
    product = control_grid(criterion_node(steps=[5, 10], step_sizes=[0.01, 0.02]))
    assert len(product.controls) == 4 and product.axes == ((5, 10), (0.01, 0.02))
    pairs = control_grid(criterion_node(pairs=[[40, 0.01], [10, 0.04]]))
    assert pairs.controls == (InnerControl(40, 0.01), InnerControl(10, 0.04))


# ------------------------------------------------------------------------------------ Table 1
TABLE1 = REPO / "conf" / "experiment" / "paper_table1_mnist.yaml"
ROWS = {
    "amata_setting1": ("amata", "linear", 5, 40),
    "amata_setting2": ("amata", "linear", 10, 40),
    "pgd10": ("pgd", "constant", 10, 10),
    "pgd20": ("pgd", "constant", 20, 20),
    "pgd40": ("pgd", "constant", 40, 40),
}


def test_table1_experiment_lists_every_published_row_in_its_sweep() -> None:
    assert TABLE1.read_text().startswith("# @package _global_")
    raw = OmegaConf.load(TABLE1)
    assert raw.paper.table == 1 and raw.paper.gamma == 0.04
    assert raw.report.row == raw.paper.row and raw.report.baseline in ROWS
    assert set(raw.paper.rows) == set(raw.paper.settings) == set(ROWS)
    swept = str(raw.hydra.sweeper.params["paper.row"]).split(",")
    assert swept == list(ROWS)  # the table's order
    for name, (method, schedule, k_min, k_max) in ROWS.items():
        setting = raw.paper.settings[name]
        assert (setting.method, setting.schedule, setting.k_min, setting.k_max) == (
            method,
            schedule,
            k_min,
            k_max,
        )
        published = raw.paper.rows[name]
        assert set(published.robust_accuracy) <= set(raw.eval.final_attacks)
        assert 0 < published.robust_accuracy.pgd40 < 1
        assert published.C > 0 and published.train_seconds > 0
    assert raw.eval.criterion.enabled is True and raw.eval.criterion.gamma == 0.04


@pytest.mark.skipif(
    not {"criterion", "final_attacks"} <= {f.name for f in fields(EvalConfig)}
    or not {"paper", "report"} <= {f.name for f in fields(RunConfig)},
    reason="eval.criterion, eval.final_attacks, paper and report are not in the schemas yet",
)
@pytest.mark.parametrize("row", sorted(ROWS))
def test_table1_rows_compose_to_the_published_settings(row: str) -> None:
    from amata_runner.build import build_schedule

    cfg = compose_resolved(["experiment=paper_table1_mnist", f"paper.row={row}"])
    method, schedule, k_min, k_max = ROWS[row]
    assert (cfg.dataset.name, cfg.model.name) == ("mnist", "lenet")
    assert (cfg.method.name, cfg.schedule.name) == (method, schedule)
    assert (cfg.method.eps, cfg.method.step_size) == (0.3, 0.01)
    assert cfg.name == f"paper_table1_mnist_{row}" and cfg.report.row == row
    assert list(cfg.eval.final_attacks) == ["pgd40"] and cfg.eval.attack.steps == 40
    controls = build_schedule(cfg, cfg.epochs, 1).epoch_controls()
    # Algorithm 1 runs t = 0..T-1, so over 56 epochs Amata's last K is 39 (README: endpoint=paper)
    assert controls[0].steps == k_min and k_max - 1 <= max(c.steps for c in controls) <= k_max
    if method == "pgd":
        assert all(c.step_size == pytest.approx(0.01) for c in controls)
    else:  # Amata: alpha_t = tau / K_t with tau = 0.01 * 40
        assert all(c.steps * c.step_size == pytest.approx(0.4) for c in controls)
    node = cfg.eval.criterion
    assert node.enabled and node.gamma == 0.04 and node.eps == 0.3
    members = {(g.steps, round(g.step_size, 12)) for g in control_grid(node).controls}
    if method == "pgd":  # the baseline's own control is a member of G
        assert (k_max, 0.01) in members
    else:  # so are Amata's end points (K, tau / K)
        assert {(k_min, round(0.4 / k_min, 12)), (40, 0.01)} <= members
