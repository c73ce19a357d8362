"""PreActResNet18 in the kuangliu / YOPO form, the one the Amata paper's CIFAR-10 code trained.

locuslab's "fast adversarial training" PreActResNet18 differs in two ways: its projection
shortcut acts on the raw block input ``x``, and it applies a final BN + ReLU before pooling. This
module deliberately follows kuangliu/YOPO instead (shortcut on ``relu(bn1(x))``, no final BN + ReLU)
because that is the network the Amata numbers were produced with.
"""

from __future__ import annotations

import torch
from torch import nn

_STAGE_WIDTHS = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
_BLOCKS_PER_STAGE = 2


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus a shortcut.

    The projection shortcut (a bias-free 1x1 conv, no BN), present only when the block changes
    stride or width, is applied to the *pre-activated* tensor ``relu(bn1(x))``, not to ``x``; the
    identity shortcut passes ``x`` itself.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """conv3x3 ->64, four stages of two PreActBlocks (64/128/256/512), global avg pool, linear.

    ``layer_one`` is the stem conv (3x3, stride 1, pad 1, no bias) and its *raw* output is what
    ``forward_from_layer_one`` consumes (the first block's BN + ReLU follow). ``forward(x)`` is
    literally ``forward_from_layer_one(layer_one(x))``.

    Pooling is adaptive to 1x1 rather than kuangliu's fixed 4x4 average, which is identical for
    32x32 inputs and lets 28x28 (MNIST-sized) or larger images through too.
    """

    def __init__(self, *, num_classes: int, channels: int) -> None:
        super().__init__()
        self.layer_one = nn.Conv2d(channels, _STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        in_planes = _STAGE_WIDTHS[0]
        stages: list[nn.Sequential] = []
        for planes, stride in zip(_STAGE_WIDTHS, _STAGE_STRIDES, strict=True):
            blocks: list[nn.Module] = []
            for index in range(_BLOCKS_PER_STAGE):
                blocks.append(PreActBlock(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(_STAGE_WIDTHS[-1], num_classes)

    def forward_from_layer_one(self, h: torch.Tensor) -> torch.Tensor:
        """Map the raw stem-conv output to logits."""
        out = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.linear(self.flatten(self.pool(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_layer_one(self.layer_one(x))
