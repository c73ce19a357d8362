"""PGD: stays in the threat model, finds higher loss, and leaves the model untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks import attack_mode, pgd_linf
from amata_runner.runtime.passes import PassCounter


def trained_toy_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small BN net trained on two separable blobs of 1x8x8 images."""
    torch.manual_seed(0)
    x = torch.rand(256, 1, 8, 8) * 0.5
    y = torch.randint(0, 2, (256,))
    x[y == 1] += 0.4
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, x.clamp(0, 1), y


def test_pgd_stays_in_eps_ball_and_pixel_range() -> None:
    model, x, y = trained_toy_model()
    for eps, alpha, steps in [(0.1, 0.05, 5), (0.3, 0.5, 3), (8 / 255, 2 / 255, 10)]:
        x_adv = pgd_linf(model, x, y, eps=eps, step_size=alpha, steps=steps)
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_raises_the_loss_and_lowers_accuracy() -> None:
    model, x, y = trained_toy_model()
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y)
        clean_acc = (model(x).argmax(1) == y).float().mean()
    x_adv = pgd_linf(model, x, y, eps=0.2, step_size=0.05, steps=10)
    with torch.no_grad():
        adv_loss = F.cross_entropy(model(x_adv), y)
        adv_acc = (model(x_adv).argmax(1) == y).float().mean()
    assert clean_acc > 0.9
    assert adv_loss > clean_loss * 2
    assert adv_acc < clean_acc
    random_noise = (x + 0.2 * torch.sign(torch.randn_like(x))).clamp(0, 1)
    with torch.no_grad():
        assert adv_loss > F.cross_entropy(model(random_noise), y)


def test_pgd_forms_no_parameter_gradients_and_restores_flags() -> None:
    model, x, y = trained_toy_model()
    model.train()
    model.zero_grad(set_to_none=True)
    pgd_linf(model, x, y, eps=0.1, step_size=0.02, steps=3)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_attack_mode_sets_and_restores_bn_mode() -> None:
    model, x, y = trained_toy_model()
    bn = model[1]
    model.train()
    before = bn.running_mean.clone()
    with attack_mode(model, "eval"):
        assert not model.training
        pgd_linf(model, x, y, eps=0.1, step_size=0.02, steps=3)
    assert model.training
    assert torch.equal(bn.running_mean, before)  # eval-mode attack leaves BN stats alone
    with attack_mode(model, "train"):
        pgd_linf(model, x, y, eps=0.1, step_size=0.02, steps=3)
    assert not torch.equal(bn.running_mean, before)


def test_passes_are_counted_per_example_and_random_start_is_seeded() -> None:
    model, x, y = trained_toy_model()
    counter = PassCounter()
    pgd_linf(model, x, y, eps=0.1, step_size=0.02, steps=7, counter=counter)
    assert (counter.forward, counter.backward) == (7 * 256, 7 * 256)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = pgd_linf(model, x, y, eps=0.1, step_size=0.02, steps=0, generator=g1)
    b = pgd_linf(model, x, y, eps=0.1, step_size=0.02, steps=0, generator=g2)
    assert torch.equal(a, b) and not torch.equal(a, x)
    zero = pgd_linf(model, x, y, eps=0.1, step_size=0.02, steps=0, random_start=False)
    assert torch.equal(zero, x)
