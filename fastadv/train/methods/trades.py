"""TRADES (Zhang et al. 2019).

Inner: start ``x + 0.001·N(0, 1)``, ``steps`` signed steps on ``KL(softmax f(x) ‖ softmax f(x_adv))`` (summed over
the batch), model in eval mode; the clean probabilities are computed once per batch, not per step.
Outer: ``CE(f(x), y) + β · KL(softmax f(x) ‖ softmax f(x_adv))`` (batch mean), β = 6, gradients through both
terms. Difference to the reference code: the Gaussian start is clipped to the pixel box (the reference feeds
the unclipped start to the model once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...attacks import attack_mode
from ...utils import autocast_context
from ..data import Batch
from ._inner import gaussian_start
from .base import AdversarialMethod

if TYPE_CHECKING:
    from ..trainer import Trainer


def trades_kl(logits_nat: Tensor, logits_adv: Tensor, reduction: str = "batchmean") -> Tensor:
    """``KL(softmax(logits_nat) ‖ softmax(logits_adv))``, summed over classes and reduced over the batch."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction=reduction)


class TRADES(AdversarialMethod):
    name = "trades"

    @property
    def beta(self) -> float:
        return self.config.trades_beta

    def start(self, trainer: Trainer, x: Tensor) -> Tensor:
        return gaussian_start(x, self.config.start_std, trainer.attack_generator)

    def objective(self, trainer: Trainer, batch: Batch):
        model = trainer.model
        with attack_mode(model), torch.no_grad(), autocast_context(batch.x.device, trainer.amp):
            p_nat = F.softmax(model(batch.x).float(), dim=1)
        return lambda logits: F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")

    def loss(self, net: nn.Module, batch: Batch, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        logits_nat = net(batch.x).float()
        logits_adv = net(x_adv).float()
        loss = F.cross_entropy(logits_nat, batch.y) + self.beta * trades_kl(logits_nat, logits_adv)
        return loss, logits_adv
