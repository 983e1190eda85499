"""CIFAR-style ResNet-18 and PreAct-ResNet-18 (3×3 stem, stride 1, no max-pool: 32×32 → 4×4 before pooling).

``width`` is the number of channels of the first stage (64 in the papers); stages double it.
CAM target: ``layer4`` (the last residual stage).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import FeatureModel


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b): BN–ReLU before each convolution; a projection
    shortcut, when needed, reads the pre-activated input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


def _stage(block: type[nn.Module], in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [block(in_ch, out_ch, stride)]
    layers += [block(out_ch, out_ch, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(FeatureModel):
    """CIFAR ResNet with :class:`BasicBlock` stages (``(2, 2, 2, 2)`` = ResNet-18)."""

    cam_layer_name = "layer4"

    def __init__(
        self,
        blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = _stage(BasicBlock, width, widths[0], blocks[0], 1)
        self.layer2 = _stage(BasicBlock, widths[0], widths[1], blocks[1], 2)
        self.layer3 = _stage(BasicBlock, widths[1], widths[2], blocks[2], 2)
        self.layer4 = _stage(BasicBlock, widths[2], widths[3], blocks[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        self.head = nn.Linear(widths[3], num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.pool(out), 1)


class PreActResNet(FeatureModel):
    """CIFAR PreAct-ResNet with :class:`PreActBlock` stages and a final BN–ReLU before pooling (the form
    used in the adversarial-training literature, e.g. Rice et al. 2020; some CIFAR code omits that
    final BN)."""

    cam_layer_name = "layer4"

    def __init__(
        self,
        blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = _conv3x3(in_channels, width)
        self.layer1 = _stage(PreActBlock, width, widths[0], blocks[0], 1)
        self.layer2 = _stage(PreActBlock, widths[0], widths[1], blocks[1], 2)
        self.layer3 = _stage(PreActBlock, widths[1], widths[2], blocks[2], 2)
        self.layer4 = _stage(PreActBlock, widths[2], widths[3], blocks[3], 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        self.head = nn.Linear(widths[3], num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.relu(self.bn(out))
        return torch.flatten(self.pool(out), 1)


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width=width, in_channels=in_channels)


def preact_resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, width=width, in_channels=in_channels)
