"""Fast AT (Wong et al. 2020, "Fast is better than free"): FGSM from a uniform random start with step
α = 1.25ε (:class:`fastadv.attacks.FGSM` with ``random_start=True``), outer loss ``CE(f(x_adv), y)``, used with
the cyclic learning rate (``TrainConfig.for_method("fast_at")``).

Catastrophic overfitting: after every epoch the PGD accuracy (``co_steps`` steps) on a held-out batch (the
first ``co_batch_size`` examples of the evaluation subset) is compared with that of the last good check; a drop
of more than ``co_drop`` is a collapse. Then, per ``co_action``: ``"stop"`` restores the weights and optimiser
state of the last good check and ends training (the paper's early stopping); ``"rollback"`` restores them and
continues (at most ``co_max_rollbacks`` times, then stops); ``"warn"`` only logs. :attr:`FastAT.evaluator`
(``(model, x, y) -> accuracy``) can be replaced, e.g. to inject a collapse in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Batch
from ..distributed import broadcast_flag
from ..evaluate import evaluate_robustness
from .base import Method

if TYPE_CHECKING:
    from ..trainer import Trainer

log = logging.getLogger("fastadv.train")


class FastAT(Method):
    name = "fast_at"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.evaluator: Callable[[nn.Module, Tensor, Tensor], float] | None = None
        self.good_acc: float | None = None
        self.good_epoch = 0
        self.rollbacks = 0
        self.snapshot: dict | None = None

    @property
    def alpha(self) -> float:
        return self.config.fast_alpha if self.config.fast_alpha is not None else 1.25 * self.config.eps

    def setup(self, trainer: Trainer) -> None:
        from ...attacks import FGSM

        c = self.config
        self.attack = FGSM(trainer.model, eps=c.eps, alpha=self.alpha, norm=c.norm, random_start=True,
                           generator=trainer.attack_generator, amp=trainer.amp, channels_last=trainer.channels_last,
                           fold_bn=c.fold_bn)
        self._amp, self._device, self._channels_last = trainer.amp, trainer.device, trainer.channels_last
        if self.evaluator is None:
            self.evaluator = self.pgd_accuracy

    def perturb(self, trainer: Trainer, batch: Batch) -> Tensor:
        return self.attack(batch.x, batch.y)

    def loss(self, net: nn.Module, batch: Batch, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = net(x_adv)
        return F.cross_entropy(logits.float(), batch.y), logits

    # ------------------------------------------------------------------ catastrophic overfitting

    def pgd_accuracy(self, model: nn.Module, x: Tensor, y: Tensor) -> float:
        """PGD-``co_steps`` accuracy on ``(x, y)`` with a fixed random start (the same on every rank)."""
        c = self.config
        generator = torch.Generator(device=self._device).manual_seed(c.seed + 17)
        return evaluate_robustness(model, [(x, y)], eps=c.eps, alpha=c.eval_alpha, steps=c.co_steps, norm=c.norm,
                                   generator=generator, amp=self._amp, channels_last=self._channels_last,
                                   fold_bn=c.fold_bn)["pgd_acc"]

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        c = self.config
        x, y = trainer.eval_data.head(c.co_batch_size)
        acc = float(self.evaluator(trainer.model, x, y))
        record["co_check_pgd_acc"] = acc
        collapsed = self.good_acc is not None and acc < self.good_acc - c.co_drop
        collapsed = broadcast_flag(collapsed, trainer.dist, trainer.device)
        if not collapsed:
            self.good_acc, self.good_epoch = acc, epoch + 1
            if c.co_action != "warn":
                self.snapshot = trainer.snapshot()
            return
        record["co_detected"] = True
        message = (f"catastrophic overfitting after epoch {epoch + 1}: PGD-{c.co_steps} accuracy on the held-out "
                   f"batch fell from {self.good_acc:.3f} (epoch {self.good_epoch}) to {acc:.3f}")
        if c.co_action == "warn":
            if trainer.is_main:
                log.warning("%s", message)
            return
        trainer.restore_snapshot(self.snapshot)
        record["rolled_back_to_epoch"] = self.good_epoch
        if c.co_action == "stop" or self.rollbacks >= c.co_max_rollbacks:
            trainer.request_stop(f"{message}; weights rolled back to epoch {self.good_epoch}, training stopped")
        else:
            self.rollbacks += 1
            if trainer.is_main:
                log.warning("%s; rolled back to epoch %d (rollback %d of %d)", message, self.good_epoch,
                            self.rollbacks, c.co_max_rollbacks)

    def state_dict(self) -> dict:
        return {"good_acc": self.good_acc, "good_epoch": self.good_epoch, "rollbacks": self.rollbacks,
                "snapshot": self.snapshot}

    def load_state_dict(self, state: dict) -> None:
        self.good_acc = state.get("good_acc")
        self.good_epoch = int(state.get("good_epoch", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.snapshot = state.get("snapshot")
