"""VGG-11 with batch normalisation and the CIFAR head (one linear layer on the 512-d pooled features).

CAM target: ``last_block`` (the last two conv–BN–ReLU layers, 2×2 on 32×32 inputs, before the final
max-pool).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import FeatureModel

# Channel multipliers of VGG-11 in units of ``width`` (64 in the paper); "M" = 2×2 max-pool.
_VGG11 = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M")
_VGG11_LAST = (8, 8)


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    # Convolutions keep their bias as in the original VGG (9.23 M parameters at width 64).
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]


class VGG(FeatureModel):
    cam_layer_name = "last_block"

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG11:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn_relu(channels, item * width)
                channels = item * width
        self.body = nn.Sequential(*layers)
        last: list[nn.Module] = []
        for mult in _VGG11_LAST:
            last += _conv_bn_relu(channels, mult * width)
            channels = mult * width
        self.last_block = nn.Sequential(*last)
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))
        self.feature_dim = channels
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.last_block(self.body(x))), 1)


def vgg11(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> VGG:
    return VGG(num_classes=num_classes, width=width, in_channels=in_channels)
