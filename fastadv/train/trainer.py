"""The training loop: one :class:`Trainer` for every method.

The trainer owns the data pipeline (sharded, resumable, on-device augmentation), the model and its
``DistributedDataParallel`` wrapper, the optimiser (SGD / Adam / SAM) and the per-step LR schedule, mixed
precision (bf16 autocast, or fp16 with a ``GradScaler``) and ``channels_last``, periodic evaluation (natural +
PGD on a held-out subset, sharded over the ranks), checkpoints (``last.pt`` every epoch and optionally every N
batches, ``best.pt``; atomic; loadable with ``weights_only=True``), exact resume, CSV/JSON logs and a progress
bar. The method (:mod:`fastadv.train.methods`) supplies only the inner maximisation and the outer loss.

Exact resume: a checkpoint holds the model, optimiser, scheduler, scaler and method state, the epoch, the
batch within the epoch and the global step, the data-order generator's state at the start of the epoch, and
for every rank its RNG states (torch CPU and CUDA, Python, NumPy, the attack and augmentation generators), its
module buffers (BatchNorm statistics drift apart between DDP's broadcasts), its running sums of the epoch's
training loss/accuracy and its per-rank method state (Free AT's perturbation). Resuming replays the interrupted epoch's order, skips the
finished batches and continues with the same random numbers, so on a deterministic device a run interrupted
after a checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset, TensorDataset

from ..utils import auto_channels_last, autocast_context, has_conv2d
from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import VERSION as CHECKPOINT_VERSION
from .checkpoint import (CheckpointError, atomic_save, atomic_write_text, capture_global_rng, fingerprint,
                         fingerprint_mismatch, frozen_prefixes, load_checkpoint, restore_global_rng)
from .config import TrainConfig
from .data import Batch, EvalData, TrainData, augment
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, init_distributed, shutdown
from .evaluate import evaluate_robustness
from .logs import RunLogger
from .methods import Method, create_method
from .optim import SAM, build_optimizer, build_scheduler

log = logging.getLogger("fastadv.train")

# Config fields that must match between a checkpoint and the run resuming from it.
RESUME_FIELDS = ("method", "model", "model_kwargs", "normalize", "dataset", "dataset_kwargs", "train_subset",
                 "batch_size", "drop_last", "optimizer", "sam_base", "epochs", "free_replays", "seed")


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    stop_reason: str | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    resumed_from: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any] | None:
        """The last epoch's log record."""
        return self.history[-1] if self.history else None


class Callback:
    """Hooks called by the trainer (all optional; any object with these methods works)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After every batch (its optimiser step(s) and any step checkpoint)."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After an epoch's evaluation, checkpoint and log."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the last epoch (or a stop)."""


@contextmanager
def running_stats_frozen(module: nn.Module):
    """BatchNorm layers keep their running statistics (SAM's second forward pass must not update them twice)."""
    saved = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            tracked = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            saved.append((m, m.momentum, tracked))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _resolve_device(config: TrainConfig, dist_info: DistInfo) -> torch.device:
    wanted = config.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device: {config.device!r} needs CUDA, but no CUDA device is available")
        if wanted == "cuda":
            return torch.device("cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device())
    return torch.device(wanted)


def _subset(source, n: int | None):
    if n is None:
        return source
    if hasattr(source, "x") and hasattr(source, "y") and isinstance(source.x, Tensor):
        if hasattr(source, "classes"):
            return type(source)(source.x[:n], source.y[:n], source.classes, source.name)
        return source.x[:n], source.y[:n]
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return source[0][:n], source[1][:n]
    if isinstance(source, Dataset):
        return Subset(source, range(min(n, len(source))))  # type: ignore[arg-type]
    return source


def _infer_num_classes(train_set) -> int | None:
    """Classes of in-memory training data (or of a TensorDataset); ``None`` when only a full pass could tell."""
    classes = getattr(train_set, "classes", None)
    if isinstance(classes, (tuple, list)) and classes:
        return len(classes)
    y = getattr(train_set, "y", None)
    if y is None and isinstance(train_set, (tuple, list)) and len(train_set) == 2:
        y = train_set[1]
    if y is None and isinstance(train_set, Subset) and isinstance(train_set.dataset, TensorDataset):
        y = train_set.dataset.tensors[1][list(train_set.indices)]
    if y is None and isinstance(train_set, TensorDataset) and len(train_set.tensors) >= 2:
        y = train_set.tensors[1]
    if isinstance(y, Tensor) and y.numel():
        return int(y.max()) + 1
    return None


class Trainer:
    """One training run of ``config``.

    Optional arguments: ``model`` (an ``nn.Module`` instead of ``create_model(config.model)``; it must take
    ``[0, 1]`` pixels), ``train_set`` / ``eval_set`` (an :class:`fastadv.data.ImageSet`, an ``(x, y)`` pair of tensors
    or a map-style ``Dataset`` of ``(image, label)``; default: ``get_dataset(config.dataset)`` train /
    ``config.eval_split``), ``callbacks`` (objects with ``on_step_end`` / ``on_epoch_end`` / ``on_train_end``),
    ``method`` (a :class:`~fastadv.train.methods.Method` instance of ``config.method``, built with ``config``, for a
    method that needs objects a config cannot hold — a threat model, fitting data; default:
    ``create_method(config)``).

    Under ``torchrun`` the process group is started from the environment; every rank builds the same trainer.
    """

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None, train_set=None, eval_set=None,
                 callbacks: Iterable[Any] = (), method: Method | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer needs a TrainConfig, got {type(config).__name__}")
        if method is not None:
            if not isinstance(method, Method):
                raise TypeError(f"Trainer: `method` must be a fastadv.train.methods.Method, "
                                f"got {type(method).__name__}")
            if method.name != config.method or method.config is not config:
                other = "" if method.config is config else " built with another config"
                raise ValueError(f"Trainer: `method` must be a {config.method!r} method built with this config "
                                 f"(got {method.name!r}{other})")
        self.config = config
        self.callbacks = list(callbacks)
        self.dist = init_distributed(config.dist_backend, config.device)
        try:
            self._build(model, train_set, eval_set, method)
        except BaseException:
            shutdown(self.dist)
            raise

    # ------------------------------------------------------------------ construction

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def amp(self) -> str | None:
        """``"bf16"``, ``"fp16"`` or ``None``."""
        return None if self.config.amp == "none" else self.config.amp

    def autocast(self):
        return autocast_context(self.device, self.amp)

    def _build(self, model: nn.Module | None, train_set, eval_set, method: Method | None) -> None:
        c = self.config
        self.device = _resolve_device(c, self.dist)
        if c.sync_batchnorm and self.device.type != "cuda" and self.dist.enabled:
            raise ValueError("TrainConfig.sync_batchnorm: SyncBatchNorm needs CUDA devices")
        if c.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

        # ---- data
        evaluates = c.eval_subset != 0
        if train_set is None or (eval_set is None and evaluates):
            from ..data import get_dataset

            if train_set is None:
                train_set = get_dataset(c.dataset, c.data_dir, "train", **c.dataset_kwargs)
            if eval_set is None and evaluates:
                eval_set = get_dataset(c.dataset, c.data_dir, c.eval_split, **c.dataset_kwargs)
        train_set = _subset(train_set, c.train_subset)
        self.num_classes = c.num_classes if c.num_classes is not None else _infer_num_classes(train_set)
        if self.num_classes is None:
            raise ValueError("TrainConfig.num_classes: cannot tell the number of classes of this training Dataset "
                             "without reading all of it; set num_classes")
        self._train_source = train_set
        self.train_data = TrainData(train_set, batch_size=c.batch_size, device=self.device, rank=self.rank,
                                    world_size=self.world_size, seed=c.seed, drop_last=c.drop_last,
                                    num_workers=c.num_workers)
        self.eval_data = EvalData(eval_set, batch_size=c.eval_batch_size, device=self.device, rank=self.rank,
                                  world_size=self.world_size, limit=c.eval_subset) if evaluates else None
        self.steps_per_epoch = len(self.train_data)
        if self.steps_per_epoch == 0:
            raise ValueError(f"TrainConfig.batch_size: {c.batch_size} is larger than this rank's "
                             f"{self.train_data.num_examples // self.world_size} training examples with drop_last=True")

        # ---- model (the same initial weights on every rank; DDP also broadcasts rank 0's)
        torch.manual_seed(c.seed)
        if model is None:
            from ..models import create_model

            model = create_model(c.model, num_classes=self.num_classes, **c.model_kwargs)
        # The run's memory format for 4-D batches, decided once (TrainConfig.channels_last=None: automatic).
        has_conv = isinstance(model, nn.Module) and has_conv2d(model)
        self.channels_last = (c.channels_last if c.channels_last is not None
                              else auto_channels_last(has_conv, self.device, self.amp))
        self.model = self.prepare_model(model)
        if c.sync_batchnorm and self.dist.enabled:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

        # ---- private generators (per rank), stored in every checkpoint
        gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.attack_generator = torch.Generator(device=gen_device).manual_seed(c.seed + 1_000_003 * (self.rank + 1))
        self.aug_generator = torch.Generator(device=gen_device).manual_seed(c.seed + 2_000_029 * (self.rank + 1))

        # ---- method, the trained module, DDP
        self.method: Method = method if method is not None else create_method(c)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.method.setup(self)
        self.net_module = self.method.wrap_model(self.model)
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net: nn.Module = DistributedDataParallel(self.net_module, device_ids=device_ids,
                                                          find_unused_parameters=c.find_unused_parameters)
        else:
            self.net = self.net_module

        # ---- optimisation
        self.num_epochs = self.method.num_epochs(c.epochs)
        self.total_steps = self.num_epochs * self.steps_per_epoch * self.method.steps_per_batch
        self.optimizer = build_optimizer(c, self.net_module.parameters())
        self.scheduler = build_scheduler(c, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.amp == "fp16")
        self.sam = isinstance(self.optimizer, SAM)
        self._last_lr = self.optimizer.param_groups[0]["lr"]

        # ---- bookkeeping
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.stop_reason: str | None = None
        self.resumed_from: Path | None = None
        self._reset_running()
        self.out_dir = Path(c.out_dir) if c.out_dir is not None else None
        self.logger = RunLogger(self.out_dir if self.is_main else None)
        if c.resume is not None:
            self._resume()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``model`` with the run's input normalisation (``normalize``), on the device, in the memory format."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if self.config.normalize:
            from ..models import with_normalization

            mean, std = self._normalization_stats()
            model = with_normalization(model, mean, std)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _normalization_stats(self):
        from ..data import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

        known = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
        if self.config.dataset in known:
            return known[self.config.dataset]
        source = self._train_source
        if hasattr(source, "channel_stats"):
            return source.channel_stats()
        x = getattr(self.train_data, "x", None)
        if x is None:
            raise ValueError("TrainConfig.normalize: the channel statistics of a Dataset input are unknown; wrap the "
                             "model with fastadv.models.with_normalization yourself and set normalize=False")
        values = x.double() / (255.0 if x.dtype == torch.uint8 else 1.0)
        return values.mean(dim=(0, 2, 3)).tolist(), values.std(dim=(0, 2, 3), correction=0).tolist()

    def _reset_running(self) -> None:
        self._running = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count

    # ------------------------------------------------------------------ one optimiser step

    def optimize(self, closure: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """One optimiser step on the loss of ``closure()`` (which returns ``(loss, logits)``): autocast,
        backward (scaled for fp16), gradient clipping, the optimiser step (SAM evaluates the closure twice; the
        second pass leaves BatchNorm running statistics alone) and the LR schedule step. Returns the detached
        loss and logits of the first evaluation."""
        c = self.config
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.zero_grad(set_to_none=True)
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        if self.sam:
            first: dict[str, Tensor] = {}

            def sam_closure() -> Tensor:
                again = "loss" in first
                with running_stats_frozen(self.net_module) if again else nullcontext():
                    with self.autocast():
                        loss, logits = closure()
                    loss.backward()
                if c.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                if not again:
                    first["loss"], first["logits"] = loss.detach(), logits.detach()
                return loss

            self.optimizer.step(sam_closure)
            loss, logits = first["loss"], first["logits"]
        else:
            with self.autocast():
                loss, logits = closure()
            self.scaler.scale(loss).backward()
            if c.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss, logits = loss.detach(), logits.detach()
        self.scheduler.step()
        return loss, logits

    # ------------------------------------------------------------------ snapshots (Fast AT's rollback)

    def snapshot(self) -> dict:
        """A copy of the trained weights, optimiser and scaler state (tensors and plain values)."""
        return {"net": {k: v.detach().clone() for k, v in self.net_module.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scaler": self.scaler.state_dict()}

    def restore_snapshot(self, snapshot: dict) -> None:
        """Go back to a :meth:`snapshot` (the LR schedule keeps its position)."""
        if snapshot is None:
            raise RuntimeError("no snapshot to roll back to")
        self.net_module.load_state_dict(snapshot["net"])
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        self.scaler.load_state_dict(snapshot["scaler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def request_stop(self, reason: str) -> None:
        """End training after the current epoch (its checkpoint and logs are still written)."""
        self.stop_reason = reason
        if self.is_main:
            log.warning("stopping: %s", reason)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, steps: int | None = None) -> dict[str, float]:
        """Natural and PGD-``eval_steps`` accuracy on the held-out subset (sharded, summed over ranks)."""
        if self.eval_data is None:
            raise ValueError("Trainer.evaluate: this run has no evaluation data (TrainConfig.eval_subset=0)")
        c = self.config
        generator = torch.Generator(device=self.device).manual_seed(c.seed + 7919 * (self.epoch + 1))
        result = evaluate_robustness(self.model, self.eval_data, eps=c.eps, alpha=c.eval_alpha,
                                     steps=c.eval_steps if steps is None else steps, norm=c.norm, generator=generator,
                                     amp=self.amp, channels_last=self.channels_last, fold_bn=c.fold_bn,
                                     dist_info=self.dist,
                                     device=self.device)
        return {"nat_acc": result["nat_acc"], "pgd_acc": result["pgd_acc"]}

    # ------------------------------------------------------------------ checkpoints

    def _rank_state(self) -> dict:
        """What differs between ranks: RNG states, BatchNorm (and other) buffers, which each rank updates
        locally between DDP's broadcasts, the running sums of the epoch, and per-rank method state."""
        return {
            "rng": {"global": capture_global_rng(), "attack": self.attack_generator.get_state(),
                    "augment": self.aug_generator.get_state()},
            "buffers": {name: buf.detach().cpu().clone() for name, buf in self.net_module.named_buffers()},
            "running": self._running.cpu(),
            "method": self.method.rank_state_dict(),
        }

    def checkpoint_state(self) -> dict:
        """The full training state (a collective under DDP: every rank must call it)."""
        ranks = all_gather_objects(self._rank_state(), self.dist)
        finished = self.stop_reason is not None or self.epoch >= self.num_epochs
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "num_classes": self.num_classes,
            "normalization": [list(map(float, v)) for v in self._normalization_stats()] if self.config.normalize else None,
            "world_size": self.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "finished": finished,
            **self._model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "ranks": ranks,
            "data": self.train_data.state_dict(),
            "history": self.history,
            "best": self.best,
            "stop_reason": self.stop_reason,
        }

    def _model_state(self) -> dict:
        """``{"model": state dict}``, less the parts the model declares frozen (an LM-VP source: rebuilt from
        the config, so a checkpoint holds only what training changes) unless ``checkpoint_frozen``; those
        are recorded by fingerprint, checked on resume."""
        state = self.model.state_dict()
        prefixes = () if self.config.checkpoint_frozen else frozen_prefixes(self.model)
        if not prefixes:
            return {"model": state}
        kept = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        omitted = {k: v for k, v in state.items() if k.startswith(prefixes)}
        return {"model": kept, "frozen": {"prefixes": list(prefixes), "fingerprint": fingerprint(omitted)}}

    def _load_model_state(self, state: dict, path: Path) -> None:
        frozen = state.get("frozen")
        if not frozen:
            self.model.load_state_dict(state["model"])
            return
        prefixes = tuple(frozen["prefixes"])
        current = {k: v for k, v in self.model.state_dict().items() if k.startswith(prefixes)}
        bad = fingerprint_mismatch(frozen["fingerprint"], fingerprint(current))
        if bad is not None:
            raise CheckpointError(f"cannot resume from {str(path)!r}: the checkpoint omits the frozen weights "
                                  f"({', '.join(prefixes)}) and this run's differ from the ones it was trained with "
                                  f"(first: {bad!r}); build the model with the same pre-trained weights")
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.startswith(prefixes)]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {str(path)!r} does not match this run's model: missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]}")

    def save_checkpoint(self, *names: str) -> list[Path]:
        """Write the state to ``out_dir/<name>.pt`` for each name (default ``last``); rank 0 writes."""
        names = names or ("last",)
        state = self.checkpoint_state()
        if not self.is_main or self.out_dir is None:
            return []
        return [atomic_save(state, self.out_dir / f"{name}.pt") for name in names]

    def _resume(self) -> None:
        c = self.config
        if c.resume == "auto":
            path = self.out_dir / "last.pt"
            if not path.exists():
                return
        else:
            path = Path(c.resume).expanduser()
        state = load_checkpoint(path)
        saved = state["config"]
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {str(path)!r} holds no config")
        current = c.to_dict()
        differ = [f"{k} (checkpoint {saved.get(k)!r}, now {current[k]!r})" for k in RESUME_FIELDS
                  if saved.get(k) != current[k]]
        if state.get("world_size") != self.world_size:
            differ.append(f"world_size (checkpoint {state.get('world_size')!r}, now {self.world_size})")
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            differ.append(f"batches per epoch (checkpoint {state.get('steps_per_epoch')!r}, "
                          f"now {self.steps_per_epoch})")
        if differ:
            raise CheckpointError(f"cannot resume from {str(path)!r}: the run differs in " + "; ".join(differ))
        if len(state["ranks"]) != self.world_size:
            raise CheckpointError(f"checkpoint {str(path)!r} holds the state of {len(state['ranks'])} ranks, "
                                  f"this run has {self.world_size}")
        try:
            self._load_model_state(state, path)
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} does not match this run's model/optimiser: {exc}") from exc
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best = state.get("best")
        self.stop_reason = state.get("stop_reason")
        mine = state["ranks"][self.rank]
        self._running = mine["running"].to(device=self.device, dtype=torch.float64)
        restore_global_rng(mine["rng"]["global"])
        self.attack_generator.set_state(mine["rng"]["attack"].cpu())
        self.aug_generator.set_state(mine["rng"]["augment"].cpu())
        with torch.no_grad():
            for name, buf in self.net_module.named_buffers():
                if name in mine["buffers"]:
                    buf.copy_(mine["buffers"][name])
        self.method.load_rank_state_dict(mine["method"])
        self.train_data.load_state_dict(state["data"], mid_epoch=self.step_in_epoch > 0)
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        self.resumed_from = path
        if self.is_main:
            log.info("resumed from %s at epoch %d, batch %d (global step %d)", path, self.epoch + 1,
                     self.step_in_epoch, self.global_step)

    # ------------------------------------------------------------------ the loop

    def _prepare(self, batch: Batch) -> Batch:
        if self.config.augment:
            batch = augment(batch, self.aug_generator, self.config.crop_padding)
        if self.channels_last:
            batch.x = batch.x.contiguous(memory_format=torch.channels_last)
        return batch

    def _eval_due(self, epoch: int) -> bool:
        if self.eval_data is None:
            return False
        every = self.config.eval_every
        return (every > 0 and (epoch + 1) % every == 0) or epoch + 1 == self.num_epochs

    def fit(self) -> TrainResult:
        """Train until the last epoch (or a stop request); returns the history and checkpoint paths."""
        if self.is_main and self.out_dir is not None:
            atomic_write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", self.out_dir / "config.json")
        while self.stop_reason is None and self.epoch < self.num_epochs:
            self._run_epoch()
        result = TrainResult(
            history=list(self.history), best=self.best, stop_reason=self.stop_reason,
            last_checkpoint=self._existing("last"), best_checkpoint=self._existing("best"),
            resumed_from=self.resumed_from)
        for callback in self.callbacks:
            hook = getattr(callback, "on_train_end", None)
            if hook is not None:
                hook(self, result)
        return result

    def _existing(self, name: str) -> Path | None:
        if self.out_dir is None:
            return None
        path = self.out_dir / f"{name}.pt"
        return path if path.exists() else None

    def _run_epoch(self) -> None:
        from tqdm import tqdm

        c = self.config
        epoch = self.epoch
        self.net.train()
        self.method.on_epoch_start(self, epoch)
        started = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{self.num_epochs}",
                   disable=not (c.progress and self.is_main), leave=False, dynamic_ncols=True)
        try:
            for batch in self.train_data.epoch(epoch, skip=self.step_in_epoch):
                batch = self._prepare(batch)
                loss, logits = self.method.train_batch(self, batch)
                n = batch.y.shape[0]
                self._running += torch.stack([loss.double() * n, (logits.argmax(dim=1) == batch.y).sum().double(),
                                              torch.tensor(float(n), dtype=torch.float64, device=self.device)])
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update(1)
                if not bar.disable and self.step_in_epoch % c.log_every_steps == 0:
                    total_loss, correct, count = self._running.tolist()
                    bar.set_postfix(loss=f"{total_loss / count:.4f}", acc=f"{correct / count:.3f}")
                if c.checkpoint_every_steps and self.global_step % c.checkpoint_every_steps == 0:
                    self.save_checkpoint("last")
                for callback in self.callbacks:
                    hook = getattr(callback, "on_step_end", None)
                    if hook is not None:
                        hook(self)
        finally:
            bar.close()
        self._end_epoch(epoch, time.perf_counter() - started)

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        totals = all_reduce_sum(self._running.clone(), self.dist)
        loss_sum, correct, count = totals.tolist()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.global_step,
            "lr": self._last_lr,
            "train_loss": loss_sum / count if count else math.nan,
            "train_acc": correct / count if count else math.nan,
            "epoch_time_s": seconds,
        }
        if self._eval_due(epoch):
            record.update(self.evaluate())
        self.method.on_epoch_end(self, epoch, record)
        self.history.append(record)
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        self._reset_running()
        improved = self._update_best(record)
        names = ["last"] + (["best"] if improved and self.config.save_best else [])
        if self.out_dir is not None:
            self.save_checkpoint(*names)
        self.logger.write(self.config.to_dict(), self.history, self.best, self.stop_reason)
        if self.is_main:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
            log.info("epoch %d/%d %s", epoch + 1, self.num_epochs, shown)
        for callback in self.callbacks:
            hook = getattr(callback, "on_epoch_end", None)
            if hook is not None:
                hook(self, record)

    def _update_best(self, record: dict[str, Any]) -> bool:
        name = self.config.best_metric
        value = record.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            name, value = "nat_acc", record.get("nat_acc")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.best is None or value > self.best["value"]:
            self.best = {"metric": name, "value": float(value), "epoch": record["epoch"]}
            return True
        return False

    def close(self) -> None:
        """End the process group if this trainer started it."""
        shutdown(self.dist)


def train(config: TrainConfig | dict | None = None, **kwargs: Any) -> TrainResult:
    """Build a :class:`Trainer` for ``config`` (a :class:`TrainConfig` or a dict of its fields; default
    ``TrainConfig()``), train, and return the :class:`TrainResult`. Keyword arguments go to :class:`Trainer`."""
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    trainer = Trainer(config, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()


__all__ = ["Callback", "TrainResult", "Trainer", "running_stats_frozen", "train"]
