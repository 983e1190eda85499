"""AutoAttack (Croce & Hein, ICML 2020), the "standard" protocol, with per-attack robust accuracy.

``version="standard"`` runs, each attack only on the points that are still robust:

1. APGD-CE — 100 iterations, no restart;
2. APGD-T — targeted DLR, 9 target classes, 100 iterations each;
3. FAB-T — 9 target classes, 100 iterations each;
4. Square — 5000 queries, ``p_init = 0.8``.

These are the paper's settings (a peer library runs APGD/FAB with 10 iterations by default; fastadv does
not). ``version="custom"`` runs the attacks named in ``attacks`` (any of ``"apgd-ce"``, ``"apgd-dlr"``,
``"apgd-t"``, ``"fab-t"``, ``"square"``) in the given order; the iteration counts are parameters for quick
runs, and every number should be reported with :meth:`AutoAttack.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import _checks
from .apgd import APGD, APGDT
from .base import Attack, attack_mode, flat_norm, input_layout
from .fab import FAB
from .square import Square

VERSIONS = ("standard", "custom")
STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
KNOWN = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")


@dataclass
class AutoAttackResult:
    """``x_adv``: the adversarial batch; ``clean_accuracy``; ``robust_accuracy``: attack name → robust
    accuracy after that attack (cumulative, so non-increasing in order); ``robust_after``: attack name →
    per-sample bool mask of the points still robust after it; ``robust``: the final mask;
    ``max_perturbation``: the largest perturbation norm in ``x_adv`` (AutoAttack's final check)."""

    x_adv: Tensor
    clean_accuracy: float
    robust_accuracy: dict[str, float] = field(default_factory=dict)
    robust_after: dict[str, Tensor] = field(default_factory=dict)
    robust: Tensor | None = None
    max_perturbation: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return list(self.robust_accuracy.values())[-1] if self.robust_accuracy else self.clean_accuracy


class AutoAttack(Attack):
    """``AutoAttack(model, norm="linf", eps=8/255, version="standard")``. Calling it returns the adversarial
    batch; :meth:`run` returns an :class:`AutoAttackResult` with the per-attack robust accuracies (also kept in
    ``last_result``)."""

    def __init__(self, model: nn.Module, norm: str = "linf", eps: float = 8 / 255, version: str = "standard", *,
                 attacks=None, generator=None, apgd_steps: int = 100, n_target_classes: int = 9,
                 fab_steps: int = 100, square_queries: int = 5000, square_p_init: float = 0.8,
                 amp: str | None = None, channels_last: bool | None = None,
                 fold_bn: bool = True, lo: float = 0.0, hi: float = 1.0) -> None:
        super().__init__(model, eps=eps, norm=norm, generator=generator, amp=amp, channels_last=channels_last,
                         fold_bn=fold_bn, lo=lo, hi=hi)
        owner = type(self).__name__
        self.version = _checks.choice(owner, "version", version, VERSIONS)
        if version == "standard":
            if attacks is not None:
                _checks.fail(owner, "`attacks` is only for version='custom'")
            names = STANDARD
        else:
            if not attacks:
                _checks.fail(owner, "version='custom' needs `attacks`, a list of attack names")
            names = tuple(attacks)
            for a in names:
                _checks.choice(owner, "attacks", a, KNOWN)
        common = dict(generator=self.generator, amp=amp, channels_last=channels_last, fold_bn=fold_bn, lo=lo, hi=hi)
        build = {
            "apgd-ce": lambda: APGD(model, eps=eps, steps=apgd_steps, norm=norm, loss="ce", restarts=1, **common),
            "apgd-dlr": lambda: APGD(model, eps=eps, steps=apgd_steps, norm=norm, loss="dlr", restarts=1, **common),
            "apgd-t": lambda: APGDT(model, eps=eps, steps=apgd_steps, norm=norm, restarts=1,
                                    n_target_classes=n_target_classes, **common),
            "fab-t": lambda: FAB(model, eps=eps, norm=norm, steps=fab_steps, n_target_classes=n_target_classes,
                                 restarts=1, **common),
            "square": lambda: Square(model, eps=eps, norm=norm, n_queries=square_queries, p_init=square_p_init,
                                     restarts=1, **common),
        }
        self.attacks: dict[str, Attack] = {name: build[name]() for name in names}
        self.last_result: AutoAttackResult | None = None

    def config(self) -> dict:
        return {**super().config(), "version": self.version,
                "attacks": {name: a.config() for name, a in self.attacks.items()}}

    def with_eps(self, eps: float) -> AutoAttack:
        new = super().with_eps(eps)
        new.attacks = {name: a.with_eps(eps) for name, a in self.attacks.items()}
        return new

    def run(self, x: Tensor, y: Tensor) -> AutoAttackResult:
        layout = input_layout(x) if isinstance(x, torch.Tensor) else torch.contiguous_format
        x, y, _ = self._check_inputs(x, y, None)
        if x.shape[0] == 0:
            result = AutoAttackResult(x_adv=x.clone(), clean_accuracy=0.0,
                                      robust_accuracy={name: 0.0 for name in self.attacks},
                                      robust_after={name: torch.zeros(0, dtype=torch.bool, device=x.device)
                                                    for name in self.attacks},
                                      robust=torch.zeros(0, dtype=torch.bool, device=x.device))
            self.last_result = result
            return result
        with attack_mode(self.model), torch.no_grad():
            robust = self._predict_logits(x).argmax(dim=1) == y
        n = x.shape[0]
        result = AutoAttackResult(x_adv=x.clone(), clean_accuracy=float(robust.sum()) / n)
        for name, attack in self.attacks.items():
            idx = robust.nonzero().squeeze(1)
            if idx.numel():
                adv = attack(x[idx], y[idx])
                with attack_mode(self.model), torch.no_grad():
                    fooled = self._predict_logits(adv).argmax(dim=1) != y[idx]
                hit = idx[fooled]
                result.x_adv[hit] = adv[fooled]
                robust[hit] = False
            result.robust_accuracy[name] = float(robust.sum()) / n
            result.robust_after[name] = robust.clone()
        result.robust = robust
        result.max_perturbation = float(flat_norm(result.x_adv - x, self.norm).max())
        result.x_adv = result.x_adv.contiguous(memory_format=layout)
        self.last_result = result
        return result

    def _perturb(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        return self.run(x, y).x_adv

    def __call__(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        if target is not None:
            _checks.fail(type(self).__name__, "AutoAttack is untargeted; `target` is not accepted")
        return self.run(x, y).x_adv
