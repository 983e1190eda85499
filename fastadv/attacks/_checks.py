"""Argument checks shared by the attacks: every bad value raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math
import numbers

import torch


def fail(owner: str, msg: str):
    raise ValueError(f"fastadv.attacks.{owner}: {msg}")


def real(owner: str, name: str, value, *, minimum: float = 0.0, allow_zero: bool = True,
         maximum: float | None = None) -> float:
    """A finite real number ``>= minimum`` (``> minimum`` when ``allow_zero`` is false)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            fail(owner, f"`{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        fail(owner, f"`{name}` must be finite, got {value}")
    if value < minimum or (not allow_zero and value == minimum):
        fail(owner, f"`{name}` must be {'>=' if allow_zero else '>'} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        fail(owner, f"`{name}` must be <= {maximum}, got {value}")
    return value


def integer(owner: str, name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(owner, f"`{name}` must be an integer, got {value!r}")
    if value < minimum:
        fail(owner, f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def choice(owner: str, name: str, value, options) -> str:
    if value not in options:
        fail(owner, f"unknown `{name}` {value!r}; expected one of {', '.join(repr(o) for o in options)}")
    return value


def box(owner: str, lo, hi) -> tuple[float, float]:
    lo = real(owner, "lo", lo, minimum=-math.inf)
    hi = real(owner, "hi", hi, minimum=-math.inf)
    if lo > hi:
        fail(owner, f"need `lo` <= `hi`, got lo={lo}, hi={hi}")
    return lo, hi
