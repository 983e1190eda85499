"""Wide ResNet (Zagoruyko & Komodakis 2016) in the CIFAR form used by the adversarial-training literature
(Madry, TRADES, MART, PART): pre-activation blocks, widths ``16, 16k, 32k, 64k``, ``(depth - 4) / 6``
blocks per group, a final BN–ReLU. WRN-34-10 has 46.2 M parameters.

CAM target: ``block3`` (the last group, 8×8 on 32×32 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import FeatureModel


class WideBlock(nn.Module):
    """BN–ReLU–conv3×3(stride)–BN–ReLU–dropout–conv3×3, plus the input (or a 1×1 projection of the
    pre-activated input when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + skip


class WideResNet(FeatureModel):
    """WRN-``depth``-``widen``; ``depth`` must be ``6n + 4``."""

    cam_layer_name = "block3"

    def __init__(
        self,
        depth: int = 34,
        widen: int = 10,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
        if widen < 1:
            raise ValueError(f"WideResNet: widen must be >= 1, got {widen}")
        per_group = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.depth, self.widen = depth, widen
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], per_group, 1, drop_rate)
        self.block2 = self._group(widths[1], widths[2], per_group, 2, drop_rate)
        self.block3 = self._group(widths[2], widths[3], per_group, 2, drop_rate)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        self.head = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _group(in_ch: int, out_ch: int, blocks: int, stride: int, drop_rate: float) -> nn.Sequential:
        layers = [WideBlock(in_ch, out_ch, stride, drop_rate)]
        layers += [WideBlock(out_ch, out_ch, 1, drop_rate) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def features(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn(out))
        return torch.flatten(self.pool(out), 1)


def wrn(
    depth: int = 34, widen: int = 10, num_classes: int = 10, drop_rate: float = 0.0, in_channels: int = 3
) -> WideResNet:
    return WideResNet(depth, widen, num_classes=num_classes, drop_rate=drop_rate, in_channels=in_channels)
