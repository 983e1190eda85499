"""Sanity flags in the spirit of AutoAttack's checks: signs that a robustness number may be meaningless.

Each check returns a message (or ``None``); :func:`run_sanity_checks` collects them and issues one
:class:`SanityWarning` per flag.

* **probabilities** — the outputs are non-negative and every row sums to 1: the model ends in a softmax,
  which flattens the CE gradient; attacks need logits.
* **randomness** — two forward passes of the same batch (in eval mode) differ: the model is stochastic
  (dropout that stays on, noise layers), so single-run attacks underestimate it; use EOT.
* **zero gradients** — some samples have an all-zero input gradient of the CE loss (saturated softmax,
  non-differentiable layers): gradient masking is likely.
* **ε = 0** — running an attack with its budget set to 0 must reproduce the clean predictions.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks.base import attack_mode


class SanityWarning(UserWarning):
    """A robustness evaluation looks unreliable (see :mod:`fastadv.evaluate.sanity`)."""


def check_probabilities(logits: Tensor, atol: float = 1e-4) -> str | None:
    if logits.numel() and bool((logits >= 0).all()) and bool(
            torch.allclose(logits.sum(dim=1), torch.ones_like(logits[:, 0]), atol=atol)):
        return ("the model's outputs look like probabilities (non-negative, rows sum to 1); attacks need "
                "logits — remove the final softmax")
    return None


def check_randomness(model: nn.Module, x: Tensor, first: Tensor | None = None) -> str | None:
    with attack_mode(model), torch.no_grad():
        a = model(x).float() if first is None else first
        b = model(x).float()
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
        return ("two forward passes of the same batch give different outputs in eval mode: the model is "
                "randomised; single-run attacks are unreliable (use an EOT evaluation)")
    return None


def check_zero_gradients(model: nn.Module, x: Tensor, y: Tensor) -> str | None:
    with attack_mode(model), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    zero = grad.flatten(1).abs().amax(dim=1) == 0
    if bool(zero.any()):
        return (f"{int(zero.sum())} of {x.shape[0]} samples have an all-zero input gradient: gradient-based "
                "attacks cannot move them (gradient masking?)")
    return None


def check_zero_eps(name: str, attack, model: nn.Module, x: Tensor, y: Tensor, clean_pred: Tensor) -> str | None:
    if not hasattr(attack, "with_eps"):
        return None
    adv = attack.with_eps(0.0)(x, y)
    with attack_mode(model), torch.no_grad():
        pred = model(adv).argmax(dim=1)
    changed = int((pred != clean_pred).sum())
    if changed:
        return (f"attack {name!r} with eps=0 changed the prediction of {changed} of {x.shape[0]} samples: "
                "eps = 0 must reproduce the clean accuracy")
    return None


def run_sanity_checks(model: nn.Module, x: Tensor, y: Tensor, attacks: Mapping[str, object] | None = None,
                      *, warn: bool = True) -> list[str]:
    """All checks on one batch; returns the flags (and warns with each unless ``warn=False``)."""
    flags: list[str] = []
    with attack_mode(model), torch.no_grad():
        logits = model(x).float()
    clean_pred = logits.argmax(dim=1)
    for msg in (check_probabilities(logits), check_randomness(model, x, logits),
                check_zero_gradients(model, x, y)):
        if msg:
            flags.append(msg)
    for name, attack in (attacks or {}).items():
        msg = check_zero_eps(name, attack, model, x, y, clean_pred)
        if msg:
            flags.append(msg)
    if warn:
        for msg in flags:
            warnings.warn(msg, SanityWarning, stacklevel=3)
    return flags
