"""Training the prompt (and a learned mapping) of an :class:`~fastadv.prompting.LMVPModel` with
``fastadv.train``'s :class:`~fastadv.train.Trainer`.

The trainer owns the loop: data order and resume, the optimiser over the parameters that require gradients
(the prompt's and a ``linear`` mapping's — the frozen source has none), SAM, the LR schedule, bf16 autocast,
``channels_last``, checkpoints, logs and DDP. LM-VP adds three training methods, registered with
:func:`fastadv.train.register_method` on first use (:func:`register_lmvp_methods`):

* ``lmvp_standard`` (ST): ``CE(f(x), y)``;
* ``lmvp_pgd_at`` (white-box AT): PGD-``steps`` through the whole LM-VP model — prompt, frozen source and
  mapping — perturbing only the image in pixel space before placement (fastadv.train's PGD-AT method);
* ``lmvp_transfer_at`` (TARP-VP's transferred AT): the same PGD crafted on a separate, trained *threat model*
  of the target task; the LM-VP model is never queried while crafting.

Each of them refreshes the label mapping: ``flm`` is fitted once before the first epoch, ``ilm`` at the start of
every epoch with the current prompt (not again when a run resumes in the middle of an epoch: the mapping of
that epoch is in the checkpoint), ``rlm`` never; ``linear`` trains with the prompt.

:func:`train_lmvp` maps an :class:`~fastadv.prompting.LMVPConfig` onto a :class:`~fastadv.train.TrainConfig`
(:func:`to_train_config`): TARP-VP's ``StepLR(2, 0.7)`` becomes a multistep schedule with a milestone every 2
epochs and factor 0.7, ILM-VP's ×0.1 at 50 % / 72 % the milestones ``(0.5·E, 0.72·E)``; the trainer applies
them at batch granularity, which at epoch boundaries equals the per-epoch schedulers of the reference code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..train import TrainConfig, Trainer, register_method
from ..train.methods import METHODS, PGDAT, Method, Standard
from ..utils import autocast_context
from ..utils import resolve_device as _resolve_device
from . import _data
from .config import LMVPConfig
from .model import LMVPModel, check_threat_model

#: LMVPConfig.method -> the registered fastadv.train method
TRAIN_METHODS = {"standard": "lmvp_standard", "pgd_at": "lmvp_pgd_at", "transfer_at": "lmvp_transfer_at"}


def resolve_device(name: str) -> torch.device:
    return _resolve_device(name, what="LMVPConfig.device")


# ---------------------------------------------------------------------------------------------------------
# the methods


class _LMVPMethod(Method):
    """Shared by the LM-VP methods: the model must be an :class:`LMVPModel`; the label mapping is refreshed at
    the start of an epoch. Besides the config they take the data the mapping is fitted on (``fit_data``) and,
    for transferred AT, the threat model; :func:`train_lmvp` builds them and hands them to the trainer
    (``Trainer(..., method=...)``)."""

    def __init__(self, config: TrainConfig, *, fit_data=None, threat_model: nn.Module | None = None,
                 mapping_batch_size: int = 256) -> None:
        super().__init__(config)
        self.fit_data = fit_data
        self.threat_model = threat_model
        self.mapping_batch_size = mapping_batch_size

    def setup(self, trainer: Trainer) -> None:
        self._check_model(trainer)
        super().setup(trainer)

    def _check_model(self, trainer: Trainer) -> None:
        if not isinstance(trainer.model, LMVPModel):
            raise ValueError(f"training method {self.name!r} trains an LMVPModel, got {type(trainer.model).__name__}; "
                             "use fastadv.prompting.train_lmvp")
        self._refit = False

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        model: LMVPModel = trainer.model
        mapping = model.mapping
        resumed_mid_epoch = trainer.step_in_epoch > 0
        self._refit = mapping.needs_fit or (mapping.refit_every_epoch and not resumed_mid_epoch)
        if self._refit:
            if self.fit_data is None:
                raise ValueError(f"the {mapping.kind!r} label mapping is fitted on the training data: train with "
                                 "fastadv.prompting.train_lmvp, which provides it")
            mapping.fit(model, self.fit_data, batch_size=self.mapping_batch_size, amp=trainer.amp)
        super().on_epoch_start(trainer, epoch)

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        record["mapping_refit"] = bool(self._refit)
        # Robust accuracy is evaluate_lmvp's job; the trainer's periodic check here is natural accuracy only.
        record.pop("pgd_acc", None)
        super().on_epoch_end(trainer, epoch, record)


class LMVPStandard(_LMVPMethod, Standard):
    """ST: ``CE(f(x), y)``."""

    name = "lmvp_standard"


class LMVPPGDAT(_LMVPMethod, PGDAT):
    """White-box AT: fastadv.train's PGD-AT on the LM-VP model (the attack perturbs the image, not the canvas)."""

    name = "lmvp_pgd_at"


class LMVPTransferAT(_LMVPMethod, PGDAT):
    """Transferred AT: PGD on the threat model, ``CE(f(x_adv), y)`` on the LM-VP model."""

    name = "lmvp_transfer_at"

    def setup(self, trainer: Trainer) -> None:
        # Not PGD-AT's setup (an attack on the LM-VP model): the attack runs on the threat model only, in the
        # layout the attack engine picks for that network.
        from ..attacks import PGD

        self._check_model(trainer)
        if self.threat_model is None:
            raise ValueError("method 'lmvp_transfer_at' needs a threat model: train with "
                             "fastadv.prompting.train_lmvp(..., threat_model=...)")
        c = self.config
        self.attack = PGD(self.threat_model, eps=c.eps, alpha=c.alpha, steps=c.steps, norm=c.norm, loss="ce",
                          random_start=True, generator=trainer.attack_generator, amp=trainer.amp,
                          channels_last=c.channels_last, fold_bn=c.fold_bn)


def register_lmvp_methods() -> None:
    """Register ``lmvp_standard``, ``lmvp_pgd_at`` and ``lmvp_transfer_at`` with :func:`fastadv.train.register_method`
    (idempotent). :func:`to_train_config` / :func:`train_lmvp` call it; importing fastadv.prompting does not, so
    the trainer's registry only grows when LM-VP training is used."""
    for method in (LMVPStandard, LMVPPGDAT, LMVPTransferAT):
        if METHODS.get(method.name) is not method:
            register_method(method)


# ---------------------------------------------------------------------------------------------------------
# configuration


def lr_milestones(config: LMVPConfig) -> tuple[str, tuple[float, ...] | None]:
    """``(schedule, milestones in epochs)`` of fastadv.train equivalent to ``config``'s per-epoch schedule."""
    if config.schedule == "step":
        milestones = tuple(float(e) for e in range(config.lr_step_epochs, config.epochs, config.lr_step_epochs))
    elif config.schedule == "multistep":
        milestones = tuple(sorted({float(max(1, int(f * config.epochs))) for f in config.milestones}))
    else:
        return "constant", None
    return ("multistep", milestones) if milestones else ("constant", None)


def model_description(model: LMVPModel) -> dict:
    """What identifies an LM-VP model's trainable part (stored as the trainer's ``model_kwargs``, one of the
    fields a resumed run must share with its checkpoint)."""
    prompt = model.prompt
    return {"geometry": prompt.geometry, "out_size": prompt.out_size, "inner_size": prompt.inner_size,
            "normalize": prompt.normalize if prompt.mean else "none", "mapping": model.mapping.kind,
            "n_source": model.n_source, "n_target": model.n_target}


def to_train_config(config: LMVPConfig, *, n_target: int, eval_subset: int | None = None, eval_every: int = 1,
                    model_kwargs: dict | None = None) -> TrainConfig:
    """The :class:`~fastadv.train.TrainConfig` that runs ``config``'s training through the trainer."""
    register_lmvp_methods()
    schedule, milestones = lr_milestones(config)
    return TrainConfig(
        method=TRAIN_METHODS[config.method], model=config.source, model_kwargs=dict(model_kwargs or {}),
        dataset=config.dataset, num_classes=n_target,
        eval_subset=eval_subset, augment=config.augment, crop_padding=4, batch_size=config.batch_size,
        epochs=config.epochs, optimizer=config.optimizer, sam_base=config.sam_base, sam_rho=config.sam_rho,
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, schedule=schedule,
        milestones=milestones, lr_gamma=config.lr_gamma, eps=config.eps, alpha=config.alpha, steps=config.steps,
        norm=config.norm, amp=config.amp, channels_last=config.channels_last, fold_bn=config.fold_bn,
        device=config.device, seed=config.seed, eval_every=eval_every, eval_steps=0,
        eval_batch_size=config.eval_batch_size,
        best_metric="nat_acc", save_best=False, checkpoint_frozen=config.save_source, out_dir=config.out_dir,
        resume=config.resume, progress=config.progress)


# ---------------------------------------------------------------------------------------------------------
# the entry point


class _EpochEnd:
    def __init__(self, fn: Callable[[int, dict], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.fn(record["epoch"] - 1, record)


def train_lmvp(model: LMVPModel, train_data, config: LMVPConfig, *, threat_model: nn.Module | None = None,
               eval_data=None, on_epoch_end: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``model``'s prompt (and mapping) on ``train_data`` with the trainer; returns one record per epoch
    (``epoch``, ``lr``, ``train_loss``, ``train_acc``, ``epoch_time_s``, ``mapping_refit`` and, with ``eval_data``,
    its natural accuracy ``nat_acc``).

    ``train_data``/``eval_data``: an ``(x, y)`` pair, an :class:`~fastadv.data.ImageSet` or a map-style
    ``Dataset``. ``threat_model``: the trained network ``transfer_at`` crafts on (on the model's device; it must
    output the target task's classes, checked on one training image). With ``config.out_dir`` the trainer writes
    ``last.pt`` after every epoch and its logs; ``config.resume`` continues from such a checkpoint.
    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint.
    """
    if not isinstance(model, LMVPModel):
        raise ValueError(f"fastadv.prompting.train_lmvp: `model` must be an LMVPModel, got {type(model).__name__}")
    if not isinstance(config, LMVPConfig):
        raise ValueError(f"fastadv.prompting.train_lmvp: `config` must be an LMVPConfig, got {type(config).__name__}")
    device = resolve_device(config.device)
    if config.method == "transfer_at":
        if threat_model is None:
            raise ValueError("fastadv.prompting.train_lmvp: method 'transfer_at' needs `threat_model` (a trained "
                             "network of the target task, e.g. load_threat_model('resnet18', num_classes=10, "
                             "checkpoint_path=...))")
        threat_device = next(iter(threat_model.parameters()), torch.empty(0, device=device)).device
        if threat_device != device:
            raise ValueError(f"fastadv.prompting.train_lmvp: `threat_model` is on {threat_device} but training runs "
                             f"on {device}; move it there first")
        sample, _ = _data.first_images(train_data, 1, device, "train_data")
        check_threat_model(threat_model, model.n_target, sample, target=model)
    model.fold_bn = config.fold_bn  # the run's setting, as for the memory format below
    has_eval = eval_data is not None
    train_config = to_train_config(config, n_target=model.n_target,
                                   eval_subset=config.eval_subset if has_eval else 0,
                                   eval_every=1 if has_eval else 0, model_kwargs=model_description(model))
    method = METHODS[train_config.method](train_config, fit_data=train_data, threat_model=threat_model,
                                          mapping_batch_size=config.mapping_batch_size)
    trainer = Trainer(train_config, model=model, train_set=train_data, eval_set=eval_data, method=method,
                      callbacks=[_EpochEnd(on_epoch_end)] if on_epoch_end is not None else [])
    # The trainer has decided the memory format (and converted the parameters): canvases follow it.
    model.channels_last = model.channels_last or trainer.channels_last
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if model.mapping.needs_fit:  # nothing was left to train (a finished run resumed): still a usable mapping
        model.mapping.fit(model, train_data, batch_size=config.mapping_batch_size, amp=trainer.amp)
    model.eval()
    return result.history


@torch.no_grad()
def natural_accuracy(model: nn.Module, data, *, batch_size: int = 256, amp: str | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode; the model's modes are restored)."""
    device = next(iter(model.parameters())).device
    modes = [(m, m.training) for m in model.modules()]
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    try:
        model.eval()
        for x, y in _data.batches(data, batch_size, device, "data"):
            with autocast_context(device, amp):
                logits = model(x)
            correct += (logits.argmax(dim=1) == y).sum()
            seen += y.shape[0]
    finally:
        for m, training in modes:
            m.training = training
    return int(correct) / seen if seen else math.nan


__all__ = ["LMVPPGDAT", "TRAIN_METHODS", "LMVPStandard", "LMVPTransferAT", "lr_milestones", "model_description",
           "natural_accuracy", "register_lmvp_methods", "resolve_device", "to_train_config", "train_lmvp"]
