"""Model construction by name.

Every network returns raw logits of shape (N, num_classes), exposes ``layer_one`` (its first layer)
and computes ``forward(x)`` as ``forward_from_layer_one(layer_one(x))`` so YOPO can split it. When
the data set has a mean/std, normalisation is wrapped around the net as its first step so inputs
and attack budgets stay in [0, 1] pixel units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from amata_runner.errors import ConfigError
from amata_runner.models.base import SplitAtLayerOne
from amata_runner.models.lenet import LeNet
from amata_runner.models.normalize import Normalized
from amata_runner.models.preact_resnet import PreActBlock, PreActResNet18
from amata_runner.models.smallcnn import SmallCNN
from amata_runner.models.timm_nets import TimmResNet, build_timm_resnet
from amata_runner.models.wide_resnet import WideResNet

__all__ = [
    "MODEL_NAMES",
    "LeNet",
    "Normalized",
    "PreActBlock",
    "PreActResNet18",
    "SmallCNN",
    "SplitAtLayerOne",
    "TimmResNet",
    "WideResNet",
    "build_model",
]

# Each builder takes (num_classes, channels, image_size); not every net needs image_size.
_Builder = Callable[[int, int, int], nn.Module]

_BUILDERS: dict[str, _Builder] = {
    "lenet": lambda k, c, s: LeNet(num_classes=k, channels=c, image_size=s),
    "smallcnn": lambda k, c, s: SmallCNN(num_classes=k, channels=c, image_size=s),
    "preactresnet18": lambda k, c, s: PreActResNet18(num_classes=k, channels=c),
    "resnet18": lambda k, c, s: build_timm_resnet("resnet18", num_classes=k, channels=c),
    "resnet50": lambda k, c, s: build_timm_resnet("resnet50", num_classes=k, channels=c),
    "wrn28_10": lambda k, c, s: WideResNet(depth=28, widen=10, num_classes=k, channels=c),
    "wrn34_10": lambda k, c, s: WideResNet(depth=34, widen=10, num_classes=k, channels=c),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)  # what model.name accepts (config/checks.py)


def _check_stats(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> None:
    """Reject mean/std that cannot normalise a ``channels``-channel image, before building."""
    if (mean is None) != (std is None):
        key, value = ("dataset.std", std) if std is None else ("dataset.mean", mean)
        raise ConfigError(key, value, "dataset.mean and dataset.std must be given together")
    if mean is None or std is None:
        return
    for key, values in (("dataset.mean", mean), ("dataset.std", std)):
        if len(values) != channels:
            raise ConfigError(key, list(values), f"needs {channels} entries, one per channel")
    if any(s <= 0 for s in std):
        raise ConfigError("dataset.std", list(std), "every entry must be positive")


def build_model(
    name: str,
    *,
    num_classes: int,
    channels: int,
    image_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> nn.Module:
    """Build the untrained network ``name``, wrapped in :class:`Normalized` when mean/std are set.

    Raises :class:`ConfigError` for an unknown name, mean/std not matching ``channels``, or an
    image too small for the net.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ConfigError("model", name, "allowed: " + ", ".join(MODEL_NAMES))
    _check_stats(mean, std, channels)
    net = builder(num_classes, channels, image_size)
    if mean is None or std is None:
        return net
    return Normalized(net, mean, std)
