"""A small CNN for CPU runs on 32×32×3 inputs (0.14 M parameters and 29 M multiply–adds per image at the
default width): two conv–conv–pool stages and a last conv block at 8×8, global average pooling, a linear
head. CAM target: ``block3``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import FeatureModel


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


class SmallCNN(FeatureModel):
    cam_layer_name = "block3"

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            *_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2)
        )
        self.block2 = nn.Sequential(
            *_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2)
        )
        self.block3 = nn.Sequential(*_conv_bn_relu(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * width
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.block3(self.block2(self.block1(x)))), 1)


def small_cnn(num_classes: int = 10, width: int = 32, in_channels: int = 3) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, width=width, in_channels=in_channels)
