"""fastadv.ops: fused adversarial-step and visual-prompt ops.

Each function calls the compiled ``torch.ops.fastadv.*`` operator for the tensor's device when it is loaded,
and the pure-PyTorch reference (``fastadv.ops.reference``) otherwise. All image tensors are ``(B, C, ...)``
floats in pixel space ``[lo, hi]``. ``eps`` and ``alpha`` are a float, a per-sample tensor ``(B,)`` or, for
``norm="linf"``, a tensor broadcastable to ``x`` (per-pixel budgets). Half-precision inputs are read and
written in their own dtype with float32 math.

Tensor-valued ``eps``/``alpha`` are checked for negative or NaN entries on the CPU only: on CUDA that check
would synchronise the host every step (validate budgets once, as the attack engine does).
"""

from __future__ import annotations

import torch

from . import _args
from . import _reference as reference
from ._load import has_native, reference_ops, use_native
from ._load import loaded as _loaded

if _loaded:
    from . import _autograd, _meta

    _meta.register()
    _autograd.register()

__all__ = ["pgd_step", "pgd_step_", "masked_pgd_step_", "random_init", "prompt_pad", "has_native",
           "reference", "reference_ops"]


def _check_step(op, delta, grad, x, eps, alpha, norm, lo, hi):
    _args.check_image(op, "x", x)
    _args.check_like(op, "delta", delta, x, "x")
    _args.check_like(op, "grad", grad, x, "x")
    _args.check_box(op, lo, hi)
    _args.check_norm(op, norm)
    _args.check_value(op, "eps", *eps, x, allow_map=norm == "linf", allow_inf=True)
    _args.check_value(op, "alpha", *alpha, x, allow_map=norm == "linf", allow_inf=False)


def pgd_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, *, eps, alpha, norm: str = "linf",
             lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """One projected ascent step; returns the new perturbation.

    ``linf``: ``d = clip(delta + alpha * sign(grad), -eps, eps)``. ``l2``: ``d = delta + alpha * grad / |grad|``
    (per sample), scaled back into the ball ``|d| <= eps``. Both then keep ``x + d`` inside ``[lo, hi]``.
    """
    e, a = _args.split_value("pgd_step", "eps", eps), _args.split_value("pgd_step", "alpha", alpha)
    if isinstance(x, torch.Tensor) and use_native(x):
        return torch.ops.fastadv.pgd_step(delta, grad, x, e[0], a[0], e[1], a[1], norm, lo, hi)
    _check_step("pgd_step", delta, grad, x, e, a, norm, lo, hi)
    return reference.pgd_step(delta, grad, x, eps=eps, alpha=alpha, norm=norm, lo=lo, hi=hi)


def pgd_step_(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, *, eps, alpha, norm: str = "linf",
              lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """:func:`pgd_step` in place on ``delta``; returns ``delta``."""
    e, a = _args.split_value("pgd_step_", "eps", eps), _args.split_value("pgd_step_", "alpha", alpha)
    if isinstance(x, torch.Tensor) and use_native(x):
        torch.ops.fastadv.pgd_step_(delta, grad, x, e[0], a[0], e[1], a[1], norm, lo, hi)
        return delta
    _check_step("pgd_step_", delta, grad, x, e, a, norm, lo, hi)
    return reference.pgd_step_(delta, grad, x, eps=eps, alpha=alpha, norm=norm, lo=lo, hi=hi)


def masked_pgd_step_(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, *,
                     eps_high: float, eps_low: float, alpha, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """PART's pixel-reweighted L-inf step in place: budget ``eps_high`` where ``mask`` is set, ``eps_low``
    elsewhere. ``mask`` is a compact bool/uint8 tensor broadcastable to ``x``; no float budget map is built."""
    op = "masked_pgd_step_"
    a = _args.split_value(op, "alpha", alpha)
    eh = _args.split_value(op, "eps_high", eps_high)[0] if not isinstance(eps_high, torch.Tensor) else None
    el = _args.split_value(op, "eps_low", eps_low)[0] if not isinstance(eps_low, torch.Tensor) else None
    if eh is None or el is None:
        raise ValueError(f"fastadv.{op}: `eps_high` and `eps_low` must be floats")
    if isinstance(x, torch.Tensor) and use_native(x):
        torch.ops.fastadv.masked_pgd_step_(delta, grad, x, mask, eh, el, a[0], a[1], lo, hi)
        return delta
    _check_step(op, delta, grad, x, (eh, None), a, "linf", lo, hi)
    _args.check_mask(op, mask, x, eh, el)
    return reference.masked_pgd_step_(delta, grad, x, mask, eps_high=eh, eps_low=el, alpha=alpha, lo=lo, hi=hi)


def random_init(x: torch.Tensor, *, eps, norm: str = "linf", lo: float = 0.0, hi: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A random start inside the ball (uniform for linf, uniform in the ball for l2), clipped to ``[lo, hi]``.
    Draws its random numbers from ``generator`` (or the default generator of ``x``'s device)."""
    e = _args.split_value("random_init", "eps", eps)
    if isinstance(x, torch.Tensor) and use_native(x):
        return torch.ops.fastadv.random_init(x, e[0], e[1], norm, lo, hi, generator)
    _args.check_image("random_init", "x", x)
    _args.check_box("random_init", lo, hi)
    _args.check_norm("random_init", norm)
    _args.check_value("random_init", "eps", *e, x, allow_map=norm == "linf", allow_inf=False)
    return reference.random_init(x, eps=eps, norm=norm, lo=lo, hi=hi, generator=generator)


def prompt_pad(x: torch.Tensor, prompt: torch.Tensor, *, out_size, inner_size, activation: str = "sigmoid",
               mode: str = "replace", mean=None, std=None, normalize: str = "canvas") -> torch.Tensor:
    """Batched visual-prompt padding, differentiable w.r.t. ``x`` and ``prompt``.

    ``mode="replace"`` (ILM-VP, TARP-VP): ``x`` is resized bilinearly to ``inner_size`` and placed at offset
    ``(out_size - inner_size + 1) // 2`` of the canvas; the rest of the canvas is ``activation(prompt)``.
    ``mode="add"`` (Bahng et al.): ``x`` is resized to fill the canvas and ``activation(prompt)`` is added on the
    frame outside the centred ``inner_size`` window. ``mean``/``std`` normalise the whole canvas
    (``normalize="canvas"``) or only the image before the prompt is combined with it (``"image"``).
    ``prompt`` has shape ``(C, H_out, W_out)`` (or with a leading 1); sizes are ints or (height, width) pairs.
    """
    op = "prompt_pad"
    out_size, inner_size = _args.pair(op, "out_size", out_size), _args.pair(op, "inner_size", inner_size)
    mean, std = _args.float_list(op, "mean", mean), _args.float_list(op, "std", std)
    if isinstance(x, torch.Tensor) and use_native(x):
        return torch.ops.fastadv.prompt_pad(x, prompt, out_size, inner_size, activation, mode, mean, std, normalize)
    _args.check_prompt_pad(op, x, prompt, out_size, inner_size, activation, mode, mean, std, normalize)
    return reference.prompt_pad(x, prompt, out_size=out_size, inner_size=inner_size, activation=activation,
                                mode=mode, mean=mean, std=std, normalize=normalize)
