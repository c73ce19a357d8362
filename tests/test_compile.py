"""compile=true: the compiled step builds the same adversarial examples and the same updates.

Each test trains an eager model and a compiled copy from the same weights on the same batch under
the same random seed, and compares the adversarial examples (or the carried perturbation) and the
parameters after the step.  The default suite compiles with the ``aot_eager`` backend: the same
Dynamo capture and AOTAutograd forward/backward split as inductor, and the same guards, so it
proves the graph is traced correctly and counts recompilations, in seconds.  The ``slow`` tests
use inductor (generated C++ kernels, minutes to compile on a small CPU), where floating-point
differences are expected: a handful of sign flips in the attack, updates within 1e-4.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from amata_runner.attacks.pgd import attack_mode, pgd_linf
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods.base import Method
from amata_runner.methods.free import Free, FreeConfig
from amata_runner.methods.pgd import PGD, PGDConfig
from amata_runner.methods.yopo import YOPO, YOPOConfig
from amata_runner.models import build_model
from amata_runner.runtime.precision import (
    CompiledForward,
    Precision,
    maybe_compile,
    training_precision,
)
from conftest import cpu_context

CPU = torch.device("cpu")
SHAPE = (1, 16, 16)
EPS, ALPHA = 0.2, 0.05


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lenet", num_classes=10, channels=1, image_size=16, mean=None, std=None)


def batch(seed: int = 1, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *SHAPE), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Batch(x, y, torch.arange(n), None)


class Pair:
    """An eager model and a compiled copy (one compiled object per backend, shared by tests)."""

    def __init__(self, backend: str) -> None:
        self.eager = tiny_model()
        self.start = copy.deepcopy(self.eager.state_dict())
        self.compiled = CompiledForward(copy.deepcopy(self.eager), CPU, backend=backend)

    def reset(self) -> None:
        self.eager.load_state_dict(self.start)
        self.compiled.load_state_dict(self.start)

    def graphs(self) -> int:
        return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def aot() -> Iterator[Pair]:
    torch._dynamo.reset()
    yield Pair("aot_eager")
    torch._dynamo.reset()


def context(model: torch.nn.Module) -> object:
    return cpu_context(
        model, lr=0.05, num_train=8, image_shape=SHAPE, num_classes=10, iters_per_epoch=1
    )


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=atol, rtol=0), name


def attack_pair(pair: Pair, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = batch()
    out = []
    for model in (pair.eager, pair.compiled):
        with attack_mode(model, "eval"):
            g = torch.Generator().manual_seed(7)
            out.append(
                pgd_linf(model, data.x, data.y, eps=EPS, step_size=ALPHA, steps=steps, generator=g)
            )
    return out[0], out[1]


def train_both(pair: Pair, build: type[Method] | object, controls: list[Control]) -> list[Method]:
    """Build the method around each model and train both on the same batches and seeds."""
    methods = []
    for model in (pair.eager, pair.compiled):
        method = build(context(model))  # type: ignore[operator]
        for i, control in enumerate(controls):
            torch.manual_seed(100 + i)
            method.train_batch(batch(seed=i), control)
        methods.append(method)
    return methods


def test_pgd_same_examples_and_update(aot: Pair) -> None:
    aot.reset()
    eager_adv, compiled_adv = attack_pair(aot, steps=5)
    assert torch.equal(eager_adv, compiled_adv)
    train_both(aot, lambda ctx: PGD(ctx, PGDConfig(eps=EPS)), [Control(5, ALPHA)])
    assert_same_params(aot.eager, aot.compiled, atol=1e-6)


def test_amata_k_changes_between_epochs_without_recompiling(aot: Pair) -> None:
    """Amata's K rises 2 -> 10: after the first K the compiled graphs serve every other K."""
    aot.reset()
    method = PGD(context(aot.compiled), PGDConfig(eps=EPS))
    torch.manual_seed(0)
    method.train_batch(batch(), Control(2, 0.25))  # attack graph (eval) + update graph (train)
    after_first = aot.graphs()
    assert after_first > 0  # it did compile
    for k in range(3, 11):
        method.start_epoch(k, Control(k, 0.5 / k))
        method.train_batch(batch(seed=k), Control(k, 0.5 / k))
    assert aot.graphs() == after_first
    aot.reset()
    controls = [Control(k, 0.5 / k) for k in (2, 4, 6)]
    train_both(aot, lambda ctx: PGD(ctx, PGDConfig(eps=EPS)), controls)
    assert_same_params(aot.eager, aot.compiled, atol=1e-6)


def test_free_same_perturbation_and_updates(aot: Pair) -> None:
    aot.reset()
    eager, compiled = train_both(
        aot, lambda ctx: Free(ctx, FreeConfig(eps=EPS, steps=3)), [Control(3, EPS), Control(3, EPS)]
    )
    assert isinstance(eager, Free) and isinstance(compiled, Free)
    assert eager.delta is not None and compiled.delta is not None
    assert torch.equal(eager.delta, compiled.delta)
    assert_same_params(aot.eager, aot.compiled, atol=1e-6)


def test_yopo_same_updates_through_the_compiled_split(aot: Pair) -> None:
    aot.reset()
    train_both(
        aot,
        lambda ctx: YOPO(ctx, YOPOConfig(eps=EPS, inner_steps=3, lr_divisor=1)),
        [Control(2, 0.01)] * 2,
    )
    assert_same_params(aot.eager, aot.compiled, atol=1e-6)


def test_compiled_wrapper_keeps_the_models_state_and_modes() -> None:
    model = tiny_model()
    wrapped = maybe_compile(model, True, CPU)
    assert maybe_compile(model, False, CPU) is model
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert len(list(wrapped.parameters())) == len(list(model.parameters()))
    wrapped.eval()
    assert not model.training
    assert wrapped.layer_one is not model.layer_one  # the compiled piece, same parameters
    assert next(iter(wrapped.layer_one.parameters())) is next(iter(model.layer_one.parameters()))


def test_precision_modes() -> None:
    cuda = torch.device("cuda")
    assert training_precision("auto", CPU) == "fp32"
    assert training_precision("auto", cuda) in ("bf16", "bf16_update")
    with pytest.raises(ValueError, match="precision"):
        training_precision("fp16", CPU)
    x = torch.ones(2, 2)
    for mode, attack_dtype, update_dtype in [
        ("fp32", torch.float32, torch.float32),
        ("bf16", torch.bfloat16, torch.bfloat16),
        ("bf16_update", torch.float32, torch.bfloat16),
    ]:
        p = Precision(mode, CPU)
        with p.attack():
            assert (x @ x).dtype == attack_dtype
        with p.update():
            assert (x @ x).dtype == update_dtype


@pytest.fixture(scope="module")
def inductor() -> Iterator[Pair]:
    torch._dynamo.reset()
    yield Pair("inductor")
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_pgd_and_amata_match_eager_without_a_recompilation_storm(
    inductor: Pair,
) -> None:
    inductor.reset()
    eager_adv, compiled_adv = attack_pair(inductor, steps=5)
    assert (eager_adv != compiled_adv).float().mean() < 0.01  # sign flips at |grad| ~ 0 only
    assert (eager_adv - compiled_adv).abs().max() <= 2 * EPS + 1e-6
    controls = [Control(k, 0.5 / k) for k in (2, 5, 10)]
    train_both(inductor, lambda ctx: PGD(ctx, PGDConfig(eps=EPS)), controls[:1])
    graphs = inductor.graphs()
    inductor.reset()
    train_both(inductor, lambda ctx: PGD(ctx, PGDConfig(eps=EPS)), controls)
    assert inductor.graphs() == graphs  # K = 5 and 10 reuse the K = 2 graphs
    assert_same_params(inductor.eager, inductor.compiled, atol=1e-4)


@pytest.mark.slow
def test_inductor_free_and_yopo_match_eager(inductor: Pair) -> None:
    inductor.reset()
    train_both(inductor, lambda ctx: Free(ctx, FreeConfig(eps=EPS, steps=2)), [Control(2, EPS)])
    assert_same_params(inductor.eager, inductor.compiled, atol=1e-4)
    inductor.reset()
    train_both(
        inductor,
        lambda ctx: YOPO(ctx, YOPOConfig(eps=EPS, inner_steps=2, lr_divisor=1)),
        [Control(2, 0.01)],
    )
    assert_same_params(inductor.eager, inductor.compiled, atol=1e-4)
