"""``create_model(name)`` over fastadv's CIFAR models, falling back to timm for every other name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import FeatureModel
from .resnet import preact_resnet18, resnet18
from .small_cnn import small_cnn
from .vgg import vgg11
from .wrn import wrn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a factory ``fn(num_classes=..., **kwargs)`` to the registry under ``name``."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    """Names fastadv builds itself (any other name goes to timm)."""
    return sorted(_REGISTRY)


register_model("resnet18")(resnet18)
register_model("preact_resnet18")(preact_resnet18)
register_model("vgg11")(vgg11)
register_model("small_cnn")(small_cnn)


@register_model("wrn34_10")
def wrn34_10(num_classes: int = 10, depth: int = 34, widen: int = 10, **kwargs: Any) -> nn.Module:
    """WRN-34-10 (``depth``/``widen`` may be overridden, e.g. for a reduced test model)."""
    return wrn(depth=depth, widen=widen, num_classes=num_classes, **kwargs)


class TimmModel(FeatureModel):
    """A timm model behind fastadv's interface; the timm model itself is ``.model``.

    ``features`` = timm's pre-logits (pooled) features, ``head`` = its classifier, and ``cam_layer_name``
    names the last stage of timm's ``feature_info`` (spatial for CNNs; for vision transformers the
    output is a token sequence, which :mod:`fastadv.cam` rejects with a clear error).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        info = getattr(model, "feature_info", None)
        last = info[-1].get("module") if isinstance(info, list) and info else None
        self.cam_layer_name = f"model.{last}" if last else None

    def features(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @property
    def head(self) -> nn.Module:
        return self.model.get_classifier()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} could not be read as a torch checkpoint ({exc})") from exc
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(
            f"checkpoint {str(path)!r} holds no state dict (expected a dict of tensors, or one under "
            "'state_dict', 'model_state_dict' or 'model')"
        )
    return checkpoint


# Prefixes that wrappers add to every key: DistributedDataParallel, torch.compile, TimmModel,
# with_normalization.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "1.")


def _fit_keys(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """``state`` with wrapper prefixes removed (or TimmModel's added) when that makes its keys exactly
    ``expected``; otherwise ``state`` unchanged, for ``load_state_dict`` to report the mismatch."""
    candidates = [state]
    current = state
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if current and all(k.startswith(prefix) for k in current):
                current = {k[len(prefix):]: v for k, v in current.items()}
                candidates.append(current)
                stripped = True
    for candidate in candidates:
        if set(candidate) == expected:
            return candidate
        prefixed = {f"model.{k}": v for k, v in candidate.items()}
        if set(prefixed) == expected:
            return prefixed
    return state


def checkpoint_file(checkpoint_path: str | os.PathLike) -> Path:
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path {str(path)!r} does not exist or is not a file")
    return path


def _create_timm(
    name: str, num_classes: int, pretrained: bool, checkpoint_path: str | os.PathLike | None, kwargs: dict
) -> nn.Module | None:
    """The timm model, or ``None`` when timm is missing or does not know ``name``."""
    try:
        import timm
    except ImportError:
        return None
    if not timm.is_model(name):
        return None
    if pretrained:
        if checkpoint_path is None:
            raise ValueError(
                f"pretrained=True for timm model {name!r} needs checkpoint_path=<local weights file>: "
                "fastadv never downloads weights (machines may be offline)"
            )
        # timm loads the file as its pretrained weights, adapting the classifier to num_classes and the
        # stem to in_chans exactly as for downloaded weights.
        path = checkpoint_file(checkpoint_path)
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=num_classes, **kwargs
        )
    else:
        # A checkpoint given without pretrained=True is a full checkpoint of this very model (strict),
        # saved from the timm model itself or from its TimmModel wrapper.
        path = checkpoint_file(checkpoint_path) if checkpoint_path is not None else None
        wrapped = TimmModel(timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs))
        if path is not None:
            load_weights_strict(wrapped, path)
        return wrapped
    return TimmModel(model)


def load_weights_strict(model: nn.Module, path: Path) -> None:
    state = _fit_keys(_read_state_dict(path), set(model.state_dict()))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: {exc}") from exc


def create_model(
    name: str,
    num_classes: int = 10,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name``: one of :func:`list_models`, else any ``timm`` model.

    fastadv's own models have no published weights: ``checkpoint_path`` loads a state dict saved from
    the same architecture (a bare state dict or one under ``state_dict``/``model``; the key prefixes of
    DDP, ``torch.compile`` and ``with_normalization`` wrappers are removed) and ``pretrained=True``
    without it is an error. For timm models, ``pretrained=True``
    requires ``checkpoint_path`` (the weights file, loaded by timm with its classifier adapted to
    ``num_classes``), so nothing is ever downloaded and nothing hangs offline. Extra keyword arguments go
    to the constructor (e.g. ``width=``, ``depth=``, ``widen=``, ``in_chans=`` for timm).
    """
    if name in _REGISTRY:
        if pretrained and checkpoint_path is None:
            raise ValueError(
                f"fastadv's {name!r} ships without weights: pass checkpoint_path=<state dict file> "
                "to load trained weights (pretrained=True alone has nothing to load)"
            )
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)
        if checkpoint_path is not None:
            load_weights_strict(model, checkpoint_file(checkpoint_path))
        return model

    model = _create_timm(name, num_classes, pretrained, checkpoint_path, kwargs)
    if model is None:
        try:
            import timm  # noqa: F401

            timm_note = "and timm does not know it either"
        except ImportError:
            timm_note = "and timm, which provides every other name, is not installed"
        raise ValueError(
            f"unknown model {name!r}: fastadv's models are {', '.join(list_models())}, {timm_note}"
        )
    return model
