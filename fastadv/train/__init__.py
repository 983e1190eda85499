"""fastadv.train: one training loop with pluggable methods.

>>> from fastadv.train import TrainConfig, train
>>> result = train(TrainConfig(method="trades", model="small_cnn", dataset="digits", epochs=2, out_dir="runs/t"))

Methods (:data:`METHODS`): ``standard``, ``pgd_at``, ``trades``, ``mart``, ``part``, ``part_trades``,
``part_mart``, ``fast_at``, ``free_at``, ``rrm``; algorithms and defaults as in SPECS §2. The loop
(:class:`Trainer`) provides SGD / Adam / SAM, per-step multistep / cosine / cyclic schedules, bf16 autocast and
channels_last, periodic natural + PGD-20 evaluation, atomic best/last checkpoints with exact (mid-epoch)
resume, CSV/JSON logs, a progress bar, and DDP under ``torchrun``.
"""

from .checkpoint import CheckpointError, atomic_save, load_checkpoint, load_trained_model
from .config import METHOD_PRESETS, TrainConfig
from .data import Batch, EvalData, TrainData
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate_robustness
from .methods import METHODS, Method, create_method, get_method, register_method
from .optim import SAM, build_optimizer, build_scheduler, lr_factor
from .trainer import Callback, Trainer, TrainResult, train

__all__ = [
    "METHODS",
    "METHOD_PRESETS",
    "SAM",
    "Batch",
    "Callback",
    "CheckpointError",
    "DistInfo",
    "EvalData",
    "Method",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "Trainer",
    "atomic_save",
    "build_optimizer",
    "build_scheduler",
    "create_method",
    "evaluate_robustness",
    "get_method",
    "init_distributed",
    "load_checkpoint",
    "load_trained_model",
    "lr_factor",
    "register_method",
    "train",
]
