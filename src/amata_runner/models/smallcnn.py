"""SmallCNN, the MNIST network of TRADES and YOPO.

Kept layer for layer (no padding, dropout after the first FC, zero-initialised last layer) so MNIST
numbers are comparable with those papers; only the input channels and flatten size are derived from
the dataset instead of fixed to 1x28x28.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from amata_runner.errors import ConfigError

_HIDDEN = 200
_DROPOUT = 0.5


def smallcnn_feature_size(image_size: int) -> int:
    """Side length after two (conv 3x3, conv 3x3, pool 2) blocks without padding: 4 for 28x28."""
    after_block1 = (image_size - 4) // 2
    return (after_block1 - 4) // 2


class SmallCNN(nn.Module):
    """Four unpadded 3x3 convs (32, 32, 64, 64) in two pooled blocks, then FC 200-200-classes.

    ``layer_one`` is the first conv *and its ReLU*: YOPO's SmallCNN takes the post-ReLU activation
    as the first layer's output. ``forward(x)`` is literally
    ``forward_from_layer_one(layer_one(x))``.

    Initialisation follows TRADES: Kaiming-normal conv weights with zero biases, and the last FC
    layer all zeros (so every class starts at logit 0); the other FC layers keep PyTorch's default.
    """

    def __init__(self, *, num_classes: int, channels: int, image_size: int) -> None:
        super().__init__()
        side = smallcnn_feature_size(image_size)
        if side < 1:
            raise ConfigError(
                "dataset.image_size", image_size, "smallcnn needs images of at least 16x16 pixels"
            )
        self.layer_one = nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, 32, 3), relu=nn.ReLU()))
        self.features = nn.Sequential(
            OrderedDict(
                conv2=nn.Conv2d(32, 32, 3),
                relu2=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv3=nn.Conv2d(32, 64, 3),
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(64, 64, 3),
                relu4=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
            )
        )
        last = nn.Linear(_HIDDEN, num_classes)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(64 * side * side, _HIDDEN),
                relu1=nn.ReLU(),
                drop=nn.Dropout(_DROPOUT),
                fc2=nn.Linear(_HIDDEN, _HIDDEN),
                relu2=nn.ReLU(),
                fc3=last,
            )
        )
        self._init_weights(last)

    def _init_weights(self, last: nn.Linear) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward_from_layer_one(self, h: torch.Tensor) -> torch.Tensor:
        """Map the post-ReLU first-conv activation to logits."""
        return self.classifier(self.features(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_layer_one(self.layer_one(x))
