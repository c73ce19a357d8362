"""ImageNet-style ResNets from timm, split at their stem conv.

timm's ``ResNet.forward`` runs conv1 -> bn1 -> act1 -> maxpool -> layer1..4 -> head in one call,
so there is no place to hand in a first-layer output. :class:`TimmResNet` re-expresses that forward
as ``forward_from_layer_one(layer_one(x))`` using the same submodules, so YOPO can treat the stem
conv separately while the parameters and outputs stay exactly timm's.
"""

from __future__ import annotations

import torch
from torch import nn

# Submodules of timm's ResNet that forward_from_layer_one calls, in order after conv1.
_RESNET_PARTS = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")


class TimmResNet(nn.Module):
    """Wraps a timm ``ResNet`` so that ``forward(x) == forward_from_layer_one(layer_one(x))``.

    ``layer_one`` is timm's stem conv ``conv1`` (raw conv output, before ``bn1``/``act1``). It is a
    property rather than a second registered submodule so the state dict holds each weight once,
    under timm's own names prefixed with ``model.``.

    timm's gradient-checkpointing switch is not honoured by this forward; the layers run plainly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        missing = [part for part in _RESNET_PARTS if not hasattr(model, part)]
        if missing or not hasattr(model, "forward_head"):
            raise TypeError(
                f"{type(model).__name__} is not a timm ResNet (missing {missing or 'forward_head'})"
            )
        self.model = model

    @property
    def layer_one(self) -> nn.Module:
        """timm's stem conv."""
        return self.model.conv1

    def forward_from_layer_one(self, h: torch.Tensor) -> torch.Tensor:
        """Everything timm's ResNet does after ``conv1``, in the same order."""
        m = self.model
        h = m.maxpool(m.act1(m.bn1(h)))
        h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
        return m.forward_head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_layer_one(self.layer_one(x))


def build_timm_resnet(name: str, *, num_classes: int, channels: int) -> TimmResNet:
    """Create an untrained timm ResNet (no network access, so never ``pretrained``).

    timm is imported here rather than at module top because importing it costs seconds and most
    runs (MNIST nets) never need it.
    """
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels)
    return TimmResNet(model)
