"""The method interface: a method defines its inner maximisation (``perturb``) and its outer loss (``loss``);
the trainer owns everything else (data, optimiser step, schedules, precision, checkpoints, distribution).

``trainer.optimize(closure)`` runs one optimiser step: ``closure()`` returns ``(loss, logits)``, the trainer
runs it under autocast, back-propagates (scaled for fp16), clips, steps the optimiser (SAM: two passes of the
closure) and the LR schedule, and returns the detached ``(loss, logits)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..config import TrainConfig
from ..data import Batch

if TYPE_CHECKING:
    from ..trainer import Trainer


class Method(ABC):
    """Base class of the training methods.

    Subclasses set :attr:`name` and implement :meth:`loss` (and usually :meth:`perturb`). Methods whose outer
    step is not "one optimiser step per batch" (Free AT) override :meth:`train_batch` and
    :attr:`steps_per_batch`.
    """

    name: ClassVar[str] = ""
    #: optimiser steps per batch (the LR schedule's length depends on it)
    steps_per_batch: int = 1

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    # ------------------------------------------------------------------ life cycle

    def setup(self, trainer: Trainer) -> None:
        """Called once the model is on its device, before the optimiser is built."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module whose parameters are optimised and whose ``forward`` the loss calls (DDP wraps it)."""
        return model

    def num_epochs(self, epochs: int) -> int:
        """Passes over the data for a nominal ``epochs`` (Free AT divides by its replays)."""
        return epochs

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        """After the epoch's evaluation; may add entries to the log ``record`` or call ``trainer.request_stop``."""

    # ------------------------------------------------------------------ one batch

    def perturb(self, trainer: Trainer, batch: Batch) -> Tensor | None:
        """The inner maximisation: the inputs the outer loss trains on (``None``: natural images only)."""
        return None

    @abstractmethod
    def loss(self, net: nn.Module, batch: Batch, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        """The outer loss (a scalar) and the logits whose accuracy is logged."""

    def train_batch(self, trainer: Trainer, batch: Batch) -> tuple[Tensor, Tensor]:
        x_adv = self.perturb(trainer, batch)
        return trainer.optimize(lambda: self.loss(trainer.net, batch, x_adv))

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        """Method state that an exact resume needs (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method {self.name!r} has no state, but the checkpoint holds {sorted(state)}")

    def rank_state_dict(self) -> dict:
        """State that differs between DDP ranks (saved for every rank; e.g. Free AT's perturbation)."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method {self.name!r} has no per-rank state, but the checkpoint holds {sorted(state)}")


class AdversarialMethod(Method):
    """A method with a PGD-style inner maximisation written with the fused ops: a start (:meth:`start`), an
    objective on the logits (:meth:`objective`) and ``config.steps`` steps of a step function (the plain
    global-budget step by default; PART passes its masked step to :meth:`perturb_with`)."""

    def start(self, trainer: Trainer, x: Tensor) -> Tensor:
        """The initial perturbation (default: uniform in the ε-ball, :func:`fastadv.ops.random_init`)."""
        from ... import ops

        return ops.random_init(x, eps=self.config.eps, norm=self.config.norm, generator=trainer.attack_generator)

    def objective(self, trainer: Trainer, batch: Batch):
        """``f(logits) -> scalar`` to maximise (default: summed cross-entropy)."""
        import torch.nn.functional as F

        y = batch.y
        return lambda logits: F.cross_entropy(logits, y, reduction="sum")

    def perturb_with(self, trainer: Trainer, batch: Batch, step) -> Tensor:
        from ._inner import ascend

        delta = self.start(trainer, batch.x)
        return ascend(trainer.model, batch.x, delta, self.objective(trainer, batch), steps=self.config.steps,
                      step=step, amp=trainer.amp, fold_bn=self.config.fold_bn)

    def perturb(self, trainer: Trainer, batch: Batch) -> Tensor:
        from ._inner import plain_step

        return self.perturb_with(trainer, batch, plain_step(self.config.eps, self.config.alpha, self.config.norm))
