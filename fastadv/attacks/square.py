"""Square Attack (Andriushchenko et al., ECCV 2020): score-based random search, L∞ and L2, untargeted.

Only the model's outputs are used (no gradients). The objective is the margin ``z_y − max_{j≠y} z_j``; a
proposal is kept for a sample when it lowers that sample's margin, and a sample stops changing once its
margin is negative. ``n_queries`` counts model evaluations per sample, the initial point included.

The square side follows ``p``, the fraction of pixels changed: ``p_init`` halved after iterations 10, 50,
200, 500, 1000, 2000, 4000, 6000 and 8000 (:func:`square_fraction`; ``rescale_schedule=True`` stretches that
schedule to ``n_queries`` as if it were 10 000 — AutoAttack runs with it off).

* L∞: start from vertical stripes ``x ± ε`` (one random sign per column and channel); each proposal sets a
  random ``s×s`` window (``s = round(√(p·H·W))``) to ``x ± ε`` with one random sign per channel — if that
  changes nothing the opposite signs are used.
* L2: start from a grid of ``±`` "pseudo-Gaussian" blocks scaled to norm ``ε``; each proposal takes a random
  odd-sized window, adds a fresh ``±`` pseudo-Gaussian pattern to its normalised content, moves the mass of a
  second random window into it, and rescales the whole perturbation to norm ``ε``.

Every proposal ends in the ε-ball and the pixel box through a zero-size :func:`fastadv.ops.pgd_step`.
Windows are drawn per sample and the loop never synchronises with the host: a sample that is already fooled
still gets evaluated but never changes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _checks
from .base import Attack, bcast

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, it: int, n_queries: int = 10000, rescale: bool = False) -> float:
    """The fraction of pixels a proposal changes at iteration ``it``: ``p_init`` halved once for each of the
    iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 already passed."""
    if rescale:
        it = int(it / n_queries * 10000)
    return p_init / 2 ** sum(it > h for h in _HALVINGS)


def _rings(rows: int, cols: int, device) -> Tensor:
    """Concentric-square weights centred at ``(rows // 2, cols // 2)``: ring ``k`` (Chebyshev distance ``k``)
    gets ``Σ_{j ≥ k} 1 / (j + 1)²``, so the pattern peaks at the centre and decays outwards."""
    n = max(rows // 2 + 1, cols // 2 + 1)
    weights = 1.0 / torch.arange(1, n + 1, device=device, dtype=torch.float32) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)
    r = (torch.arange(rows, device=device) - rows // 2).abs()
    c = (torch.arange(cols, device=device) - cols // 2).abs()
    dist = torch.maximum(r[:, None], c[None, :])
    out = tail[dist]
    return out / out.norm()


def pseudo_gaussian(s: int, device) -> Tensor:
    """An ``s×s`` pattern of unit L2 norm: a positive ring pattern on the top half, a negative one below."""
    top = s // 2
    pattern = torch.cat([_rings(top, s, device) if top else torch.zeros(0, s, device=device),
                         -_rings(s - top, s, device)])
    return pattern / pattern.norm()


def _window(pattern: Tensor, top: Tensor, left: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Per-sample placement of ``pattern`` (``(B, s, s)`` or ``(s, s)``) at ``(top, left)`` in an ``h×w``
    image: returns the placed values ``(B, 1, h, w)`` and the window mask ``(B, 1, h, w)``."""
    s = pattern.shape[-1]
    n = top.shape[0]
    ri = torch.arange(h, device=top.device)[None, :] - top[:, None]
    ci = torch.arange(w, device=top.device)[None, :] - left[:, None]
    mask = ((ri >= 0) & (ri < s))[:, :, None] & ((ci >= 0) & (ci < s))[:, None, :]
    if pattern.dim() == 2:
        pattern = pattern.expand(n, s, s)
    batch = torch.arange(n, device=top.device)[:, None, None]
    vals = pattern[batch, ri.clamp(0, s - 1)[:, :, None], ci.clamp(0, s - 1)[:, None, :]]
    return (vals * mask)[:, None], mask[:, None]


class Square(Attack):
    """``Square(model, eps=8/255, norm="linf", n_queries=5000, p_init=0.8)``; untargeted."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, norm: str = "linf", n_queries: int = 5000,
                 p_init: float = 0.8, restarts: int = 1, generator=None, *, rescale_schedule: bool = False,
                 amp: str | None = None, channels_last: bool | None = None,
                 fold_bn: bool = True, lo: float = 0.0, hi: float = 1.0) -> None:
        super().__init__(model, eps=eps, norm=norm, generator=generator, amp=amp, channels_last=channels_last,
                         fold_bn=fold_bn, lo=lo, hi=hi)
        owner = type(self).__name__
        self.n_queries = _checks.integer(owner, "n_queries", n_queries)
        self.p_init = _checks.real(owner, "p_init", p_init, allow_zero=False, maximum=1.0)
        self.restarts = _checks.integer(owner, "restarts", restarts)
        self.rescale_schedule = bool(rescale_schedule)

    def config(self) -> dict:
        return {**super().config(), "n_queries": self.n_queries, "p_init": self.p_init, "restarts": self.restarts,
                "rescale_schedule": self.rescale_schedule}

    def _margin(self, x: Tensor, delta: Tensor, y: Tensor) -> Tensor:
        return self._true_margin(self._predict_logits(x + delta), y)

    def _signs(self, shape, g: torch.Generator, device, dtype) -> Tensor:
        return (torch.randint(0, 2, shape, generator=g, device=device) * 2 - 1).to(dtype)

    def _fraction(self, it: int) -> float:
        return square_fraction(self.p_init, it, self.n_queries, self.rescale_schedule)

    # ------------------------------------------------------------------ L∞

    def _init_linf(self, x: Tensor, g) -> Tensor:
        n, c, _, w = x.shape
        return self._project(self.eps * self._signs((n, c, 1, w), g, x.device, x.dtype).expand_as(x).clone(), x)

    def _propose_linf(self, x: Tensor, delta: Tensor, it: int, g) -> Tensor:
        n, c, h, w = x.shape
        s = min(max(int(round(math.sqrt(self._fraction(it) * h * w))), 1), max(min(h, w) - 1, 1))
        top = torch.randint(0, h - s + 1, (n,), generator=g, device=x.device)
        left = torch.randint(0, w - s + 1, (n,), generator=g, device=x.device)
        _, mask = _window(torch.ones(s, s, device=x.device), top, left, h, w)
        signs = self.eps * self._signs((n, c, 1, 1), g, x.device, x.dtype)
        cand = self._project(torch.where(mask, signs, delta), x)
        unchanged = ((cand - delta).abs() * mask).flatten(1).amax(dim=1) < 1e-7
        flipped = self._project(torch.where(mask, -signs, delta), x)
        return torch.where(bcast(unchanged, cand), flipped, cand)

    # ------------------------------------------------------------------ L2

    def _init_l2(self, x: Tensor, g) -> Tensor:
        n, c, h, w = x.shape
        s = max(h // 5, 1)
        offset = (h - s * 5) // 2 if h >= 5 else 0
        block = pseudo_gaussian(s, x.device).to(x.dtype)
        delta = torch.zeros_like(x)
        for i in range(offset, h - s + 1, s):
            for j in range(offset, w - s + 1, s):
                delta[:, :, i:i + s, j:j + s] += block * self._signs((n, c, 1, 1), g, x.device, x.dtype)
        return self._rescale_l2(delta, x)

    def _rescale_l2(self, delta: Tensor, x: Tensor) -> Tensor:
        """``eps · delta / ‖delta‖`` (per sample), then into the box via the op."""
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return self._project(delta * bcast(self.eps / norms, delta), x)

    def _propose_l2(self, x: Tensor, delta: Tensor, it: int, g) -> Tensor:
        n, c, h, w = x.shape
        s = max(int(round(math.sqrt(self._fraction(it) * h * w))), 3)
        if s % 2 == 0:
            s += 1
        s = min(s, h, w)
        top1 = torch.randint(0, h - s + 1, (n,), generator=g, device=x.device)
        left1 = torch.randint(0, w - s + 1, (n,), generator=g, device=x.device)
        top2 = torch.randint(0, h - s + 1, (n,), generator=g, device=x.device)
        left2 = torch.randint(0, w - s + 1, (n,), generator=g, device=x.device)
        base = pseudo_gaussian(s, x.device)
        transpose = torch.rand(n, generator=g, device=x.device) < 0.5
        patterns = torch.where(transpose[:, None, None], base.t()[None], base[None]).to(x.dtype)
        placed, m1 = _window(patterns, top1, left1, h, w)
        _, m2 = _window(base, top2, left2, h, w)
        union = m1 | m2
        sq = delta * delta
        norm_w1 = (sq * m1).sum(dim=(2, 3), keepdim=True).sqrt()
        norm_union = (sq * union).sum(dim=(2, 3), keepdim=True).sqrt()
        norm_img = sq.flatten(1).sum(dim=1).sqrt()
        fresh = m1 * (placed * self._signs((n, c, 1, 1), g, x.device, x.dtype) + delta / (norm_w1 + 1e-12))
        fresh_norm = fresh.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
        budget = ((self.eps ** 2 - norm_img ** 2).clamp_min(0.0) / c)
        target_norm = (bcast(budget, fresh) + norm_union ** 2).sqrt()
        fresh = fresh / (fresh_norm + 1e-12) * target_norm
        return self._rescale_l2(delta * ~union + fresh, x)

    # ------------------------------------------------------------------ search

    def _search(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4:
            _checks.fail(type(self).__name__, f"needs (B, C, H, W) images, got shape {tuple(x.shape)}")
        g = self._generator_for(x.device)
        init, propose = (self._init_linf, self._propose_linf) if self.norm == "linf" else \
            (self._init_l2, self._propose_l2)
        delta = init(x, g)
        best = self._margin(x, delta, y)
        for it in range(1, self.n_queries):
            cand = propose(x, delta, it, g)
            m = self._margin(x, cand, y)
            better = (m < best) & (best >= 0)
            delta = torch.where(bcast(better, delta), cand, delta)
            best = torch.where(better, m, best)
        return delta, best

    def _perturb(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        delta, best = self._search(x, y)
        for _ in range(1, self.restarts):
            idx = (best >= 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            d, m = self._search(x[idx], y[idx])
            better = m < best[idx]
            delta[idx] = torch.where(bcast(better, d), d, delta[idx])
            best[idx] = torch.where(better, m, best[idx])
        return self._finish(x, delta)
