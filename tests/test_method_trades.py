"""TRADES and Amata+TRADES: the KL attack, the outer loss, BatchNorm modes, counted passes, the
schedule, the CIFAR10 experiment, an end-to-end run on digits, and the WideResNets it trains."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.build import build_schedule
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.logging.metrics import read_rows
from amata_runner.methods import build_method
from amata_runner.methods.trades import TRADES, TradesConfig, kl_sum
from amata_runner.models import WideResNet, build_model
from amata_runner.models.wide_resnet import WideBlock
from amata_runner.runtime.passes import PassCounter
from conftest import FAST, bn_net, compose_resolved, cpu_context

EPS = 0.1
CONTROL = Control(steps=5, step_size=0.03)
SHAPE = (1, 6, 6)
N_DIGITS = 1238  # digits training examples (1438 less 200 validation)


def trades(model: nn.Module, beta: float = 6.0, lr: float = 0.1) -> TRADES:
    ctx = cpu_context(model, lr=lr, image_shape=SHAPE, num_classes=3)
    return TRADES(ctx, TradesConfig(eps=EPS, beta=beta))


def batch(n: int = 16, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    x[:, :, :2] = 0.0  # saturated pixels: the [0,1] clip binds
    y = torch.randint(0, 3, (n,), generator=g)
    return Batch(x=x, y=y, index=torch.arange(n))


def kl_to_clean(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return kl_sum(model(x_adv), F.softmax(model(x), dim=1))


# ------------------------------------------------------------------ the inner maximisation
def test_kl_attack_stays_in_the_eps_ball_and_increases_the_kl() -> None:
    model = bn_net()
    method, b = trades(model), batch()
    model.eval()
    torch.manual_seed(0)
    start = b.x + 0.001 * torch.randn_like(b.x)  # the reference's start
    x_adv = method.attack(b.x, b.y, CONTROL)
    assert (x_adv - b.x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    kl_adv = kl_to_clean(model, b.x, x_adv)
    assert kl_adv > 100 * kl_to_clean(model, b.x, start.clamp(0, 1))
    random = (b.x + torch.empty_like(b.x).uniform_(-EPS, EPS)).clamp(0, 1)
    assert kl_adv > kl_to_clean(model, b.x, random)  # better than a random point of the ball
    longer = method.attack(b.x, b.y, Control(steps=20, step_size=0.01))
    assert (longer - b.x).abs().max() <= EPS + 1e-6


def test_attack_runs_batchnorm_in_eval_mode_and_restores_train_mode() -> None:
    model = bn_net()
    method, b = trades(model), batch()
    model.train()
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    method.attack(b.x, b.y, CONTROL)
    assert model.training
    torch.testing.assert_close(bn.running_mean, stats[0], rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, stats[1], rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == stats[2]


# ------------------------------------------------------------------ the outer minimisation
def test_outer_loss_is_clean_ce_plus_beta_times_the_batch_mean_kl() -> None:
    g = torch.Generator().manual_seed(0)
    logits, logits_adv = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    p, q = F.softmax(logits, 1), F.softmax(logits_adv, 1)
    per_example_kl = (p * (p.log() - q.log())).sum(1)
    expected = F.cross_entropy(logits, y) + 6.0 * per_example_kl.mean()
    torch.testing.assert_close(trades(bn_net()).loss(logits, logits_adv, y), expected)


def test_beta_zero_reduces_the_update_to_clean_cross_entropy() -> None:
    model, b = bn_net(), batch()
    reference = copy.deepcopy(model)
    method = trades(model, beta=0.0)
    torch.testing.assert_close(
        method.loss(model(b.x), model(b.x + 0.05), b.y), F.cross_entropy(model(b.x), b.y)
    )
    method.train_batch(b, CONTROL)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference.train()
    F.cross_entropy(reference(b.x), b.y).backward()
    optimizer.step()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_update_gradient_flows_through_the_clean_target_as_in_the_reference() -> None:
    """The KL's clean probabilities are not detached (trades.py: F.softmax(model(x_natural)))."""
    model, b = bn_net(), batch()
    method = trades(model, beta=6.0)
    model.train()
    logits = model(b.x)
    logits_adv = model(b.x + 0.05)
    loss = method.cfg.beta * kl_sum(logits_adv, F.softmax(logits, 1)) / b.y.shape[0]
    (grad_clean,) = torch.autograd.grad(loss, logits)
    assert grad_clean.abs().sum() > 0


# ------------------------------------------------------------------ counted passes
def test_a_step_counts_k_plus_3_forwards_and_k_plus_2_backwards() -> None:
    counter = PassCounter()
    model = bn_net()
    ctx = cpu_context(model, counter=counter, image_shape=SHAPE, num_classes=3)
    method, b = TRADES(ctx, TradesConfig(eps=EPS, beta=6.0)), batch(n=16)
    method.train_batch(b, CONTROL)
    k = CONTROL.steps
    assert (counter.forward, counter.backward) == (16 * (k + 3), 16 * (k + 2))


def test_counted_forwards_match_the_forwards_the_model_really_runs() -> None:
    model, counter = bn_net(), PassCounter()
    ctx = cpu_context(model, counter=counter, image_shape=SHAPE, num_classes=3)
    method, b = TRADES(ctx, TradesConfig(eps=EPS, beta=6.0)), batch(n=16)
    calls: list[int] = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    method.train_batch(b, CONTROL)
    assert sum(calls) == counter.forward


# ------------------------------------------------------------------ configs and schedule
def test_trades_defaults_are_the_reference_settings() -> None:
    cfg = compose_resolved(["method=trades"])
    assert (cfg.method.beta, cfg.method.start_std, cfg.method.attack_bn) == (6.0, 0.001, "eval")
    assert cfg.schedule.name == "constant"
    controls = build_schedule(cfg, 15, 12).epoch_controls()
    assert {(c.steps, c.step_size) for c in controls} == {(10, 0.05)}  # the digits threat model


def test_amata_trades_anneals_k_through_the_shared_schedule() -> None:
    cfg = compose_resolved(["method=amata_trades", "epochs=10"])
    assert cfg.schedule.name == "linear"
    controls = build_schedule(cfg, 10, 12).epoch_controls()
    assert [c.steps for c in controls] == [2, 3, 4, 4, 5, 6, 7, 8, 8, 9]
    for c in controls:  # alpha_t = tau / K_t, tau = 0.05 * 10
        assert c.step_size == pytest.approx(0.5 / c.steps)
    method = build_method(cfg.method, cpu_context(bn_net()))
    assert type(method) is TRADES and method.uses_control


def test_trades_rejects_a_negative_beta() -> None:
    with pytest.raises(ConfigError, match=r"method\.beta"):
        compose_resolved(["method=trades", "method.beta=-1"])


def test_trades_cifar10_experiment_is_the_reference_recipe() -> None:
    cfg = compose_resolved(["experiment=trades_cifar10"])
    names = (cfg.dataset.name, cfg.model.name, cfg.method.name)
    assert names == ("cifar10", "wrn34_10", "amata_trades")
    assert (cfg.method.eps, cfg.method.steps, cfg.method.step_size) == (0.031, 10, 0.007)
    recipe = (cfg.epochs, cfg.batch_size, cfg.optim.lr, cfg.optim.weight_decay)
    assert recipe == (76, 128, 0.1, 2e-4)
    assert list(cfg.optim.milestones) == [74]
    assert (cfg.eval.final_threat.eps, cfg.eval.final_threat.step_size) == (0.031, 0.003)
    rows = cfg.paper.rows
    assert rows.trades.clean_accuracy == 0.8492 and rows.trades.robust_accuracy.pgd20 == 0.5661
    assert cfg.report.baseline == "trades"
    baseline = compose_resolved(["experiment=trades_cifar10", "method=trades"])
    assert baseline.name == "trades_cifar10_trades" and baseline.schedule.name == "constant"


# ------------------------------------------------------------------ end to end on digits
def test_trades_and_amata_trades_train_on_digits(tmp_path: Path) -> None:
    out = tmp_path
    (out / "trades").mkdir()
    (out / "amata").mkdir()
    cfg = compose_resolved([*FAST, "method=trades"])
    summary = Trainer(cfg, out / "trades").run()
    k = cfg.method.steps
    assert summary["forward_passes"] == 2 * N_DIGITS * (k + 3)
    assert summary["backward_passes"] == 2 * N_DIGITS * (k + 2)
    rows = read_rows(out / "trades" / "metrics.jsonl")
    assert [r["K"] for r in rows] == [3, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["final"]["clean_accuracy"] > 0.5  # learns while trading off robustness

    amata = Trainer(compose_resolved([*FAST, "method=amata_trades"]), out / "amata").run()
    rows = read_rows(out / "amata" / "metrics.jsonl")
    assert [r["K"] for r in rows] == [2, 3]  # K_min = 2, then 2 + (3 - 2) / 2 rounded half-up
    assert amata["forward_passes"] == N_DIGITS * ((2 + 3) + (3 + 3))


# ------------------------------------------------------------------ WideResNet
@pytest.mark.parametrize(("channels", "image_size"), [(3, 32), (1, 28)])
def test_a_small_wideresnet_has_the_reference_layout(channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen=2, num_classes=10, channels=channels)  # 1 block per stage
    x = torch.rand(2, channels, image_size, image_size)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    widths = [m.conv2.out_channels for m in model.modules() if isinstance(m, WideBlock)]
    assert widths == [32, 64, 128]  # 16k, 32k, 64k
    assert model.layer_one.out_channels == 16
    torch.testing.assert_close(model.forward_from_layer_one(model.layer_one(x)), model(x))


def test_wideresnet_projection_shortcut_takes_the_preactivated_input() -> None:
    torch.manual_seed(0)
    block = WideBlock(4, 8, stride=2).eval()
    x = torch.randn(1, 4, 8, 8)
    assert block.shortcut is not None
    expected = block.conv2(block.relu(block.bn2(block.conv1(block.relu(block.bn1(x))))))
    expected = expected + block.shortcut(block.relu(block.bn1(x)))
    torch.testing.assert_close(block(x), expected)
    identity = WideBlock(8, 8, stride=1).eval()
    assert identity.shortcut is None


def test_wideresnet_depth_must_be_6n_plus_4() -> None:
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=33, widen=10, num_classes=10, channels=3)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params"), [("wrn34_10", 46_160_474), ("wrn28_10", 36_479_194)])
def test_full_size_wideresnets(name: str, params: int) -> None:
    model = build_model(name, num_classes=10, channels=3, image_size=32, mean=None, std=None)
    assert sum(p.numel() for p in model.parameters()) == params  # the reference's 46.2M / 36.5M
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
