"""Free AT (Shafahi et al. 2019, "Adversarial training for free!"): every batch is replayed ``m`` times
(``free_replays``); each replay is one forward and **one** backward pass at ``x + δ`` that gives both the weight
gradient (an optimiser step) and the input gradient, with which the persistent perturbation ``δ`` (carried over
to the next batch) takes a signed step of size ``free_alpha`` (default ε), projected with
:func:`fastadv.ops.pgd_step_`. To keep the cost of a nominal ``epochs`` run, the data is passed over
``ceil(epochs / m)`` times.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ..data import Batch
from .base import Method

if TYPE_CHECKING:
    from ..trainer import Trainer


class FreeAT(Method):
    name = "free_at"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.delta: Tensor | None = None
        self.steps_per_batch = config.free_replays

    @property
    def alpha(self) -> float:
        return self.config.free_alpha if self.config.free_alpha is not None else self.config.eps

    def num_epochs(self, epochs: int) -> int:
        return math.ceil(epochs / self.config.free_replays)

    def loss(self, net: nn.Module, batch: Batch, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = net(x_adv)
        return F.cross_entropy(logits.float(), batch.y), logits

    def train_batch(self, trainer: Trainer, batch: Batch) -> tuple[Tensor, Tensor]:
        x = batch.x
        b = x.shape[0]
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or self.delta.shape[0] < b:
            self.delta = torch.zeros((max(b, self.config.batch_size), *x.shape[1:]), dtype=torch.float32,
                                     device=x.device)
        delta = self.delta[:b]
        result = None
        for _ in range(self.config.free_replays):
            leaves: list[Tensor] = []

            def closure() -> tuple[Tensor, Tensor]:
                leaf = delta.detach().clone().requires_grad_(True)
                leaves.append(leaf)
                return self.loss(trainer.net, batch, (x + leaf).clamp(0.0, 1.0))

            result = trainer.optimize(closure)
            # The backward pass of the (first) closure evaluation also gave d loss / d delta.
            grad = leaves[0].grad
            ops.pgd_step_(delta, grad, x, eps=self.config.eps, alpha=self.alpha, norm=self.config.norm)
        return result

    def rank_state_dict(self) -> dict:
        # Each rank carries the perturbation of its own batches.
        return {"delta": None if self.delta is None else self.delta.detach().cpu()}

    def load_rank_state_dict(self, state: dict) -> None:
        delta = state.get("delta")
        self.delta = None if delta is None else delta.to(self._device)

    def setup(self, trainer: Trainer) -> None:
        self._device = trainer.device
