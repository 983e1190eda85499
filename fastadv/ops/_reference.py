"""Pure-PyTorch reference versions of every fastadv op.

These define the semantics the C++/CUDA kernels are tested against, and they run whenever the compiled
library is unavailable. They take already-validated arguments (see ``_args.py``): ``eps`` / ``alpha`` are a
Python float, a per-sample tensor of shape ``(B,)`` or a tensor broadcastable to ``x``.
Half-precision inputs are computed in float32 and written back in their own dtype, as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Smallest gradient norm the L2 step divides by: a zero gradient gives a zero step, never NaN.
L2_GRAD_NORM_FLOOR = 1e-12


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_element(v, x: torch.Tensor) -> torch.Tensor | float:
    """A float stays a float; ``(B,)`` becomes ``(B, 1, ..., 1)``; a map is used as it broadcasts."""
    if not isinstance(v, torch.Tensor):
        return float(v)
    v = v.to(acc_dtype(x.dtype))
    if v.dim() == 1 and x.dim() >= 1 and v.shape[0] == x.shape[0]:
        return v.reshape((-1,) + (1,) * (x.dim() - 1))
    return v


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (t.dim() - 1))


def _clip_to_box(d: torch.Tensor, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (x + d).clamp(lo, hi) - x


def pgd_step(delta, grad, x, *, eps, alpha, norm="linf", lo=0.0, hi=1.0):
    acc = acc_dtype(delta.dtype)
    d, g, xf = delta.to(acc), grad.to(acc), x.to(acc)
    eps_e, alpha_e = _per_element(eps, x), _per_element(alpha, x)
    if norm == "linf":
        d = d + alpha_e * g.sign()
        eps_t = torch.as_tensor(eps_e, dtype=acc, device=d.device)
        d = torch.maximum(torch.minimum(d, eps_t), -eps_t)
    else:
        if d.shape[0] == 0 or d.numel() == 0:
            return delta.clone()
        gnorm = _per_sample_norm(g).clamp_min(L2_GRAD_NORM_FLOOR)
        d = d + alpha_e * g / gnorm
        dnorm = _per_sample_norm(d)
        eps_t = torch.as_tensor(eps_e, dtype=acc, device=d.device)
        d = d * torch.where(dnorm > eps_t, eps_t / dnorm, torch.ones_like(dnorm))
    return _clip_to_box(d, xf, lo, hi).to(delta.dtype)


def pgd_step_(delta, grad, x, **kw):
    return delta.copy_(pgd_step(delta, grad, x, **kw))


def masked_pgd_step_(delta, grad, x, mask, *, eps_high, eps_low, alpha, lo=0.0, hi=1.0):
    acc = acc_dtype(delta.dtype)
    eps = torch.where(mask.bool(), torch.tensor(eps_high, dtype=acc, device=x.device),
                      torch.tensor(eps_low, dtype=acc, device=x.device))
    return delta.copy_(pgd_step(delta, grad, x, eps=eps, alpha=alpha, norm="linf", lo=lo, hi=hi))


def random_init(x, *, eps, norm="linf", lo=0.0, hi=1.0, generator=None):
    """Draws exactly the random numbers the kernels draw (same generator calls in the same order)."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    eps_e = _per_element(eps, x)
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=acc)
        d = (2 * u - 1) * eps_e
    else:
        n = torch.randn(x.shape, generator=generator, device=x.device, dtype=acc)
        r = torch.rand(x.shape[:1], generator=generator, device=x.device, dtype=acc)
        if x.numel() == 0:
            return torch.zeros_like(x)
        dim = x[0].numel()
        radius = r.pow(1.0 / dim).reshape((-1,) + (1,) * (x.dim() - 1)) * eps_e
        d = n / _per_sample_norm(n).clamp_min(L2_GRAD_NORM_FLOOR) * radius
    return _clip_to_box(d, xf, lo, hi).to(x.dtype)


_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "none": lambda t: t}


def prompt_offset(out_size, inner_size):
    return ((out_size[0] - inner_size[0] + 1) // 2, (out_size[1] - inner_size[1] + 1) // 2)


def prompt_pad(x, prompt, *, out_size, inner_size, activation="sigmoid", mode="replace",
               mean=None, std=None, normalize="canvas"):
    acc = acc_dtype(x.dtype)
    xf, pf = x.to(acc), prompt.to(acc).reshape(prompt.shape[-3:])
    (oh, ow), (ih, iw) = out_size, inner_size
    top, left = prompt_offset(out_size, inner_size)
    act = _ACTIVATIONS[activation](pf)
    if mean is not None:
        m = torch.tensor(mean, dtype=acc, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=acc, device=x.device).view(1, -1, 1, 1)

    img_size = (ih, iw) if mode == "replace" else (oh, ow)
    img = xf if tuple(xf.shape[-2:]) == img_size else F.interpolate(
        xf, size=img_size, mode="bilinear", align_corners=False)
    if mean is not None and normalize == "image":
        img = (img - m) / s
    if mode == "replace":
        canvas = act.unsqueeze(0).expand(x.shape[0], -1, -1, -1).clone()
        canvas[:, :, top:top + ih, left:left + iw] = img
    else:
        frame = torch.ones(oh, ow, dtype=acc, device=x.device)
        frame[top:top + ih, left:left + iw] = 0
        canvas = img + act * frame
    if mean is not None and normalize == "canvas":
        canvas = (canvas - m) / s
    return canvas.to(x.dtype)
