"""MMA, the minimum-margin attack (Gao et al., ICML 2022; used in PART's evaluation).

For each of the ``k`` (default 3) most likely wrong classes of the clean input it runs a targeted PGD on the
margin loss (CW, ``kappa = 50``, 20 steps), and keeps, per sample, the candidate whose *true-class margin*
``z_y − max_{j≠y} z_j`` is smallest. The ``k`` targeted runs are one PGD call on the batch repeated ``k``
times (one step loop, ``k``-fold batch).

The targeted loss is the CW form ``−clamp(max_{j≠t} z_j − z_t, min=−κ)`` (push the target above every other
class). Gao et al.'s code uses ``z_y − z_t`` (the target against the true class only); the two agree while the
true class is the top logit, i.e. on every point that is still robust, which is all MMA's result depends on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _checks
from .base import Attack
from .pgd import PGD


class MMA(Attack):
    """``MMA(model, eps=8/255, alpha=2/255, steps=20, k=3, kappa=50)``; L∞ or L2."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 20, k: int = 3,
                 kappa: float = 50.0, norm: str = "linf", random_start: bool = True, generator=None,
                 amp: str | None = None, *, channels_last: bool | None = None, fold_bn: bool = True, lo: float = 0.0,
                 hi: float = 1.0) -> None:
        super().__init__(model, eps=eps, norm=norm, generator=generator, amp=amp, channels_last=channels_last,
                         fold_bn=fold_bn, lo=lo, hi=hi)
        self.k = _checks.integer(type(self).__name__, "k", k)
        self.pgd = PGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, loss="cw", random_start=random_start,
                       restarts=1, targeted=True, generator=self.generator, amp=amp, kappa=kappa,
                       channels_last=channels_last, fold_bn=fold_bn, lo=lo, hi=hi)

    def config(self) -> dict:
        return {**super().config(), "alpha": self.pgd.alpha, "steps": self.pgd.steps, "k": self.k,
                "kappa": self.pgd.kappa, "random_start": self.pgd.random_start}

    def with_eps(self, eps: float) -> MMA:
        new = super().with_eps(eps)
        new.pgd = self.pgd.with_eps(eps)
        return new

    def _perturb(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        logits = self._predict_logits(x)
        n_cls = logits.shape[1]
        if n_cls < 2:
            _checks.fail(type(self).__name__, "needs at least 2 classes")
        k = min(self.k, n_cls - 1)
        wrong = logits.scatter(1, y[:, None], float("-inf")).topk(k, dim=1).indices    # (B, k)
        n = x.shape[0]
        xs = x.repeat((k,) + (1,) * (x.dim() - 1))
        ys = y.repeat(k)
        ts = wrong.t().reshape(-1)                      # candidate j of sample i at row j * B + i
        adv = self.pgd(xs, ys, target=ts)
        margins = self._true_margin(self._predict_logits(adv), ys).view(k, n)
        pick = margins.argmin(dim=0)                    # (B,)
        return adv.reshape((k, n) + x.shape[1:])[pick, torch.arange(n, device=x.device)]
