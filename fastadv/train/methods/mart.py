"""MART (Wang et al. 2020): misclassification-aware adversarial training.

Inner: start ``x + 0.001·N(0, 1)``, ``steps`` signed steps on the cross-entropy, model in eval mode.
Outer, with ``p = softmax f(x_adv)``, ``q = softmax f(x)`` and ``ŷ = argmax_{k≠y} p_k``::

    BCE(p, y) = -log p_y - log(1 - p_ŷ)
    loss = mean_i [ BCE(p_i, y_i) + β · KL(q_i ‖ p_i) · (1 - q_i[y_i]) ],   β = 6

The logarithms carry the reference code's guards (``log(1.0001 - p_ŷ + 1e-12)``, ``log(p + 1e-12)`` inside the
KL term, weight ``1.0000001 - q_y``). The Gaussian start is clipped to the pixel box.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Batch
from ._inner import gaussian_start
from .base import AdversarialMethod

if TYPE_CHECKING:
    from ..trainer import Trainer


def mart_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """MART's outer loss (see the module docstring)."""
    p_adv = F.softmax(logits_adv, dim=1)
    # The most likely wrong class of each adversarial example.
    top2 = p_adv.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    p_nat = F.softmax(logits_nat, dim=1)
    true_nat = p_nat.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(dim=1)
    return bce + beta * (kl * (1.0000001 - true_nat)).mean()


class MART(AdversarialMethod):
    name = "mart"

    def start(self, trainer: Trainer, x: Tensor) -> Tensor:
        return gaussian_start(x, self.config.start_std, trainer.attack_generator)

    def loss(self, net: nn.Module, batch: Batch, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        logits_nat = net(batch.x).float()
        logits_adv = net(x_adv).float()
        return mart_loss(logits_nat, logits_adv, batch.y, self.config.mart_beta), logits_adv
