"""MART and Amata+MART: the misclassification weights, the boosted cross-entropy, the CE attack,
counted passes, the schedule, the CIFAR10 experiment and an end-to-end run on digits."""

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
from amata_runner.logging.metrics import read_rows
from amata_runner.methods import build_method
from amata_runner.methods.mart import (
    MART,
    MartConfig,
    boosted_cross_entropy,
    misclassification_weights,
)
from amata_runner.runtime.passes import PassCounter
from conftest import FAST, bn_net, compose_resolved, cpu_context

EPS = 0.1
CONTROL = Control(steps=5, step_size=0.03)
SHAPE = (1, 6, 6)
N_DIGITS = 1238  # digits training examples (1438 less 200 validation)


def mart(model: nn.Module, beta: float = 6.0, counter: PassCounter | None = None) -> MART:
    ctx = cpu_context(model, counter=counter, image_shape=SHAPE, num_classes=3)
    return MART(ctx, MartConfig(eps=EPS, beta=beta))


def batch(n: int = 16, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return Batch(x=x, y=y, index=torch.arange(n))


def random_logits(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, 3, generator=g)
    logits_adv = 3 * torch.randn(n, 3, generator=g)
    return logits, logits_adv, torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------ the objective
def test_weights_are_one_minus_the_clean_probability_of_the_label() -> None:
    logits, _, y = random_logits()
    p = F.softmax(logits, dim=1)
    weights = misclassification_weights(p, y)
    torch.testing.assert_close(weights, 1 - p[torch.arange(len(y)), y], atol=1e-6, rtol=0)
    certain = torch.tensor([[1.0, 0.0, 0.0]])
    assert 0 < misclassification_weights(certain, torch.tensor([0])).item() < 1e-6


def test_kl_term_is_the_weighted_batch_mean_of_per_example_kl() -> None:
    logits, logits_adv, y = random_logits()
    method = mart(bn_net())
    p, q = F.softmax(logits, 1), F.softmax(logits_adv, 1)
    kl = (p * (p.log() - q.log())).sum(1)
    expected = (kl * (1 - p[torch.arange(len(y)), y])).mean()
    with_beta = method.loss(logits, logits_adv, y)
    method.cfg.beta = 0.0
    without = method.loss(logits, logits_adv, y)
    torch.testing.assert_close((with_beta - without) / 6.0, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(without, boosted_cross_entropy(logits_adv, y))


def test_boost_pushes_down_the_most_likely_wrong_class() -> None:
    logits_adv = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])  # row 0: y is top, boost class 1; row 1: class 0 is top and wrong
    probs = F.softmax(logits_adv, 1)
    boosted = torch.stack([probs[0, 1], probs[1, 0]])
    margin = -torch.log(1.0001 - boosted + 1e-12).mean()
    expected = F.cross_entropy(logits_adv, y) + margin
    torch.testing.assert_close(boosted_cross_entropy(logits_adv, y), expected)


def test_misclassified_examples_pull_harder_on_the_kl_term() -> None:
    """An example the clean model gets wrong weighs more than a confidently right one."""
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    y = torch.tensor([0, 0])  # right, then wrong
    w = misclassification_weights(F.softmax(logits, 1), y)
    assert w[1] > 0.9 > 0.1 > w[0]


# ------------------------------------------------------------------ the attack and the update
def test_ce_attack_stays_in_the_ball_increases_ce_and_leaves_bn_stats() -> None:
    model, b = bn_net(), batch()
    method = mart(model)
    model.train()
    bn = model[1]
    running = bn.running_mean.clone()
    x_adv = method.attack(b.x, b.y, CONTROL)
    assert model.training
    torch.testing.assert_close(bn.running_mean, running, rtol=0, atol=0)
    assert (x_adv - b.x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), b.y) > F.cross_entropy(model(b.x), b.y)


def test_a_step_counts_k_plus_2_forwards_and_backwards() -> None:
    counter = PassCounter()
    model = bn_net()
    method, b = mart(model, counter=counter), batch(n=16)
    calls: list[int] = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    method.train_batch(b, CONTROL)
    k = CONTROL.steps
    assert (counter.forward, counter.backward) == (16 * (k + 2), 16 * (k + 2))
    assert sum(calls) == counter.forward


def test_update_moves_the_weights_as_the_reference_objective() -> None:
    model, b = bn_net(), batch()
    reference = copy.deepcopy(model)
    method = mart(model)
    torch.manual_seed(0)
    method.train_batch(b, CONTROL)
    torch.manual_seed(0)
    x_adv = mart(copy.deepcopy(reference)).attack(b.x, b.y, CONTROL)  # the same start and steps
    reference.train()
    logits, logits_adv = reference(b.x), reference(x_adv)
    p, q = F.softmax(logits, 1), F.softmax(logits_adv, 1)
    kl = (p * (torch.log(p) - torch.log(q + 1e-12))).sum(1)
    true = p[torch.arange(len(b.y)), b.y]
    loss = boosted_cross_entropy(logits_adv, b.y) + 6.0 * (kl * (1.0000001 - true)).mean()
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ configs and schedule
def test_amata_mart_anneals_k_through_the_shared_schedule() -> None:
    cfg = compose_resolved(["method=amata_mart", "epochs=10"])
    controls = build_schedule(cfg, 10, 12).epoch_controls()
    assert [c.steps for c in controls] == [2, 3, 4, 4, 5, 6, 7, 8, 8, 9]
    assert all(c.step_size == pytest.approx(0.5 / c.steps) for c in controls)
    method = build_method(cfg.method, cpu_context(bn_net()))
    assert type(method) is MART
    plain = compose_resolved(["method=mart"])
    assert plain.schedule.name == "constant" and plain.method.beta == 6.0


def test_mart_cifar10_experiment_is_the_reference_recipe() -> None:
    cfg = compose_resolved(["experiment=mart_cifar10"])
    assert (cfg.model.name, cfg.method.name, cfg.method.beta) == ("wrn34_10", "amata_mart", 6.0)
    assert (cfg.method.eps, cfg.method.steps, cfg.method.step_size) == (0.031, 10, 0.007)
    recipe = (cfg.epochs, cfg.batch_size, cfg.optim.lr, cfg.optim.weight_decay)
    assert recipe == (90, 128, 0.1, 7e-4)
    assert list(cfg.optim.milestones) == [74, 89]
    assert cfg.paper.rows.mart.robust_accuracy.pgd20 == 0.5856
    assert compose_resolved(["experiment=mart_cifar10", "method=mart"]).name == "mart_cifar10_mart"


# ------------------------------------------------------------------ end to end on digits
def test_mart_trains_on_digits(tmp_path: Path) -> None:
    cfg = compose_resolved([*FAST, "method=amata_mart"])
    summary = Trainer(cfg, tmp_path).run()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["K"] for r in rows] == [2, 3]
    assert summary["forward_passes"] == summary["backward_passes"] == N_DIGITS * ((2 + 2) + (3 + 2))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["final"]["clean_accuracy"] > 0.5
