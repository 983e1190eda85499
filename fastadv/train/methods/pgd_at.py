"""PGD adversarial training (Madry et al. 2018, "SAT"): PGD-``steps`` on the cross-entropy from a uniform random
start, the model in eval mode during the attack; outer loss ``CE(f(x_adv), y)``.

The inner maximisation is :class:`fastadv.attacks.PGD` (the attack engine). :meth:`PGDAT.perturb_with` runs the
same objective with another step function (PART's per-pixel budget).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Batch
from .base import AdversarialMethod

if TYPE_CHECKING:
    from ..trainer import Trainer


class PGDAT(AdversarialMethod):
    name = "pgd_at"

    def setup(self, trainer: Trainer) -> None:
        from ...attacks import PGD

        c = self.config
        self.attack = PGD(trainer.model, eps=c.eps, alpha=c.alpha, steps=c.steps, norm=c.norm, loss="ce",
                          random_start=True, generator=trainer.attack_generator, amp=trainer.amp,
                          channels_last=trainer.channels_last, fold_bn=c.fold_bn)

    def perturb(self, trainer: Trainer, batch: Batch) -> Tensor:
        return self.attack(batch.x, batch.y)

    def loss(self, net: nn.Module, batch: Batch, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = net(x_adv)
        return F.cross_entropy(logits.float(), batch.y), logits
