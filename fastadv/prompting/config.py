"""``LMVPConfig``: every knob of an LM-VP run (model, data, training, evaluation, output).

The field defaults are TARP-VP's reference recipe (SPECS §3): ``tarp`` geometry (resize to 192, ``tanh``
border), a learned ``linear`` label mapping, SAM (ρ = 0.05) over SGD lr 0.05 momentum 0.9, StepLR every 2
epochs ×0.7, 20 epochs, batch 64. :meth:`LMVPConfig.ilm_vp` gives ILM-VP's (``ilm`` geometry and mapping,
Adam lr 0.01, 200 epochs, LR ×0.1 at 50 % and 72 %). Budgets are in pixel units on ``[0, 1]`` images.
Every invalid value raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .mapping import MAPPINGS
from .prompt import GEOMETRIES

METHODS = ("standard", "pgd_at", "transfer_at")
OPTIMIZERS = ("sam", "sgd", "adam")
SAM_BASES = ("sgd", "adam")
SCHEDULES = ("step", "multistep", "constant")
AMP_MODES = ("none", "bf16")
NORMALIZATIONS = ("default", "imagenet", "target", "none")
EVAL_ATTACKS = ("pgd10", "pgd20", "cw20")

PRESETS: dict[str, dict[str, Any]] = {
    # TARP-VP: the field defaults.
    "tarp_vp": {},
    # ILM-VP (Chen et al. 2023): native 32x32 images in a sigmoid prompt, iterative label mapping, Adam 0.01,
    # 200 epochs, LR x0.1 at 50 % and 72 % of training.
    "ilm_vp": {"geometry": "ilm", "mapping": "ilm", "optimizer": "adam", "lr": 0.01, "momentum": 0.0,
               "epochs": 200, "schedule": "multistep", "milestones": (0.5, 0.72), "lr_gamma": 0.1},
}


def _fail(name: str, message: str) -> None:
    raise ValueError(f"LMVPConfig.{name}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass
class LMVPConfig:
    """All settings of an LM-VP run; see the field comments. :meth:`validate` runs on construction."""

    # ---- model
    source: str = "resnet50"  # timm / torchvision / fastadv name (see load_source)
    source_kwargs: dict = field(default_factory=dict)
    source_classes: int = 1000  # the source label space (ImageNet)
    pretrained: bool = False  # load source_checkpoint, or a file already in the local hub cache
    source_checkpoint: str | None = None
    geometry: str = "tarp"  # ilm | tarp | pad
    out_size: int = 224  # the source network's input size
    image_size: int | None = None  # ilm: native image size; None = the dataset's
    rescale: int = 192  # tarp: resize target; out_size = no prompt border
    pad_width: int = 30  # pad: frame width
    normalization: str = "default"  # default (per geometry) | imagenet | target (training-set stats) | none
    mapping: str = "linear"  # rlm | flm | ilm | linear
    channels_last: bool | None = None  # None: automatic (the trainer's rule: on for a CNN source on the CPU or with amp)
    fold_bn: bool = True  # run the frozen source with its BatchNorms folded into the convolutions (same function)

    # ---- data
    dataset: str = "cifar10"  # fastadv.data.get_dataset name ("digits" needs no files)
    data_dir: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)
    train_subset: int | None = None  # first n training examples
    test_subset: int | None = None  # first n test examples (evaluation)
    augment: bool = False  # random crop (padding 4) + flip on the device

    # ---- training
    method: str = "standard"  # standard | pgd_at (white-box, through the LM-VP model) | transfer_at
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "sam"  # sam (over sam_base) | sgd | adam
    sam_base: str = "sgd"
    sam_rho: float = 0.05
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "step"  # step (StepLR) | multistep (milestones as fractions of epochs) | constant
    lr_step_epochs: int = 2
    lr_gamma: float = 0.7
    milestones: tuple[float, ...] = (0.5, 0.72)
    mapping_batch_size: int = 256  # batches of the flm / ilm counting pass

    # ---- adversarial training (pixel units)
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    norm: str = "linf"
    threat_model: str | None = None  # transfer_at: fastadv.models name of the trained threat model
    threat_checkpoint: str | None = None  # its weights (required with threat_model)
    threat_kwargs: dict = field(default_factory=dict)

    # ---- precision, device, randomness
    amp: str = "none"  # none | bf16 (autocast of the source network)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0

    # ---- evaluation
    eval_batch_size: int = 128
    eval_subset: int | None = 1000  # robust accuracy on the first n test examples (None: all)
    eval_attacks: tuple[str, ...] = EVAL_ATTACKS  # white-box attacks on the LM-VP model
    eval_eps: float | None = None  # None = eps
    eval_alpha: float | None = None  # None = alpha
    cw_kappa: float = 50.0
    transfer_steps: int = 20  # transferred PGD from the threat model (0 = skip)
    mia: bool = True  # membership inference on natural and adversarial inputs
    mia_subset: int | None = 1000  # members / non-members used (first n of each)
    mia_steps: int = 20  # PGD steps of the adversarial MIA inputs
    sanity_checks: bool = True

    # ---- output
    out_dir: str | None = None  # last.pt (every epoch) and result.json; None writes nothing
    resume: str | None = None  # a checkpoint path, or "auto" = out_dir/last.pt when it exists
    save_source: bool = False  # also store the frozen source's weights in last.pt (self-contained, ~100 MB for RN-50)
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("milestones", "eval_attacks"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LMVPConfig:
        """``"tarp_vp"`` or ``"ilm_vp"`` (:data:`PRESETS`), then ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"LMVPConfig.preset: unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def tarp_vp(cls, **overrides: Any) -> LMVPConfig:
        return cls.preset("tarp_vp", **overrides)

    @classmethod
    def ilm_vp(cls, **overrides: Any) -> LMVPConfig:
        return cls.preset("ilm_vp", **overrides)

    @classmethod
    def from_dict(cls, values: dict) -> LMVPConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"LMVPConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        """Plain Python values (lists for tuples): JSON- and ``weights_only``-friendly."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value
        return out

    def replace(self, **changes: Any) -> LMVPConfig:
        return dataclasses.replace(self, **changes)

    @property
    def attack_eps(self) -> float:
        return self.eps if self.eval_eps is None else self.eval_eps

    @property
    def attack_alpha(self) -> float:
        return self.alpha if self.eval_alpha is None else self.eval_alpha

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        choices = {"geometry": GEOMETRIES, "mapping": MAPPINGS, "method": METHODS, "optimizer": OPTIMIZERS,
                   "sam_base": SAM_BASES, "schedule": SCHEDULES, "amp": AMP_MODES,
                   "normalization": NORMALIZATIONS, "norm": ("linf", "l2")}
        for name, options in choices.items():
            if getattr(self, name) not in options:
                _fail(name, f"unknown value {getattr(self, name)!r}; valid: {', '.join(options)}")
        for name in ("source", "dataset"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(name, f"must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("source_kwargs", "dataset_kwargs", "threat_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                _fail(name, f"must be a dict with string keys, got {value!r}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            _fail("channels_last", f"must be True, False or None (automatic), got {self.channels_last!r}")
        for name in ("pretrained", "fold_bn", "save_source", "augment", "mia", "sanity_checks", "progress"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be True or False, got {getattr(self, name)!r}")
        for name in ("source_classes", "out_size", "rescale", "epochs", "batch_size", "lr_step_epochs",
                     "mapping_batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(name, f"must be an integer >= 1, got {value!r}")
        for name in ("pad_width", "steps", "transfer_steps", "mia_steps", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                _fail(name, f"must be an integer >= 0, got {value!r}")
        for name in ("image_size", "train_subset", "test_subset", "eval_subset", "mia_subset"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                _fail(name, f"must be None or an integer >= 1, got {value!r}")
        for name in ("lr", "eps", "alpha", "cw_kappa"):
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                _fail(name, f"must be a finite number > 0, got {value!r}")
        for name in ("sam_rho", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                _fail(name, f"must be a finite number >= 0, got {value!r}")
        for name in ("eval_eps", "eval_alpha"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or value <= 0):
                _fail(name, f"must be None or a finite number > 0, got {value!r}")
        if self.momentum >= 1:
            _fail("momentum", f"must be < 1, got {self.momentum}")
        if not _is_real(self.lr_gamma) or not 0 < self.lr_gamma <= 1:
            _fail("lr_gamma", f"must be in (0, 1], got {self.lr_gamma!r}")
        if (not isinstance(self.milestones, tuple) or not all(_is_real(m) and 0 < m < 1 for m in self.milestones)
                or list(self.milestones) != sorted(self.milestones)):
            _fail("milestones", f"must be increasing fractions of training in (0, 1), got {self.milestones!r}")
        # Only the size knob of the chosen geometry is checked against the canvas.
        if self.geometry == "tarp" and self.rescale > self.out_size:
            _fail("rescale", f"must not exceed out_size ({self.out_size}), got {self.rescale}")
        if self.geometry == "ilm" and self.image_size is not None and self.image_size > self.out_size:
            _fail("image_size", f"must not exceed out_size ({self.out_size}), got {self.image_size}")
        if self.geometry == "pad" and 2 * self.pad_width >= self.out_size:
            _fail("pad_width", f"leaves no image window on a canvas of out_size {self.out_size}")
        if not isinstance(self.eval_attacks, tuple) or not all(a in EVAL_ATTACKS for a in self.eval_attacks):
            _fail("eval_attacks", f"must be a tuple of {', '.join(EVAL_ATTACKS)}, got {self.eval_attacks!r}")
        if self.method in ("pgd_at", "transfer_at") and self.steps < 1:
            _fail("steps", f"method {self.method!r} needs steps >= 1")
        if self.threat_model is not None and self.threat_checkpoint is None:
            _fail("threat_checkpoint", f"threat_model {self.threat_model!r} needs its trained weights "
                                       "(crafting on an untrained threat model is a known reference defect)")
        for name in ("source_checkpoint", "threat_model", "threat_checkpoint", "data_dir", "out_dir", "resume"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail(name, f"must be None or a non-empty string, got {value!r}")
        if self.resume == "auto" and self.out_dir is None:
            _fail("resume", "'auto' looks for out_dir/last.pt, but out_dir is None")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            _fail("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


__all__ = ["AMP_MODES", "EVAL_ATTACKS", "LMVPConfig", "METHODS", "NORMALIZATIONS", "OPTIMIZERS", "PRESETS",
           "SCHEDULES"]
