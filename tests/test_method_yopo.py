"""YOPO-m-n and Amata+YOPO: layer one learns through the Hamiltonian, counted passes, the budget,
the annealed (K, sigma), and short end-to-end runs (digits with LeNet/SmallCNN, CIFAR-shaped)."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

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
from amata_runner.methods.base import TrainContext
from amata_runner.methods.yopo import YOPO, YOPOConfig
from amata_runner.models import build_model
from amata_runner.runtime.checkpoint import load_checkpoint
from conftest import FAST, amata_run, compose_resolved, cpu_context

# --------------------------------------------------------------------------- helpers


class TinySplit(nn.Module):
    """Two linear layers, so the gradients have closed forms: z = W1 x + b1, logits = W2 z + b2."""

    def __init__(self, d: int = 4, h: int = 3, c: int = 3) -> None:
        super().__init__()
        self.layer_one = nn.Sequential(nn.Flatten(), nn.Linear(d, h))
        self.rest = nn.Linear(h, c)

    def forward_from_layer_one(self, z: torch.Tensor) -> torch.Tensor:
        return self.rest(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_layer_one(self.layer_one(x))


def context(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> TrainContext:
    return cpu_context(model, optimizer=optimizer, image_shape=(1, 2, 2), num_classes=3)


def batch_of(x: torch.Tensor, y: torch.Tensor) -> Batch:
    return Batch(x=x, y=y, index=torch.arange(x.shape[0]), crop=None)


def yopo_by_hand(
    net: TinySplit,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    *,
    m: int,
    n: int,
    eps: float,
    sigma: float,
    ce_repeats: set[int],
) -> dict[str, torch.Tensor]:
    """The summed gradients U (rest) and V (layer one) of YOPO-m-n, written out with matrices."""
    w1, b1 = net.layer_one[1].weight.detach(), net.layer_one[1].bias.detach()
    w2, b2 = net.rest.weight.detach(), net.rest.bias.detach()
    x0 = x.flatten(1)
    xa = (x0 + start.flatten(1)).clamp(0, 1)
    grads = {k: torch.zeros_like(v) for k, v in {"w1": w1, "b1": b1, "w2": w2, "b2": b2}.items()}
    for j in range(m):
        z = xa @ w1.T + b1
        logits = z @ w2.T + b2
        g_logits = (logits.softmax(1) - F.one_hot(y, 3).to(x.dtype)) / x.shape[0]  # mean CE
        grads["w2"] += g_logits.T @ z
        grads["b2"] += g_logits.sum(0)
        g_z = g_logits @ w2  # dL/dz = -p, the costate frozen for this repeat
        if j in ce_repeats:  # layer one's own CE gradient at this repeat's input
            grads["w1"] += g_z.T @ xa
            grads["b1"] += g_z.sum(0)
        for _ in range(n):  # d<dL/dz, W1 x + b1>/dx = dL/dz W1
            xa = xa + sigma * (g_z @ w1).sign()
            xa = torch.clamp(xa, x0 - eps, x0 + eps).clamp(0, 1)
        grads["w1"] += g_z.T @ xa  # -dH/dW1 at the final perturbation
        grads["b1"] += g_z.sum(0)
    return grads


def params_of(net: TinySplit) -> dict[str, torch.Tensor]:
    return {
        "w1": net.layer_one[1].weight.detach().clone(),
        "b1": net.layer_one[1].bias.detach().clone(),
        "w2": net.rest.weight.detach().clone(),
        "b2": net.rest.bias.detach().clone(),
    }


# --------------------------------------------------------------------------- the update


@pytest.mark.parametrize(
    ("layer_one_ce", "ce_repeats", "divisor"),
    [("none", set(), 1.0), ("none", set(), 2.0), ("all", {0, 1}, 1.0), ("after_first", {1}, 1.0)],
)
def test_update_matches_the_hamiltonian_by_hand(
    layer_one_ce: str, ce_repeats: set[int], divisor: float
) -> None:
    """Layer one moves by the Hamiltonian gradient V (plus the CE gradient only when the quirk flag
    asks for it); the rest by the summed CE gradient U of the adversarial inputs; lr / divisor."""
    torch.manual_seed(0)
    net = TinySplit().double()
    x = 0.3 + 0.4 * torch.rand(5, 1, 2, 2, dtype=torch.float64)  # no [0,1] clipping in play
    y = torch.tensor([0, 1, 2, 1, 0])
    eps, sigma, m, n, lr = 0.1, 0.04, 2, 3, 0.5  # 3 * 0.04 > eps: the ball projection is active
    before = params_of(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    method = YOPO(
        context(net, optimizer),
        YOPOConfig(
            eps=eps,
            inner_steps=n,
            layer_one_ce=layer_one_ce,
            lr_divisor=divisor,
        ),
    )

    torch.manual_seed(1)
    start = torch.empty_like(x).uniform_(-eps, eps)  # the draw the method makes first
    grads = yopo_by_hand(net, x, y, start, m=m, n=n, eps=eps, sigma=sigma, ce_repeats=ce_repeats)
    torch.manual_seed(1)
    method.train_batch(batch_of(x, y), Control(steps=m, step_size=sigma))

    after = params_of(net)
    for key in before:
        expected = before[key] - lr / divisor * grads[key]
        torch.testing.assert_close(after[key], expected, rtol=1e-9, atol=1e-12, msg=key)
    assert optimizer.param_groups[0]["lr"] == lr  # the engine's lr is left as it was


def test_layer_one_gets_no_ce_gradient_by_default() -> None:
    """With layer_one_ce=none and the Hamiltonian of a zero costate, layer one does not move."""
    torch.manual_seed(0)
    net = TinySplit()
    with torch.no_grad():
        net.rest.weight.zero_()  # dL/dz = g_logits W2 = 0, but W2, b2 still get CE gradients
    w1 = net.layer_one[1].weight.detach().clone()
    b2 = net.rest.bias.detach().clone()
    method = YOPO(context(net), YOPOConfig(eps=0.1, inner_steps=2, lr_divisor=1))
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    method.train_batch(batch_of(x, y), Control(steps=2, step_size=0.05))
    assert torch.equal(net.layer_one[1].weight, w1)
    assert not torch.equal(net.rest.bias, b2)


def test_separate_layer_one_optimiser_matches_the_shared_one_until_a_milestone() -> None:
    """The reference's second SGD for layer one (same lr, momentum, wd) equals one optimiser over
    all parameters; its own milestones then lower only layer one's lr (x0.1)."""

    def train(milestones: list[int] | None, epochs: int) -> tuple[TinySplit, YOPO]:
        torch.manual_seed(0)
        net = TinySplit()
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
        method = YOPO(
            context(net, opt),
            YOPOConfig(
                eps=0.1,
                inner_steps=2,
                lr_divisor=2.0,
                layer_one_milestones=milestones,
            ),
        )
        x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
        for epoch in range(epochs):
            method.start_epoch(epoch, None)
            for _ in range(2):
                method.train_batch(batch_of(x, y), Control(steps=2, step_size=0.05))
        return net, method

    shared, _ = train(None, 2)
    separate, method = train([], 2)
    for a, b in zip(shared.parameters(), separate.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    decayed, method = train([1], 2)
    assert method._layer_one_optimizer is not None
    assert method._layer_one_optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    assert method.ctx.optimizer.param_groups[0]["lr"] == 0.2  # the rest keeps the run's lr
    assert not torch.allclose(decayed.layer_one[1].weight, shared.layer_one[1].weight)

    # Its state (momentum buffers) and the layer-one pass counts survive a weights_only load.
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    _, fresh = train([1], 0)
    fresh.load_state_dict(state)
    assert fresh.layer_one_forward == method.layer_one_forward > 0
    saved = state["layer_one_optimizer"]["state"]
    assert fresh._layer_one_optimizer is not None
    restored = fresh._layer_one_optimizer.state_dict()["state"]
    assert all(
        torch.equal(saved[k]["momentum_buffer"], restored[k]["momentum_buffer"]) for k in saved
    )


# --------------------------------------------------------------------------- passes and budget


def lenet_method(**kwargs: Any) -> tuple[nn.Module, YOPO]:
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=10, channels=1, image_size=28, mean=[0.2], std=[0.3])
    settings: dict[str, Any] = {"lr_divisor": 1, **kwargs}
    return model, YOPO(
        context(model, torch.optim.SGD(model.parameters(), lr=0.01)), YOPOConfig(**settings)
    )


def test_pass_counts_match_m_and_n_and_the_calls_made() -> None:
    model, method = lenet_method(eps=0.2, inner_steps=4)
    calls = {"layer_one": 0, "rest": 0}

    def count(name: str) -> Any:
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    model.net.layer_one.register_forward_hook(count("layer_one"))
    model.net.rest.register_forward_hook(count("rest"))
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    method.train_batch(batch_of(x, y), Control(steps=3, step_size=0.05))  # YOPO-3-4 on 5 images
    counter = method.ctx.counter
    assert (counter.forward, counter.backward) == (5 * 3, 5 * 3)  # m full passes per example
    # per repeat: 4 inner steps + 1 Hamiltonian through layer one alone
    per_example = 3 * (4 + 1)
    assert method.metrics() == {
        "layer_one_forward_passes": 5 * per_example,
        "layer_one_backward_passes": 5 * per_example,
    }
    assert calls == {"rest": 3, "layer_one": 3 * (1 + 4 + 1)}  # full + inner + Hamiltonian

    method.train_batch(batch_of(x[:2], y[:2]), Control(steps=2, step_size=0.05))
    assert counter.forward == 15 + 2 * 2
    assert method.metrics()["layer_one_forward_passes"] == 75 + 2 * 2 * 5  # cumulative
    assert method.knobs(Control(steps=2, step_size=0.05)) == {"K": 2, "n": 4, "sigma": 0.05}


@pytest.mark.parametrize("clip_start", [True, False])
def test_every_input_stays_in_the_eps_ball_and_in_0_1(clip_start: bool) -> None:
    """Recorded at layer one (un-normalised): the full passes, inner steps and the Hamiltonian."""
    eps = 0.2
    model, method = lenet_method(eps=eps, inner_steps=3, clip_start=clip_start)
    seen: list[torch.Tensor] = []
    model.net.layer_one.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach() * model.std + model.mean)
    )
    x = torch.rand(6, 1, 28, 28)
    x[:, :, :10] = 0.0  # pixels on both edges of the image domain
    x[:, :, -10:] = 1.0
    y = torch.randint(0, 10, (6,))
    method.train_batch(batch_of(x, y), Control(steps=3, step_size=0.3))  # big steps: clipping
    assert len(seen) == 3 * (1 + 3 + 1)
    tol = 1e-5  # normalise/un-normalise round-off
    for x_in in seen:
        assert ((x_in - x).abs() <= eps + tol).all()
    outside = [bool(((x_in < -tol) | (x_in > 1 + tol)).any()) for x_in in seen]
    # Only the first full pass can see the reference's unclipped random start.
    assert outside == [not clip_start] + [False] * (len(seen) - 1)
    assert any(((x_in - x).abs() > eps / 2).any() for x_in in seen[1:])  # it did move


# --------------------------------------------------------------------------- configs


def test_amata_yopo_anneals_k_from_2_to_5_with_k_sigma_tau() -> None:
    """Section 3.2: K rises (2 -> 5) and sigma falls, K * sigma = tau = 5 * method.step_size."""
    cfg = compose_resolved(["method=amata_yopo", "dataset=mnist"])
    assert (cfg.schedule.name, cfg.schedule.k_min, cfg.method.steps) == ("linear", 2, 5)
    assert (cfg.method.inner_steps, cfg.method.step_size, cfg.method.lr_divisor) == (10, 0.01, 5)
    controls = build_schedule(cfg, 40, 235).epoch_controls()
    ks = [c.steps for c in controls]
    assert ks[0] == 2 and ks[-1] == 5 and set(ks) == {2, 3, 4, 5}
    assert ks == sorted(ks)
    for c in controls:
        assert c.steps * c.step_size == pytest.approx(5 * 0.01)
    sigmas = [c.step_size for c in controls]
    assert sigmas[0] == pytest.approx(0.025) and sigmas[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in itertools.pairwise(sigmas))

    plain = compose_resolved(["method=yopo", "dataset=mnist"])  # YOPO-5-10, constant
    assert {(c.steps, c.step_size) for c in build_schedule(plain, 40, 235).epoch_controls()} == {
        (5, 0.01)
    }


def test_cifar10_setting_and_bad_values() -> None:
    cfg = compose_resolved(
        ["dataset=cifar10", "model=preactresnet18", "method=yopo", "method.inner_steps=3"]
    )
    assert (cfg.method.steps, cfg.method.inner_steps) == (5, 3)  # YOPO-5-3
    assert cfg.method.eps == pytest.approx(8 / 255)
    assert cfg.method.step_size == pytest.approx(2 / 255)
    assert cfg.method.layer_one_ce == "none" and cfg.method.layer_one_milestones is None
    for override, key in [
        ("method.inner_steps=0", "method.inner_steps"),
        ("method.steps=0", "method.steps"),
        ("method.layer_one_ce=some", "method.layer_one_ce"),
        ("method.layer_one_milestones=[19,15]", "method.layer_one_milestones"),
        ("method.eps=0", "method.eps"),
        ("method.lr_divisor=0", "method.lr_divisor"),
    ]:
        with pytest.raises(ConfigError) as info:
            compose_resolved(["method=yopo", override])
        assert info.value.key == key
    with pytest.raises(ConfigError, match=r"schedule\.k_min"):
        compose_resolved(["method=amata_yopo", "schedule.k_min=6"])


def test_amata_run_composes_both_configs(tmp_path: Path) -> None:
    for name in ("yopo", "amata_yopo"):
        result = amata_run([f"method={name}", "--cfg", "job"], cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"name: {name}" in result.stdout and "inner_steps: 10" in result.stdout


# --------------------------------------------------------------------------- end to end

# Digits with 10% for training (180 images: 2 batches of 128) keeps the runs short on a CPU.
# 180 training digits, all of them trained on (no validation hold-out: the counts below are exact).
SHORT = [
    *FAST,
    "dataset.test_fraction=0.9",
    "eval.validation.size=0",
    "eval.final=false",
    "method.inner_steps=2",
]


@pytest.mark.parametrize("model", ["lenet", "smallcnn"])
@pytest.mark.parametrize(("method", "ks"), [("yopo", [5, 5]), ("amata_yopo", [2, 4])])
def test_short_run_on_digits(tmp_path: Path, method: str, ks: list[int], model: str) -> None:
    summary = Trainer(
        compose_resolved([*SHORT, f"method={method}", f"model={model}"]), tmp_path
    ).run()
    rows = read_rows(tmp_path / "metrics.jsonl")
    n_train = summary["examples"] // 2
    assert [r["K"] for r in rows] == ks  # amata: K_t = 2 + 3 t / 2, rounded half up
    assert rows[-1]["sigma"] == pytest.approx(0.05 * 5 / ks[-1])
    assert summary["forward_passes"] == summary["backward_passes"] == n_train * sum(ks)
    assert rows[-1]["layer_one_forward_passes"] == n_train * sum(ks) * (2 + 1)
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # finite, not NaN
    state = load_checkpoint(tmp_path / "last.ckpt")["method"]
    assert state["layer_one_backward_passes"] == rows[-1]["layer_one_backward_passes"]


def test_cifar_shaped_smoke_run(tmp_path: Path) -> None:
    """YOPO-m-3 on synthetic 3x32x32 images with the PreActResNet18 (layer one = its stem conv),
    the CIFAR code's layer-one CE gradients and its separate layer-one optimiser."""
    overrides = [
        *FAST,
        "dataset=synthetic",
        "dataset.channels=3",
        "dataset.image_size=32",
        "model=preactresnet18",
        "dataset.num_train=32",
        "dataset.num_test=16",
        "eval.validation.size=0",
        "batch_size=32",
        "epochs=1",
        "method=yopo",
        "method.steps=2",
        "method.inner_steps=3",
        "method.layer_one_ce=all",
        "method.layer_one_milestones=[30,34]",
    ]
    summary = Trainer(compose_resolved(overrides), tmp_path).run()
    assert summary["forward_passes"] == 32 * 2
    assert summary["last_eval"]["layer_one_forward_passes"] == 32 * 2 * 4
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["method"]
    assert "layer_one_optimizer" in state
