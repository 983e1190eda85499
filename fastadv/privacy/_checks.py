"""Argument checks shared by the membership-inference modules.

Every check raises ``ValueError`` whose message starts with the argument's name, so that a user who
passes the wrong thing learns *which* thing was wrong.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def as_tensor(x, name: str) -> torch.Tensor:
    """``x`` as a tensor (lists and numpy arrays are converted; tensors are returned as they are)."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a tensor or array-like of numbers, got {type(x).__name__}") from exc


def score_vector(x, name: str) -> torch.Tensor:
    """A non-empty 1-D real score vector without NaN (±inf allowed).

    Booleans and integers become float64 (exact); half types become float32 (exact); float32 and
    float64 are kept as they are so that thresholds are reported in the caller's values.
    """
    x = as_tensor(x, name)
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one score per example), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: at least one score is needed")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    elif x.dtype in _HALF_DTYPES:
        x = x.to(torch.float32)
    nan = torch.isnan(x)
    if bool(nan.any()):
        first = int(nan.nonzero()[0, 0])
        raise ValueError(
            f"{name} contains {int(nan.sum())} NaN score(s) (first at index {first}); "
            "NaN cannot be ranked (±inf is allowed)"
        )
    return x


def same_device(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"arguments must be on one device: {listing}")


def fpr_levels(fpr, name: str = "fpr") -> tuple[float, ...]:
    """A tuple of false-positive-rate levels, each strictly inside (0, 1)."""
    if isinstance(fpr, (int, float)):
        levels: Iterable = (fpr,)
    elif isinstance(fpr, torch.Tensor):
        levels = fpr.reshape(-1).tolist()
    else:
        levels = fpr
    out = []
    for level in levels:
        try:
            value = float(level)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} levels must be numbers, got {level!r}") from exc
        if not (0.0 < value < 1.0) or math.isnan(value):
            raise ValueError(f"{name} levels must lie strictly inside (0, 1), got {level!r}")
        out.append(value)
    return tuple(out)


def label_vector(y, name: str, n: int, device: torch.device, num_classes: int | None = None) -> torch.Tensor:
    """A 1-D int64 label vector of length ``n`` on ``device`` with values in ``[0, num_classes)``."""
    y = as_tensor(y, name)
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(y.shape)}")
    if y.numel() != n:
        raise ValueError(f"{name} has {y.numel()} entries but the matching scores/logits have {n}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the matching scores/logits are on {device}")
    y = y.to(torch.int64)
    if n:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
            raise ValueError(f"{name} must lie in {bound}, got values in [{lo}, {hi}]")
    return y
