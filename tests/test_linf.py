"""The L-inf primitives: starts and projections land in the eps-ball and [0,1], projections are
idempotent, a start is one uniform draw, pgd_linf is the last PGD iterate, and the periodic
evaluation is the suite on the subset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amata_runner.attacks.linf import (
    clip_to_image,
    project,
    project_delta,
    random_delta,
    random_start,
    signed_step,
    uniform_noise,
)
from amata_runner.attacks.pgd import last, pgd_deltas, pgd_iterates, pgd_linf
from amata_runner.attacks.suite import SuiteOptions, run_suite
from amata_runner.evaluation import AttackSpec, evaluate

TOL = 1e-6  # x + delta - x may differ from delta by an ulp


def saturated_images(seed: int = 0) -> torch.Tensor:
    """Images with pixels at 0, at 1 and in between, where the [0,1] clip matters."""
    torch.manual_seed(seed)
    x = torch.rand(8, 1, 6, 6)
    x[:, :, :2] = 0.0
    x[:, :, -2:] = 1.0
    return x


def in_ball_and_box(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> bool:
    inside_ball = bool((x_adv - x).abs().max() <= eps + TOL)
    return inside_ball and bool(x_adv.min() >= 0.0) and bool(x_adv.max() <= 1.0)


def toy_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)).eval()


@pytest.mark.parametrize("eps", [0.05, 0.3, 1.0])
def test_random_starts_lie_in_the_ball_and_the_box(eps: float) -> None:
    x = saturated_images()
    gen = torch.Generator().manual_seed(0)
    assert in_ball_and_box(x + random_delta(x, eps, gen), x, eps)
    assert in_ball_and_box(random_start(x, eps, gen), x, eps)
    # unclipped (Fast's clamp_start=false, YOPO's clip_start=false): in the ball, not the box
    raw = random_start(x, eps, gen, clip=False)
    assert (raw - x).abs().max() <= eps + TOL and raw.min() < 0.0 and raw.max() > 1.0
    assert torch.equal(
        random_delta(x, eps, torch.Generator().manual_seed(4), clip=False),
        uniform_noise(x, eps, torch.Generator().manual_seed(4)),
    )


def test_the_two_start_forms_are_one_draw_of_the_same_point() -> None:
    x = saturated_images()
    delta = random_delta(x, 0.2, torch.Generator().manual_seed(5))
    image = random_start(x, 0.2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(x + delta, image, atol=TOL, rtol=0)


def test_a_start_consumes_exactly_one_uniform_draw_of_the_global_stream() -> None:
    x = saturated_images()
    torch.manual_seed(7)
    random_delta(x, 0.1)
    after_start = torch.rand(5)
    torch.manual_seed(7)
    torch.empty_like(x).uniform_(-0.1, 0.1)
    assert torch.equal(after_start, torch.rand(5))
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(9)
    random_start(x, 0.1, gen)  # a private generator leaves the global stream alone
    untouched = torch.rand(5)
    torch.manual_seed(9)
    assert torch.equal(untouched, torch.rand(5))


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_projections_land_in_both_sets_and_are_idempotent(eps: float) -> None:
    x = saturated_images()
    torch.manual_seed(2)
    far = x + 2 * torch.randn_like(x)  # far outside the ball and the box
    image = project(far, x, eps)
    assert in_ball_and_box(image, x, eps)
    assert torch.equal(project(image, x, eps), image)
    delta = project_delta(far - x, x, eps)
    assert in_ball_and_box(x + delta, x, eps)
    torch.testing.assert_close(project_delta(delta, x, eps), delta, atol=TOL, rtol=0)
    again = project_delta(delta, x, eps)
    assert torch.equal(project_delta(again, x, eps), again)
    # the ball alone (Free's carried state): |delta| <= eps exactly, the image may leave [0,1]
    ball = project_delta(far - x, x, eps, clip=False)
    assert ball.abs().max() <= eps and torch.equal(ball, (far - x).clamp(-eps, eps))
    torch.testing.assert_close(clip_to_image(ball, x), delta, atol=0, rtol=0)


def test_points_inside_both_sets_are_left_where_they_are() -> None:
    x = saturated_images()
    inside = random_start(x, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(project(inside, x, 0.1), inside)


def test_signed_step_moves_every_pixel_by_the_step_or_not_at_all() -> None:
    point = torch.zeros(3, 4)
    grad = torch.tensor([[1.0, -2.0, 0.0, 3.0]] * 3)
    assert torch.equal(signed_step(point, grad, 0.5), torch.tensor([[0.5, -0.5, 0.0, 0.5]] * 3))
    moving = torch.tensor([1.0, 0.0, 1.0]).view(-1, 1)  # the restarts protocol's freeze mask
    stepped = signed_step(point, grad, moving * 0.5)
    assert torch.equal(stepped[1], point[1]) and torch.equal(stepped[0], stepped[2])
    # a low-precision gradient does not round the step size
    half = signed_step(point, grad.to(torch.bfloat16), 0.1)
    assert half.dtype == torch.float32 and torch.equal(half, signed_step(point, grad, 0.1))


@pytest.mark.parametrize("random", [True, False])
def test_pgd_linf_is_the_last_iterate_of_pgd_iterates(random: bool) -> None:
    model, x = toy_model(), saturated_images()
    y = torch.arange(8) % 5
    eps, alpha, steps = 0.2, 0.07, 5
    start = (
        random_delta(x, eps, torch.Generator().manual_seed(6)) if random else torch.zeros_like(x)
    )
    iterates = list(pgd_iterates(model, x, y, start, eps=eps, step_size=alpha, steps=steps))
    x_adv = pgd_linf(
        model,
        x,
        y,
        eps=eps,
        step_size=alpha,
        steps=steps,
        random_start=random,
        generator=torch.Generator().manual_seed(6),
    )
    assert len(iterates) == steps + 1 and torch.equal(iterates[0], x + start)
    assert torch.equal(x_adv, iterates[-1])
    assert all(in_ball_and_box(it, x, eps) for it in iterates)
    deltas = pgd_deltas(model, x, y, start, eps=eps, step_size=alpha, steps=steps)
    assert torch.equal(x + last(deltas), x_adv)


def test_pgd_linf_with_a_loss_is_the_last_iterate_of_that_loss() -> None:
    model, x = toy_model(), saturated_images()
    y = torch.arange(8) % 5

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(logits, labels, reduction="sum")  # descend instead

    start = torch.zeros_like(x)
    iterates = pgd_iterates(model, x, y, start, eps=0.1, step_size=0.03, steps=3, loss_fn=loss)
    x_adv = pgd_linf(
        model, x, y, eps=0.1, step_size=0.03, steps=3, random_start=False, loss_fn=loss
    )
    assert torch.equal(x_adv, last(iterates))


def test_pgd_iterates_leave_parameter_gradients_usable_between_steps() -> None:
    model, x = toy_model(), saturated_images()
    y = torch.arange(8) % 5
    for point in pgd_iterates(model, x, y, torch.zeros_like(x), eps=0.1, step_size=0.03, steps=2):
        assert all(p.requires_grad for p in model.parameters())
        F.cross_entropy(model(point), y).backward()  # the criterion's grad_sq_norm does this
    assert all(p.grad is not None for p in model.parameters())


def test_periodic_evaluation_is_the_suite_on_the_subset() -> None:
    model = toy_model()
    x = saturated_images()
    images = (x * 255).round().to(torch.uint8)
    labels = torch.arange(8) % 5
    for random in (True, False):
        spec = AttackSpec(eps=0.2, step_size=0.05, steps=4, random_start=random)
        torch.manual_seed(11)
        result = evaluate(model, images, labels, spec, batch_size=3, seed=2)
        after = torch.rand(3)
        torch.manual_seed(11)
        assert torch.equal(after, torch.rand(3))  # the training stream is not drawn from
        options = SuiteOptions(eps=0.2, step_size=0.05, pgd_random_start=random)
        suite = run_suite(model, images, labels, ["clean", "pgd4"], options, batch_size=3, seed=2)
        assert result.total == 8
        assert result.clean_correct == suite["clean"]["correct"]
        assert result.robust_correct == suite["pgd4"]["correct"]
        assert suite["pgd4"]["params"]["random_start"] is random
