"""LeNet as in pytorch/examples' MNIST script between Dec 2018 and Nov 2019.

That is the version the Amata paper cites for its MNIST experiments, so the layer sizes are kept
as they were then; only the final ``log_softmax`` is dropped because every network here returns raw
logits (losses and attacks apply their own softmax).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from amata_runner.errors import ConfigError

_CONV1_OUT = 20
_CONV2_OUT = 50
_HIDDEN = 500
_KERNEL = 5


def lenet_feature_size(image_size: int) -> int:
    """Side length after both valid 5x5 convs and 2x2 pools (4 for 28x28 inputs).

    Computed rather than hardcoded so the same net also takes 32x32 CIFAR-sized images.
    """
    after_block1 = (image_size - (_KERNEL - 1)) // 2
    return (after_block1 - (_KERNEL - 1)) // 2


class LeNet(nn.Module):
    """conv 5x5 ->20, ReLU, pool 2, conv 5x5 ->50, ReLU, pool 2, FC ->500, ReLU, FC ->classes.

    ``layer_one`` is the first conv *together with its ReLU* (the post-activation feature map), and
    ``forward(x)`` is literally ``forward_from_layer_one(layer_one(x))``.
    """

    def __init__(self, *, num_classes: int, channels: int, image_size: int) -> None:
        super().__init__()
        side = lenet_feature_size(image_size)
        if side < 1:
            raise ConfigError(
                "dataset.image_size", image_size, "lenet needs images of at least 16x16 pixels"
            )
        self.layer_one = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(channels, _CONV1_OUT, _KERNEL), relu=nn.ReLU())
        )
        self.rest = nn.Sequential(
            OrderedDict(
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(_CONV1_OUT, _CONV2_OUT, _KERNEL),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(_CONV2_OUT * side * side, _HIDDEN),
                relu3=nn.ReLU(),
                fc2=nn.Linear(_HIDDEN, num_classes),
            )
        )

    def forward_from_layer_one(self, h: torch.Tensor) -> torch.Tensor:
        """Map the post-ReLU first-conv activation to logits."""
        return self.rest(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_layer_one(self.layer_one(x))
