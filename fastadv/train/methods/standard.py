"""Standard (natural) training: ``CE(f(x), y)``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Batch
from .base import Method


class Standard(Method):
    name = "standard"

    def loss(self, net: nn.Module, batch: Batch, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = net(batch.x)
        return F.cross_entropy(logits.float(), batch.y), logits
