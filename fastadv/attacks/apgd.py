"""APGD and APGD-T (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020).

One run of ``N = steps`` iterations (``N + 1`` gradient evaluations, at ``x⁽⁰⁾ … x⁽ᴺ⁾``):

* start ``x⁽⁰⁾`` uniformly in the ε-ball (``random_start``), step size ``η = 2ε`` per sample;
* ``x⁽¹⁾ = P(x⁽⁰⁾ + η·sign ∇f(x⁽⁰⁾))`` (L2: ``η·∇f/‖∇f‖``);
* then ``z = P(x⁽ᵏ⁾ + η·sign ∇f(x⁽ᵏ⁾))`` and ``x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α(z − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾))``, ``α = 0.75``;
  ``z`` is one fused ``pgd_step``, the combination is projected by a ``pgd_step`` with a zero step;
* checkpoints ``w_j = ceil(p_j·N)`` with ``p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``
  (:func:`apgd_checkpoints`). At ``w_j`` a sample's step size is halved, and its iterate (and gradient)
  reset to its best point, if

  1. fewer than ``ρ = 75 %`` of the steps since ``w_{j−1}`` increased the loss
     (``#{i ∈ [w_{j−1}, w_j − 1] : f(x⁽ⁱ⁺¹⁾) > f(x⁽ⁱ⁾)} < ρ·(w_j − w_{j−1})``), or
  2. its step size was not halved at ``w_{j−1}`` and its best loss did not improve since then.

Differences from the reference code, on purpose: the count in (1) uses ``f(x⁽¹⁾) > f(x⁽⁰⁾)`` for the first
interval and a strict ``<`` as the paper and SPECS say (the reference compares its first loss with a zero
and uses ``<=``); every decision is a per-sample ``torch.where`` (no host synchronisation in the loop);
samples that are not fooled return their highest-loss point rather than the clean input.

Each sample returns the first adversarial point found, else its highest-loss point. Restarts run only on
the samples not yet adversarial.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from . import _checks
from .base import Attack, bcast
from .losses import check_loss, make_loss


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j · steps)`` at which APGD checks its step size, ``w_0 = 0`` included.

    ``p`` is kept in exact hundredths (``p₁ = 22``, decrement ``3``, minimum gap ``6``) so that no float
    rounding moves a checkpoint. For ``steps = 100``: ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    steps = _checks.integer("apgd_checkpoints", "steps", steps, minimum=1)
    hundredths = [0, 22]
    while True:
        nxt = hundredths[-1] + max(hundredths[-1] - hundredths[-2] - 3, 6)
        if nxt > 100:
            break
        hundredths.append(nxt)
    points = [-(-p * steps // 100) for p in hundredths]
    out: list[int] = []
    for w in points:
        if w <= steps and (not out or w > out[-1]):
            out.append(w)
    return out


class APGD(Attack):
    """Auto-PGD: ``adv = APGD(model, eps=8/255, steps=100, loss="ce")(x, y)``; ``loss`` is ``"ce"``, ``"dlr"``,
    ``"cw"`` or a callable ``(logits, y) -> (B,)`` to maximise. ``record_history=True`` keeps, after each
    call, ``history["loss"]`` and ``history["step_size"]`` of shape ``(steps + 1, B)`` (the step size in row
    ``k`` is the one used for the step from ``x⁽ᵏ⁾``) of the last run."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, steps: int = 100, norm: str = "linf", loss="ce",
                 restarts: int = 1, generator=None, *, rho: float = 0.75, momentum: float = 0.75,
                 random_start: bool = True, record_history: bool = False, amp: str | None = None,
                 channels_last: bool | None = None, fold_bn: bool = True, lo: float = 0.0, hi: float = 1.0) -> None:
        super().__init__(model, eps=eps, norm=norm, generator=generator, amp=amp, channels_last=channels_last,
                         fold_bn=fold_bn, lo=lo, hi=hi)
        owner = type(self).__name__
        self.steps = _checks.integer(owner, "steps", steps, minimum=1)
        self.restarts = _checks.integer(owner, "restarts", restarts, minimum=1)
        check_loss(owner, loss)
        self.loss = loss
        self.rho = _checks.real(owner, "rho", rho, maximum=1.0)
        self.momentum = _checks.real(owner, "momentum", momentum, maximum=1.0)
        self.random_start = bool(random_start)
        self.record_history = bool(record_history)
        self.history: dict[str, Tensor] | None = None
        self.checkpoints = apgd_checkpoints(self.steps)

    def config(self) -> dict:
        return {**super().config(), "steps": self.steps, "restarts": self.restarts,
                "loss": self.loss if isinstance(self.loss, str) else "custom", "rho": self.rho,
                "momentum": self.momentum}

    # ------------------------------------------------------------------ one run

    def _run(self, x: Tensor, y: Tensor, target: Tensor | None, loss_fn) -> tuple[Tensor, Tensor, Tensor]:
        """One APGD run. Returns the per-sample result ``delta``, whether it is adversarial (misclassified)
        and its loss. No host synchronisation."""
        n = x.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        zeros = torch.zeros_like(x)
        delta = self._random_start(x) if self.random_start and self.eps > 0 else torch.zeros_like(x)
        eta = torch.full((n,), 2.0 * self.eps, dtype=acc, device=x.device)

        loss, logits, grad = self._loss_grad(x, delta, y, target, loss_fn)
        found = self._misclassified(logits, y)
        adv_delta, adv_loss = delta.clone(), loss.clone()
        best_delta, best_loss, best_grad = delta.clone(), loss.clone(), grad.clone()
        prev_delta, prev_loss = delta, loss

        checkpoints = set(self.checkpoints[1:])
        last_check = 0
        n_increase = torch.zeros(n, dtype=torch.int32, device=x.device)
        reduced_last = torch.zeros(n, dtype=torch.bool, device=x.device)
        best_at_check = best_loss.clone()
        hist_loss, hist_eta = ([loss], []) if self.record_history else (None, None)

        for k in range(1, self.steps + 1):
            if hist_eta is not None:
                hist_eta.append(eta.clone())
            z = ops.pgd_step(delta, grad, x, eps=self.eps, alpha=eta, norm=self.norm, lo=self.lo, hi=self.hi)
            if k == 1:
                new = z
            else:
                # x + a(z - x) + (1 - a)(x - x_prev), then projected (a zero-size pgd_step).
                combo = delta + self.momentum * (z - delta) + (1.0 - self.momentum) * (delta - prev_delta)
                new = ops.pgd_step_(combo, zeros, x, eps=self.eps, alpha=0.0, norm=self.norm, lo=self.lo,
                                    hi=self.hi)
            prev_delta, delta = delta, new

            loss, logits, grad = self._loss_grad(x, delta, y, target, loss_fn)
            if hist_loss is not None:
                hist_loss.append(loss)
            newly = self._misclassified(logits, y) & ~found
            adv_delta = torch.where(bcast(newly, delta), delta, adv_delta)
            adv_loss = torch.where(newly, loss, adv_loss)
            found = found | newly

            n_increase += (loss > prev_loss).to(torch.int32)
            prev_loss = loss
            improved = loss > best_loss
            best_loss = torch.where(improved, loss, best_loss)
            best_delta = torch.where(bcast(improved, delta), delta, best_delta)
            best_grad = torch.where(bcast(improved, grad), grad, best_grad)

            if k in checkpoints and k < self.steps:
                oscillating = n_increase.to(acc) < self.rho * (k - last_check)
                stalled = ~reduced_last & (best_at_check >= best_loss)
                reduce = oscillating | stalled
                eta = torch.where(reduce, eta * 0.5, eta)
                delta = torch.where(bcast(reduce, delta), best_delta, delta)
                grad = torch.where(bcast(reduce, grad), best_grad, grad)
                reduced_last = reduce
                best_at_check = best_loss.clone()
                n_increase.zero_()
                last_check = k

        if hist_eta is not None:
            hist_eta.append(eta.clone())
            self.history = {"loss": torch.stack(hist_loss), "step_size": torch.stack(hist_eta)}
        out = torch.where(bcast(found, adv_delta), adv_delta, best_delta)
        out_loss = torch.where(found, adv_loss, best_loss)
        return out, found, out_loss

    # ------------------------------------------------------------------ restarts (and targets, in APGDT)

    def _attack(self, x: Tensor, y: Tensor, target: Tensor | None, loss_fn):
        """``restarts`` runs, each after the first only on the samples not yet adversarial. Returns the
        per-sample ``(delta, found, loss)``."""
        state = None
        for _ in range(self.restarts):
            if state is None:
                state = self._run(x, y, target, loss_fn)
                continue
            idx = (~state[1]).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            _merge(state, idx, self._run(x[idx], y[idx], target[idx] if target is not None else None, loss_fn))
        return state

    def _perturb(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        delta, _, _ = self._attack(x, y, None, make_loss(self.loss, targeted=False))
        return self._finish(x, delta)


def _merge(state, idx: Tensor, new) -> None:
    """Fold a run on the not-yet-adversarial samples ``idx`` into ``state`` (in place): a sample takes the
    new point when it is adversarial or has a higher loss."""
    delta, found, best_loss = state
    d, ok, loss = new
    take = ok | (loss > best_loss[idx])
    delta[idx] = torch.where(bcast(take, d), d, delta[idx])
    best_loss[idx] = torch.where(take, loss, best_loss[idx])
    found[idx] = ok


class APGDT(APGD):
    """Targeted APGD as in AutoAttack: for each of the ``n_target_classes`` (default 9) most likely wrong
    classes of the clean input, in order, a targeted-DLR APGD run (``restarts`` each) on the samples not yet
    misclassified. ``attack(x, y, target=t)`` runs only towards the given targets. Needs ≥ 4 classes for DLR."""

    targeted = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, steps: int = 100, norm: str = "linf",
                 loss="dlr", restarts: int = 1, generator=None, *, n_target_classes: int = 9, **kwargs) -> None:
        super().__init__(model, eps=eps, steps=steps, norm=norm, loss=loss, restarts=restarts, generator=generator,
                         **kwargs)
        self.n_target_classes = _checks.integer(type(self).__name__, "n_target_classes", n_target_classes)

    def config(self) -> dict:
        return {**super().config(), "n_target_classes": self.n_target_classes}

    def _perturb(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        loss_fn = make_loss(self.loss, targeted=True)
        if target is not None:
            return self._finish(x, self._attack(x, y, target, loss_fn)[0])
        logits = self._predict_logits(x)
        if self.loss == "dlr" and logits.shape[1] < 4:
            loss_fn(logits, y, y)  # raises the clear "needs at least 4 classes" error
        order = logits.argsort(dim=1, descending=True)
        state = None
        # Targets: the 2nd, 3rd, ... most likely classes of the clean input (the 1st is y for the points
        # AutoAttack passes on).
        for rank in range(1, min(self.n_target_classes, logits.shape[1] - 1) + 1):
            t = order[:, rank]
            if state is None:
                state = self._attack(x, y, t, loss_fn)
                continue
            idx = (~state[1]).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            _merge(state, idx, self._attack(x[idx], y[idx], t[idx], loss_fn))
        return self._finish(x, state[0])
