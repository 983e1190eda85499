"""``TrainConfig``: every knob of a training run, with the reference defaults of SPECS §2.

Budgets (``eps``, ``alpha``, ...) are in pixel units on ``[0, 1]`` images. The defaults are PART's reference
setting (CIFAR-10, SGD momentum 0.9, lr 0.01, weight decay 2e-4, batch 128, crop+flip, 80 epochs with a
20-epoch warm-up); :meth:`TrainConfig.for_method` starts from the published setting of another method
(Fast AT's cyclic schedule, Free AT's replays, ...). Every invalid value raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("sgd", "adam", "sam")
SAM_BASES = ("sgd", "adam")
SCHEDULES = ("auto", "constant", "multistep", "cosine", "cyclic")
AMP_MODES = ("none", "bf16", "fp16")
NORMS = ("linf", "l2")
BEST_METRICS = ("pgd_acc", "nat_acc")
CO_ACTIONS = ("stop", "rollback", "warn")
CAM_METHODS = ("gradcam", "xgradcam", "layercam")
MASK_RECIPES = ("jet", "cam")

# Published settings of the methods whose reference recipe differs from the defaults above (applied by
# TrainConfig.for_method; any keyword given there wins).
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    # Wong et al. 2020, CIFAR-10: FGSM-RS α = 1.25ε, 15 epochs, cyclic LR peaking at 0.2, weight decay 5e-4.
    "fast_at": {"epochs": 15, "lr": 0.2, "weight_decay": 5e-4, "cyclic_peak": 0.4},
    # Shafahi et al. 2019: m = 8 replays of each batch with step ε; the nominal 96 epochs (the RRM
    # reference's Free AT run) become 96 / m = 12 passes over the data.
    "free_at": {"free_replays": 8, "epochs": 96},
}


def _fail(name: str, message: str) -> None:
    raise ValueError(f"TrainConfig.{name}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass
class TrainConfig:
    """All settings of a run. See the field comments; :meth:`validate` runs on construction."""

    # ---- what to train
    # standard | pgd_at | trades | mart | part | part_trades | part_mart | fast_at | free_at | rrm
    method: str = "pgd_at"
    model: str = "resnet18"  # fastadv.models.create_model name (timm names too)
    model_kwargs: dict = field(default_factory=dict)  # e.g. {"width": 16} for small_cnn
    normalize: bool = False  # prepend Normalize(mean, std) of the training set (known CIFAR stats)

    # ---- data
    dataset: str = "cifar10"  # fastadv.data.get_dataset name; "digits" needs no files
    data_dir: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)  # extra keyword arguments for get_dataset
    num_classes: int | None = None  # None: from the data (ImageSet classes, or the largest label + 1)
    train_subset: int | None = None  # use only the first n training examples
    eval_split: str = "test"  # split the held-out evaluation subset comes from
    eval_subset: int | None = 1000  # periodic evaluation on the first n examples of eval_split (None: all, 0: none)
    augment: bool = True  # random crop (zero padding) + horizontal flip, on device
    crop_padding: int = 4
    batch_size: int = 128  # per process; the global batch is batch_size × world_size
    drop_last: bool = False
    num_workers: int = 0  # DataLoader workers (torch Dataset inputs only)

    # ---- optimisation
    epochs: int = 80
    optimizer: str = "sgd"  # sgd | adam | sam (SAM wraps sam_base)
    sam_base: str = "sgd"
    sam_rho: float = 0.05
    sam_adaptive: bool = False  # ASAM (Kwon et al. 2021)
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "auto"  # auto (cyclic for fast_at, else multistep) | constant | multistep | cosine | cyclic
    milestones: tuple[float, ...] | None = None  # multistep, in epochs; None = (50 %, 75 %) of epochs
    lr_gamma: float = 0.1  # multistep factor
    lr_warmup_epochs: float = 0.0  # linear LR warm-up (multistep / cosine / constant)
    cyclic_peak: float = 0.4  # cyclic: fraction of training at which the LR peaks (Wong et al.: 2/5)
    lr_min: float = 0.0  # floor of cosine and cyclic schedules
    grad_clip: float | None = None  # max global gradient norm

    # ---- threat model for training (pixel units)
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10  # inner-maximisation steps (PGD-AT, TRADES, MART, PART*)
    norm: str = "linf"

    # ---- method knobs
    trades_beta: float = 6.0
    mart_beta: float = 6.0
    start_std: float = 0.001  # TRADES / MART start: x + start_std · N(0, 1)
    warmup_epochs: int = 20  # PART: epochs of the base method before pixel reweighting
    eps_low: float = 7 / 255  # PART: budget of unimportant pixels (important pixels get eps)
    cam_method: str = "gradcam"  # gradcam | xgradcam | layercam
    cam_recipe: str = "jet"  # jet (reference recipe) | cam (monotone)
    cam_layer: str | None = None  # dotted sub-module name; None = model.cam_layer
    cam_amp: str | None = None  # precision of the CAM passes: none | bf16 | fp16; None = the run's amp
    cam_every: int = 10  # PART: refresh the masks every s epochs
    reproduce_misaligned_masks: bool = False  # PART: the reference code's mask/image misalignment
    fast_alpha: float | None = None  # Fast AT step; None = 1.25 · eps
    co_action: str = "stop"  # catastrophic overfitting: stop (roll back, end) | rollback (roll back, go on) | warn
    co_drop: float = 0.2  # collapse = PGD accuracy below the last good check's by more than this
    co_batch_size: int = 256  # held-out examples for the check (first of the evaluation subset)
    co_steps: int = 10  # PGD steps of the check
    co_max_rollbacks: int = 3
    free_replays: int = 8  # Free AT: m
    free_alpha: float | None = None  # Free AT step; None = eps
    rrm_teacher: str | None = None  # RRM: teacher checkpoint (state dict file)
    rrm_teacher_model: str = "resnet18"
    rrm_teacher_kwargs: dict = field(default_factory=dict)
    rrm_lambda: float = 0.005
    rrm_projection: bool = True  # learn Linear(student_dim, teacher_dim) when the widths differ

    # ---- precision and layout
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a GradScaler)
    channels_last: bool | None = None  # None: automatic (CPU, or any amp, with a Conv2d in the model)
    fold_bn: bool = True  # attacks run the eval-mode model with BatchNorm folded into the convolutions
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms + cudnn.deterministic

    # ---- periodic evaluation (natural + PGD on the held-out subset)
    eval_every: int = 1  # epochs; 0 = only after the last epoch
    eval_steps: int = 20  # PGD-20; 0 = natural accuracy only
    eval_alpha: float = 2 / 255
    eval_batch_size: int = 256
    best_metric: str = "pgd_acc"  # pgd_acc | nat_acc

    # ---- output
    out_dir: str | None = "runs/fastadv"  # checkpoints and logs; None writes nothing
    checkpoint_every_steps: int = 0  # also write last.pt every N batches (mid-epoch resume); 0 = epoch ends
    save_best: bool = True
    checkpoint_frozen: bool = False  # also store the parts a model declares frozen (frozen_state_prefixes)
    resume: str | None = None  # a checkpoint path, or "auto" = out_dir/last.pt when it exists
    progress: bool = True  # tqdm progress bar (rank 0)
    log_every_steps: int = 20  # progress-bar refresh of the running loss / accuracy
    seed: int = 0

    # ---- distributed (torchrun: WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT)
    dist_backend: str | None = None  # None = nccl on CUDA, gloo on CPU
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        if isinstance(self.milestones, list):
            self.milestones = tuple(self.milestones)
        self.validate()

    @property
    def lr_schedule(self) -> str:
        """The schedule in effect: ``schedule``, with ``"auto"`` resolved to the method's reference schedule
        (Fast AT's cyclic one, else multistep). The schedule is applied after every optimiser step."""
        if self.schedule != "auto":
            return self.schedule
        return "cyclic" if self.method == "fast_at" else "multistep"

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> TrainConfig:
        """A config with ``method``'s published recipe (:data:`METHOD_PRESETS`), then ``overrides``."""
        return cls(**{"method": method, **METHOD_PRESETS.get(method, {}), **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        """Plain Python values (lists for tuples): JSON- and ``weights_only``-checkpoint-friendly."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        from .methods import METHODS

        if self.method not in METHODS:
            _fail("method", f"unknown training method {self.method!r}; valid: {', '.join(sorted(METHODS))}")
        for name in ("model", "dataset", "eval_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                _fail(name, f"must be a non-empty string, got {value!r}")
        from ..data import DATASETS

        if self.dataset not in DATASETS:
            _fail("dataset", f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        for name in ("model_kwargs", "dataset_kwargs", "rrm_teacher_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                _fail(name, f"must be a dict with string keys, got {value!r}")

        for name in ("normalize", "augment", "drop_last", "nesterov", "sam_adaptive", "reproduce_misaligned_masks",
                     "rrm_projection", "deterministic", "save_best", "checkpoint_frozen", "fold_bn", "progress",
                     "sync_batchnorm", "find_unused_parameters"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be True or False, got {getattr(self, name)!r}")

        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            _fail("channels_last", f"must be True, False or None (automatic), got {self.channels_last!r}")

        positive_ints = ("batch_size", "epochs", "eval_batch_size", "cam_every", "co_batch_size", "co_steps",
                         "free_replays", "log_every_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(name, f"must be an integer >= 1, got {value!r}")
        non_negative_ints = ("crop_padding", "num_workers", "steps", "warmup_epochs", "co_max_rollbacks", "eval_every",
                             "eval_steps", "checkpoint_every_steps", "seed")
        for name in non_negative_ints:
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                _fail(name, f"must be an integer >= 0, got {value!r}")
        for name in ("train_subset", "eval_subset", "num_classes"):
            value = getattr(self, name)
            least = 0 if name == "eval_subset" else 1  # eval_subset=0: no periodic evaluation, no eval data
            if value is not None and (not _is_int(value) or value < least):
                _fail(name, f"must be None or an integer >= {least}, got {value!r}")
        if self.eval_subset == 0 and self.method == "fast_at":
            _fail("eval_subset", "Fast AT's catastrophic-overfitting check needs held-out data; give eval_subset >= 1")

        positive_reals = ("lr", "eps", "alpha", "eval_alpha", "co_drop")
        for name in positive_reals:
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                _fail(name, f"must be a finite number > 0, got {value!r}")
        non_negative_reals = ("momentum", "weight_decay", "sam_rho", "lr_warmup_epochs", "lr_min", "trades_beta",
                              "mart_beta", "start_std", "eps_low", "rrm_lambda")
        for name in non_negative_reals:
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                _fail(name, f"must be a finite number >= 0, got {value!r}")
        for name in ("fast_alpha", "free_alpha", "grad_clip"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or value <= 0):
                _fail(name, f"must be None or a finite number > 0, got {value!r}")
        if not _is_real(self.lr_gamma) or not 0 < self.lr_gamma <= 1:
            _fail("lr_gamma", f"must be in (0, 1], got {self.lr_gamma!r}")
        if not _is_real(self.cyclic_peak) or not 0 < self.cyclic_peak < 1:
            _fail("cyclic_peak", f"must be in (0, 1), got {self.cyclic_peak!r}")
        if self.lr_min >= self.lr:
            _fail("lr_min", f"must be below lr ({self.lr}), got {self.lr_min}")
        if self.momentum >= 1:
            _fail("momentum", f"must be < 1, got {self.momentum}")
        if (not isinstance(self.adam_betas, tuple) or len(self.adam_betas) != 2
                or not all(_is_real(b) and 0 <= b < 1 for b in self.adam_betas)):
            _fail("adam_betas", f"must be two numbers in [0, 1), got {self.adam_betas!r}")

        choices = {"optimizer": OPTIMIZERS, "sam_base": SAM_BASES, "schedule": SCHEDULES, "amp": AMP_MODES,
                   "norm": NORMS, "best_metric": BEST_METRICS, "co_action": CO_ACTIONS, "cam_method": CAM_METHODS,
                   "cam_recipe": MASK_RECIPES}
        for name, options in choices.items():
            if getattr(self, name) not in options:
                _fail(name, f"unknown value {getattr(self, name)!r}; valid: {', '.join(options)}")

        if self.milestones is not None:
            if not isinstance(self.milestones, tuple) or not all(_is_real(m) and m > 0 for m in self.milestones):
                _fail("milestones", f"must be None or positive epoch numbers, got {self.milestones!r}")
            if list(self.milestones) != sorted(self.milestones):
                _fail("milestones", f"must be increasing, got {self.milestones!r}")
        if self.lr_warmup_epochs >= self.epochs:
            _fail("lr_warmup_epochs", f"must be below epochs ({self.epochs}), got {self.lr_warmup_epochs}")
        if self.optimizer == "sam" and self.amp == "fp16":
            _fail("amp", "fp16 (GradScaler) cannot be combined with optimizer='sam'; use amp='bf16'")

        if self.method in ("pgd_at", "trades", "mart", "part", "part_trades", "part_mart") and self.steps < 1:
            _fail("steps", f"method {self.method!r} needs at least one inner-maximisation step, got {self.steps}")
        if self.method.startswith("part"):
            if self.norm != "linf":
                _fail("norm", f"method {self.method!r} reweights an L-inf budget per pixel; got norm={self.norm!r}")
            if self.eps_low > self.eps:
                _fail("eps_low", f"must not exceed eps ({self.eps:.6g}), got {self.eps_low:.6g}")
            if self.warmup_epochs >= self.epochs:
                _fail("warmup_epochs", f"must be below epochs ({self.epochs}) for method {self.method!r}, "
                                       f"else no epoch uses pixel reweighting; got {self.warmup_epochs}")
        if self.method == "rrm" and self.rrm_teacher is None:
            _fail("rrm_teacher", "method 'rrm' needs rrm_teacher=<path of the teacher's checkpoint>")
        if self.cam_amp is not None and self.cam_amp not in AMP_MODES:
            _fail("cam_amp", f"must be None (the run's amp) or one of {', '.join(AMP_MODES)}, got {self.cam_amp!r}")
        for name in ("data_dir", "cam_layer", "rrm_teacher", "out_dir", "resume", "dist_backend"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail(name, f"must be None or a non-empty string, got {value!r}")
        if self.resume == "auto" and self.out_dir is None:
            _fail("resume", "'auto' looks for out_dir/last.pt, but out_dir is None")
        if self.checkpoint_every_steps and self.out_dir is None:
            _fail("checkpoint_every_steps", "checkpoints need an out_dir")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            _fail("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dist_backend is not None and self.dist_backend not in ("gloo", "nccl", "mpi", "ucc"):
            _fail("dist_backend", f"unknown backend {self.dist_backend!r}; valid: gloo, nccl, mpi, ucc")
