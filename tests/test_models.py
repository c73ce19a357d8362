"""Behaviour of the model zoo: shapes, gradients, the layer_one split, normalisation, structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amata_runner.errors import ConfigError
from amata_runner.models import _BUILDERS as BUILDERS
from amata_runner.models import (
    MODEL_NAMES,
    Normalized,
    PreActBlock,
    PreActResNet18,
    SmallCNN,
    SplitAtLayerOne,
    TimmResNet,
    build_model,
)

NUM_CLASSES = 10
# (channels, image_size): MNIST-like and CIFAR-like inputs.
SHAPES = [(1, 28), (3, 32)]
# resnet50 is slow on CPU; it gets a single forward/backward (in test_resnet50_forward_backward).
# The WideResNets (36M/46M parameters) are checked at reduced depth/width in
# test_method_trades.py, full size there under -m slow.
HEAVY_NAMES = ("resnet50", "wrn28_10", "wrn34_10")
LIGHT_NAMES = [n for n in MODEL_NAMES if n not in HEAVY_NAMES]


def _build(name: str, channels: int, image_size: int, **stats: object) -> nn.Module:
    torch.manual_seed(0)
    kwargs: dict[str, object] = {"mean": None, "std": None, **stats}
    return build_model(
        name, num_classes=NUM_CLASSES, channels=channels, image_size=image_size, **kwargs
    )


def _input(channels: int, image_size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(
        batch, channels, image_size, image_size, generator=torch.Generator().manual_seed(1)
    )


def _check_forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    """Logits have the right shape, are finite, and every parameter receives a gradient.

    In train mode no parameter legitimately goes without a gradient in these nets (no unused
    branches, BN affine params are all on the path), so none are skipped. Grads may be all-zero
    (SmallCNN's zero-initialised last layer blocks gradient to earlier layers at init; timm's
    zero-initialised last BN in each block blocks its branch), so only presence and finiteness are
    checked.
    """
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n


def test_builders_match_model_names() -> None:
    assert tuple(BUILDERS) == MODEL_NAMES


@pytest.mark.parametrize("name", LIGHT_NAMES)
@pytest.mark.parametrize(("channels", "image_size"), SHAPES)
def test_logits_shape_and_gradients(name: str, channels: int, image_size: int) -> None:
    model = _build(name, channels, image_size)
    _check_forward_backward(model, _input(channels, image_size))


def test_resnet50_forward_backward() -> None:
    model = _build("resnet50", 3, 32)
    assert isinstance(model, TimmResNet)
    _check_forward_backward(model, _input(3, 32))


@pytest.mark.parametrize("name", LIGHT_NAMES)
@pytest.mark.parametrize(("channels", "image_size"), SHAPES)
def test_forward_is_rest_of_layer_one(name: str, channels: int, image_size: int) -> None:
    model = _build(name, channels, image_size).eval()
    assert isinstance(model, SplitAtLayerOne)
    x = _input(channels, image_size)
    with torch.no_grad():
        split = model.forward_from_layer_one(model.layer_one(x))
        torch.testing.assert_close(split, model(x), rtol=0, atol=0)


@pytest.mark.parametrize(("channels", "image_size"), SHAPES)
def test_timm_wrapper_matches_timm_forward(channels: int, image_size: int) -> None:
    # Same wrapper class serves resnet50; the split is only checked here to keep resnet50 to one
    # forward pass.
    model = _build("resnet18", channels, image_size).eval()
    assert isinstance(model, TimmResNet)
    assert model.layer_one is model.model.conv1
    x = _input(channels, image_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.model(x), rtol=0, atol=0)
    # layer_one is not registered twice, so the state dict holds timm's names once.
    assert not any(k.startswith("layer_one") for k in model.state_dict())


@pytest.mark.parametrize("name", ["lenet", "smallcnn"])
def test_layer_one_includes_relu(name: str) -> None:
    model = _build(name, 1, 28)
    x = _input(1, 28) - 0.5
    assert (model.layer_one(x) >= 0).all()
    assert isinstance(list(model.layer_one.children())[-1], nn.ReLU)


def test_preactresnet_layer_one_is_raw_conv() -> None:
    model = _build("preactresnet18", 3, 32)
    assert isinstance(model.layer_one, nn.Conv2d)
    assert model.layer_one.bias is None
    assert model.layer_one.stride == (1, 1)


# --- Normalized -------------------------------------------------------------------------------

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)


def _normalized() -> Normalized:
    model = _build("lenet", 3, 32, mean=MEAN, std=STD)
    assert isinstance(model, Normalized)
    return model.eval()


def test_normalized_forward_is_net_of_normalised_input() -> None:
    model = _normalized()
    x = _input(3, 32)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - mean) / std))
        split = model.forward_from_layer_one(model.layer_one(model.normalize(x)))
        torch.testing.assert_close(split, model(x), rtol=0, atol=0)
    assert model.layer_one is model.net.layer_one


def test_normalized_stats_are_buffers_outside_state_dict() -> None:
    model = _normalized()
    assert {n for n, _ in model.named_buffers()} >= {"mean", "std"}
    assert model.mean.shape == model.std.shape == (1, 3, 1, 1)
    keys = set(model.state_dict())
    assert "mean" not in keys and "std" not in keys
    assert keys == {f"net.{k}" for k in model.net.state_dict()}


def test_normalized_follows_dtype_and_device() -> None:
    model = _normalized().to(torch.float64)
    assert model.mean.dtype == model.std.dtype == torch.float64
    out = model(_input(3, 32).double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    # The meta device runs shape logic only, but fails on a buffer left on another device.
    meta = _normalized().to("meta")
    assert meta.mean.device.type == "meta"
    assert meta(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, NUM_CLASSES)


def test_no_stats_means_no_wrapper() -> None:
    assert not isinstance(_build("lenet", 1, 28), Normalized)


@pytest.mark.parametrize(
    ("stats", "key"),
    [
        ({"mean": (0.5, 0.5), "std": STD}, "dataset.mean"),
        ({"mean": MEAN, "std": (0.2,)}, "dataset.std"),
        ({"mean": MEAN, "std": (0.2, 0.0, 0.2)}, "dataset.std"),
        ({"mean": MEAN, "std": None}, "dataset.std"),
    ],
)
def test_bad_stats_raise_config_error(stats: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _build("lenet", 3, 32, **stats)
    assert info.value.key == key


# --- structure of individual nets ---------------------------------------------------------------


def test_preactresnet_projection_shortcut_takes_preactivated_input() -> None:
    model = _build("preactresnet18", 3, 32)
    block = model.layer2[0]
    assert isinstance(block, PreActBlock) and block.shortcut is not None
    seen: dict[str, torch.Tensor] = {}
    block.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    block.shortcut.register_forward_hook(lambda _m, args, _o: seen.__setitem__("sc", args[0]))
    model.eval()
    with torch.no_grad():
        model(_input(3, 32))
        expected = torch.relu(block.bn1(seen["x"]))
    torch.testing.assert_close(seen["sc"], expected, rtol=0, atol=0)
    assert not torch.equal(seen["sc"], seen["x"])


def test_preactresnet_identity_blocks_have_no_shortcut_conv() -> None:
    model = _build("preactresnet18", 3, 32)
    with_projection = [
        name for name, m in model.named_modules() if isinstance(m, PreActBlock) and m.shortcut
    ]
    # layer1 keeps 64 channels at stride 1; each later stage's first block projects.
    assert with_projection == ["layer2.0", "layer3.0", "layer4.0"]


def test_preactresnet_has_no_final_bn() -> None:
    model = _build("preactresnet18", 3, 32).eval()
    assert isinstance(model, PreActResNet18)
    # Only blocks hold BatchNorm; the head is pool -> flatten -> linear.
    top_level = [type(m) for m in model.children()]
    assert nn.BatchNorm2d not in top_level
    seen: dict[str, torch.Tensor] = {}
    model.layer4[-1].register_forward_hook(lambda _m, _a, out: seen.__setitem__("block", out))
    model.pool.register_forward_hook(lambda _m, args, _o: seen.__setitem__("pool_in", args[0]))
    with torch.no_grad():
        model(_input(3, 32))
    assert seen["pool_in"] is seen["block"]
    # Without a final ReLU the pooled features can be negative.
    assert (seen["pool_in"] < 0).any()


def test_lenet_parameter_count() -> None:
    model = _build("lenet", 1, 28)
    expected = (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_lenet_flatten_size_follows_image_size() -> None:
    model = _build("lenet", 3, 32)
    assert model.rest.fc1.in_features == 50 * 5 * 5


def test_smallcnn_init() -> None:
    model = _build("smallcnn", 1, 28)
    assert isinstance(model, SmallCNN)
    last = model.classifier.fc3
    assert last.in_features == 200 and model.classifier.fc1.in_features == 64 * 4 * 4
    assert not last.weight.any() and not last.bias.any()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(m.padding == (0, 0) for m in convs)
    assert all(not m.bias.any() for m in convs)
    # Zero last layer: every class starts at logit 0.
    assert not model.eval()(_input(1, 28)).any()


def test_too_small_image_raises_config_error() -> None:
    for name in ("lenet", "smallcnn"):
        with pytest.raises(ConfigError) as info:
            _build(name, 1, 12)
        assert info.value.key == "dataset.image_size"


def test_unknown_model_names_allowed_options() -> None:
    with pytest.raises(ConfigError) as info:
        _build("vgg16", 3, 32)
    assert info.value.key == "model" and info.value.value == "vgg16"
    assert str(info.value) == (
        "model='vgg16': allowed: lenet, smallcnn, preactresnet18, resnet18, resnet50, wrn28_10, "
        "wrn34_10"
    )
