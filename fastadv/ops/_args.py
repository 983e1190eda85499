"""Argument normalisation for the public wrappers, and the checks the reference path runs.

The compiled ops check their own arguments in C++ (csrc/frontend.cpp); when the reference ops run instead,
these checks give the same errors, so behaviour on bad input does not depend on the build.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NORMS = ("linf", "l2")
ACTIVATIONS = ("sigmoid", "tanh", "none")
MODES = ("replace", "add")
NORMALIZE = ("canvas", "image")
MAX_DIMS = 6
MAX_NORM_CHANNELS = 16  # the kernels keep mean/std in registers


def split_value(op: str, name: str, v) -> tuple[float, torch.Tensor | None]:
    """A number goes to the op's float argument, a tensor to its tensor argument."""
    if isinstance(v, torch.Tensor):
        return 0.0, v
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return float(v), None
    raise ValueError(f"fastadv.{op}: `{name}` must be a float or a tensor, got {type(v).__name__}")


def pair(op: str, name: str, v) -> list[int]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return [int(v), int(v)]
    if isinstance(v, Sequence) and len(v) == 2 and all(isinstance(i, numbers.Integral) for i in v):
        return [int(v[0]), int(v[1])]
    raise ValueError(f"fastadv.{op}: `{name}` must be an int or an (height, width) pair, got {v!r}")


def float_list(op: str, name: str, v) -> list[float] | None:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().reshape(-1).tolist()
    try:
        return [float(i) for i in v]
    except TypeError:
        raise ValueError(f"fastadv.{op}: `{name}` must be a sequence of floats, got {v!r}") from None


def _fail(op: str, msg: str):
    raise ValueError(f"fastadv.{op}: {msg}")


def check_image(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"`{name}` must be a tensor")
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"`{name}` must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if not 1 <= t.dim() <= MAX_DIMS:
        _fail(op, f"`{name}` must have between 1 and {MAX_DIMS} dimensions (batch first), got {t.dim()}")


def check_like(op: str, name: str, t, ref: torch.Tensor, ref_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"`{name}` must be a tensor")
    if t.shape != ref.shape:
        _fail(op, f"`{name}` must have the shape of `{ref_name}` {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        _fail(op, f"`{name}` must have the dtype of `{ref_name}` ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        _fail(op, f"`{name}` must be on the device of `{ref_name}` ({ref.device}), got {t.device}")


def check_box(op: str, lo: float, hi: float) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        _fail(op, f"need finite `lo` <= `hi`, got lo={lo}, hi={hi}")


def check_norm(op: str, norm: str) -> None:
    if norm not in NORMS:
        _fail(op, f"unknown `norm` {norm!r}; expected 'linf' or 'l2'")


def _broadcastable(t: torch.Tensor, x: torch.Tensor) -> bool:
    if t.dim() > x.dim():
        return False
    return all(a in (1, b) for a, b in zip(reversed(t.shape), reversed(x.shape)))


def check_value(op: str, name: str, scalar: float, t: torch.Tensor | None, x: torch.Tensor, *,
                allow_map: bool, allow_inf: bool) -> None:
    if t is None:
        if math.isnan(scalar) or scalar < 0 or (not allow_inf and math.isinf(scalar)):
            _fail(op, f"`{name}` must be a non-negative {'number' if allow_inf else 'finite number'}, got {scalar}")
        return
    if not t.is_floating_point():
        _fail(op, f"`{name}` tensor must be floating point, got {t.dtype}")
    if t.device != x.device:
        _fail(op, f"`{name}` must be on the device of `x` ({x.device}), got {t.device}")
    per_sample = t.dim() == 1 and t.shape[0] == x.shape[0]
    if not per_sample:
        if not _broadcastable(t, x):
            _fail(op, f"`{name}` of shape {tuple(t.shape)} is neither per-sample ({x.shape[0]},) nor "
                      f"broadcastable to `x` {tuple(x.shape)}")
        batch_only = t.numel() == 1 if t.dim() < x.dim() else all(s == 1 for s in t.shape[1:])
        if not allow_map and not batch_only:
            _fail(op, f"a per-pixel `{name}` is only supported for norm='linf'; give a float or a per-sample "
                      "(B,) tensor")
    if t.device.type == "cpu" and t.numel() and bool(((t < 0) | t.isnan()).any()):
        _fail(op, f"`{name}` must be non-negative and not NaN")


def check_mask(op: str, mask, x: torch.Tensor, eps_high: float, eps_low: float) -> None:
    if not isinstance(mask, torch.Tensor):
        _fail(op, "`mask` must be a tensor")
    if mask.dtype not in (torch.bool, torch.uint8):
        _fail(op, f"`mask` must be bool or uint8, got {mask.dtype}")
    if mask.device != x.device:
        _fail(op, f"`mask` must be on the device of `x` ({x.device}), got {mask.device}")
    if not _broadcastable(mask, x):
        _fail(op, f"`mask` of shape {tuple(mask.shape)} is not broadcastable to `x` {tuple(x.shape)}")
    if not (eps_high >= 0 and eps_low >= 0):
        _fail(op, f"`eps_high` and `eps_low` must be non-negative, got {eps_high} and {eps_low}")


def check_prompt_pad(op, x, prompt, out_size, inner_size, activation, mode, mean, std, normalize) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        _fail(op, f"`x` must be a (B, C, H, W) tensor, got {getattr(x, 'dim', lambda: 0)()} dimensions")
    if x.dtype not in FLOAT_DTYPES:
        _fail(op, f"`x` must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if not isinstance(prompt, torch.Tensor):
        _fail(op, "`prompt` must be a tensor")
    if prompt.dtype != x.dtype:
        _fail(op, f"`prompt` must have the dtype of `x` ({x.dtype}), got {prompt.dtype}")
    if prompt.device != x.device:
        _fail(op, f"`prompt` must be on the device of `x` ({x.device}), got {prompt.device}")
    (oh, ow), (ih, iw) = out_size, inner_size
    if oh <= 0 or ow <= 0:
        _fail(op, f"`out_size` must be positive, got {out_size}")
    if ih <= 0 or iw <= 0:
        _fail(op, f"`inner_size` must be positive, got {inner_size}")
    if ih > oh or iw > ow:
        _fail(op, f"`inner_size` {inner_size} is larger than the canvas `out_size` {out_size}")
    b, c, h, w = x.shape
    if b and (h == 0 or w == 0):
        _fail(op, f"`x` has an empty image, shape {tuple(x.shape)}")
    if tuple(prompt.shape) not in ((c, oh, ow), (1, c, oh, ow)):
        _fail(op, f"`prompt` must have shape (C, H_out, W_out) = ({c}, {oh}, {ow}) or (1, C, H_out, W_out), "
                  f"got {tuple(prompt.shape)}")
    if activation not in ACTIVATIONS:
        _fail(op, f"unknown `activation` {activation!r}; expected 'sigmoid', 'tanh' or 'none'")
    if mode not in MODES:
        _fail(op, f"unknown `mode` {mode!r}; expected 'replace' or 'add'")
    if normalize not in NORMALIZE:
        _fail(op, f"unknown `normalize` {normalize!r}; expected 'canvas' or 'image'")
    if (mean is None) != (std is None):
        _fail(op, "give both `mean` and `std` or neither")
    if mean is not None:
        if len(mean) != c or len(std) != c:
            _fail(op, f"`mean` and `std` need one value per channel ({c}), got {len(mean)} and {len(std)}")
        if c > MAX_NORM_CHANNELS:
            _fail(op, f"normalisation supports at most {MAX_NORM_CHANNELS} channels, got {c}")
        if not all(math.isfinite(m) for m in mean):
            _fail(op, f"`mean` must be finite, got {mean}")
        if not all(math.isfinite(s) and s > 0 for s in std):
            _fail(op, f"`std` must be positive and finite, got {std}")
