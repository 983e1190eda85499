"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020) as AutoAttack runs it.

FAB looks for the *smallest* perturbation that changes the decision. For a target class ``t`` it
linearises ``f = z_t − z_y`` at the current iterate ``x¹`` and projects both ``x¹`` and the original point
``x⁰`` onto the hyperplane ``f(x¹) + ⟨∇f(x¹), u − x¹⟩ = 0`` intersected with the pixel box (minimal Lp
distance; :func:`project_to_hyperplane`). With ``d¹``, ``d⁰`` those projections' offsets it moves to

    ``x¹ ← clip((1 − a)(x¹ + η·d¹) + a(x⁰ + η·d⁰))``, ``a = min(‖d¹‖ / (‖d¹‖ + ‖d⁰‖), α_max)``

(overshoot ``η = 1.05``, ``α_max = 0.1``). When ``x¹`` is misclassified it is recorded if it is the closest
so far and pulled back towards ``x⁰``: ``x¹ ← x⁰ + β(x¹ − x⁰)``, ``β = 0.9``. The first run starts at ``x⁰``,
later restarts at a uniformly random point within half the distance of the best point found (capped at ``ε``).

As in AutoAttack, the attack succeeds on a sample when its closest adversarial point lies within ``eps``;
those samples return it, the others return ``x``. ``eps=None`` returns every sample's closest adversarial
point whatever its size. ``last_min_norm`` holds the per-sample size of the closest adversarial point
found by the last call (``inf`` where none).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _checks
from .base import Attack, bcast, flat_norm

# Floor of denominators in the hyperplane projections (a zero gradient gives a zero or box-bound step).
_TINY = 1e-12


def project_to_hyperplane(p: Tensor, w: Tensor, c: Tensor, norm: str, lo: float, hi: float) -> Tensor:
    """Offsets ``d`` of minimal Lp norm (``linf`` or ``l2``) with ``⟨w, d⟩ = c`` and ``lo ≤ p + d ≤ hi``, row by
    row for ``p, w`` of shape ``(N, D)`` and ``c`` of shape ``(N,)``. Where the box makes the plane
    unreachable, ``d`` is the box corner that gets closest to it.

    Both cases reduce, after flipping the sign of ``w`` and ``c`` so that ``c ≥ 0``, to a one-dimensional
    monotone search over the sorted breakpoints at which coordinates hit the box:
    L∞ — ``d_i = sign(w_i)·min(r, room_i)``, the smallest radius ``r`` with ``Σ|w_i| min(r, room_i) = c``;
    L2 — ``d_i = sign(w_i)·min(λ|w_i|, room_i)`` (the KKT point), the smallest ``λ`` with
    ``Σ|w_i| min(λ|w_i|, room_i) = c``. ``room_i`` is the distance to the box face in the direction of ``w_i``.
    """
    flip = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w = w * flip[:, None]
    c = c * flip
    a = w.abs()
    room = torch.where(w > 0, hi - p, p - lo).clamp_min(0.0)
    n_dims = w.shape[1]
    if norm == "linf":
        keys, weights, values = room, a, a * room        # g(r) = Σ a·min(r, room)
    else:
        keys = torch.where(a > 0, room / a.clamp_min(_TINY), torch.full_like(room, float("inf")))
        weights, values = a * a, a * room                # h(λ) = Σ a·min(λ a, room)
    keys_sorted, order = keys.sort(dim=1)
    cum_values = values.gather(1, order).cumsum(dim=1)
    cum_weights = weights.gather(1, order).cumsum(dim=1)
    total = cum_weights[:, -1:]
    remaining = total - cum_weights
    # The function at each breakpoint (coordinates up to k saturated, the rest growing with the radius).
    finite_keys = torch.where(torch.isinf(keys_sorted), torch.zeros_like(keys_sorted), keys_sorted)
    at_break = cum_values + torch.where(remaining > 0, finite_keys * remaining, torch.zeros_like(remaining))
    k = (at_break < c[:, None]).sum(dim=1, keepdim=True)            # first breakpoint reaching c
    k_prev = (k - 1).clamp_min(0)
    done_values = torch.where(k > 0, cum_values.gather(1, k_prev), torch.zeros_like(k_prev, dtype=w.dtype))
    done_weights = torch.where(k > 0, cum_weights.gather(1, k_prev), torch.zeros_like(k_prev, dtype=w.dtype))
    free = (total - done_weights).clamp_min(_TINY)
    radius = ((c[:, None] - done_values) / free).clamp_min(0.0)
    radius = torch.where(k >= n_dims, torch.full_like(radius, float("inf")), radius)
    if norm == "linf":
        step = torch.minimum(radius.expand_as(room), room)
    else:
        step = torch.where(a > 0, torch.minimum(radius * a, room), torch.zeros_like(room))
    return torch.sign(w) * step


class FAB(Attack):
    """Targeted FAB (FAB-T). ``FAB(model, eps=8/255, norm="linf", steps=100, n_target_classes=9, restarts=1)``:
    for each of the ``n_target_classes`` most likely wrong classes, in order, a FAB run of ``steps``
    iterations towards it on the samples not yet fooled within ``eps``. ``attack(x, y, target=t)`` runs only
    towards the given targets."""

    targeted = True

    def __init__(self, model: nn.Module, eps: float | None = 8 / 255, norm: str = "linf", steps: int = 100,
                 n_target_classes: int = 9, restarts: int = 1, generator=None, *, alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9, amp: str | None = None, channels_last: bool | None = None,
                 fold_bn: bool = True, lo: float = 0.0, hi: float = 1.0) -> None:
        self.unbounded = eps is None
        super().__init__(model, eps=0.0 if eps is None else eps, norm=norm, generator=generator, amp=amp,
                         channels_last=channels_last, fold_bn=fold_bn, lo=lo, hi=hi)
        owner = type(self).__name__
        self.steps = _checks.integer(owner, "steps", steps, minimum=1)
        self.n_target_classes = _checks.integer(owner, "n_target_classes", n_target_classes)
        self.restarts = _checks.integer(owner, "restarts", restarts)
        self.alpha_max = _checks.real(owner, "alpha_max", alpha_max, maximum=1.0)
        self.eta = _checks.real(owner, "eta", eta, allow_zero=False)
        self.beta = _checks.real(owner, "beta", beta, maximum=1.0)
        self.last_min_norm: Tensor | None = None

    def config(self) -> dict:
        return {**super().config(), "eps": None if self.unbounded else self.eps, "steps": self.steps,
                "n_target_classes": self.n_target_classes, "restarts": self.restarts,
                "alpha_max": self.alpha_max, "eta": self.eta, "beta": self.beta}

    def with_eps(self, eps: float) -> FAB:
        new = super().with_eps(eps)
        new.unbounded = False
        return new

    # ------------------------------------------------------------------ one run

    def _boundary_and_grad(self, x1: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``f = z_t − z_y`` at ``x1`` and its input gradient."""
        def diff(logits, y_, t_):
            return logits.gather(1, t_[:, None]).squeeze(1) - logits.gather(1, y_[:, None]).squeeze(1)

        f, _, g = self._loss_grad(x1, torch.zeros_like(x1), y, t, diff)
        return f, g

    def _run(self, x0: Tensor, y: Tensor, t: Tensor, start: Tensor | None) -> tuple[Tensor, Tensor]:
        """One FAB run towards ``t``. Returns the closest adversarial offset found and its norm (``inf`` if
        none). No host synchronisation."""
        n = x0.shape[0]
        flat0 = x0.reshape(n, -1).to(torch.float32)
        x1 = x0.clone() if start is None else x0 + start
        best_norm = torch.full((n,), float("inf"), dtype=torch.float32, device=x0.device)
        best = torch.zeros_like(x0)
        for _ in range(self.steps):
            f, g = self._boundary_and_grad(x1, y, t)
            w = g.reshape(n, -1).to(torch.float32)
            flat1 = x1.reshape(n, -1).to(torch.float32)
            f = f.to(torch.float32)
            # One projection call for both base points: x1 (c = −f) and x0 (c = −f − ⟨w, x0 − x1⟩).
            c1 = -f
            c0 = -f - (w * (flat0 - flat1)).sum(dim=1)
            d = project_to_hyperplane(torch.cat([flat1, flat0]), torch.cat([w, w]),
                                      torch.cat([c1, c0]), self.norm, self.lo, self.hi)
            d1, d0 = d[:n], d[n:]
            n1, n0 = flat_norm(d1, self.norm), flat_norm(d0, self.norm)
            a = (n1 / (n1 + n0).clamp_min(_TINY)).clamp(0.0, self.alpha_max)[:, None]
            moved = ((1 - a) * (flat1 + self.eta * d1) + a * (flat0 + self.eta * d0)).clamp(self.lo, self.hi)
            moved = moved.to(x0.dtype).reshape(x0.shape)
            fooled = self._misclassified(self._predict_logits(moved), y)
            size = flat_norm((moved - x0).to(torch.float32), self.norm)
            closer = fooled & (size < best_norm)
            best = torch.where(bcast(closer, best), moved - x0, best)
            best_norm = torch.where(closer, size, best_norm)
            x1 = torch.where(bcast(fooled, moved), x0 + self.beta * (moved - x0), moved)
        return best, best_norm

    def _attack_target(self, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        best, best_norm = self._run(x, y, t, None)
        for _ in range(1, self.restarts):
            # Half the distance of the best point so far, capped at eps (at the box size when unbounded).
            cap = (self.hi - self.lo) if self.unbounded else self.eps
            radius = 0.5 * best_norm.clamp(max=cap)
            radius = radius.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
            start = self._random_start(x, eps=radius)
            d, dn = self._run(x, y, t, start)
            closer = dn < best_norm
            best = torch.where(bcast(closer, best), d, best)
            best_norm = torch.where(closer, dn, best_norm)
        return best, best_norm

    def _solved(self, norms: Tensor) -> Tensor:
        if self.unbounded:
            return torch.isfinite(norms)
        return norms <= self.eps

    def _perturb(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if target is not None:
            best, best_norm = self._attack_target(x, y, target)
        else:
            logits = self._predict_logits(x)
            order = logits.argsort(dim=1, descending=True)
            best, best_norm = None, None
            for rank in range(1, min(self.n_target_classes, logits.shape[1] - 1) + 1):
                t = order[:, rank]
                if best is None:
                    best, best_norm = self._attack_target(x, y, t)
                    continue
                idx = (~self._solved(best_norm)).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                d, dn = self._attack_target(x[idx], y[idx], t[idx])
                closer = dn < best_norm[idx]
                best[idx] = torch.where(bcast(closer, d), d, best[idx])
                best_norm[idx] = torch.where(closer, dn, best_norm[idx])
            if best is None:  # a single class: nothing to target
                best, best_norm = torch.zeros_like(x), torch.full(x.shape[:1], float("inf"), device=x.device)
        self.last_min_norm = best_norm
        keep = self._solved(best_norm)
        delta = torch.where(bcast(keep, best), best, torch.zeros_like(best))
        if self.unbounded:
            return self._finish(x, delta)
        # Final projection into the ε-ball and the box (only rounding can move a kept point).
        return self._finish(x, self._project(delta, x))
