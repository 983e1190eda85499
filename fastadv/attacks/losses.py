"""Per-sample attack losses on float32 logits. Every loss here is *maximised* by the attacks.

=========  ==========================================================  ===========================================
name       untargeted (true label ``y``)                               targeted (target ``t``)
=========  ==========================================================  ===========================================
``ce``     ``CE(z, y)``                                                ``-CE(z, t)``
``cw``     ``-clamp(z_y - max_{j!=y} z_j, min=-kappa)``                ``-clamp(max_{j!=t} z_j - z_t, min=-kappa)``
``dlr``    ``-(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + 1e-12)``       ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12)``
=========  ==========================================================  ===========================================

``pi`` sorts the logits in decreasing order. DLR needs at least 3 classes (4 when targeted); fewer raise a
``ValueError``: the denominator would be identically zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

LOSSES = ("ce", "cw", "dlr")
DLR_DENOMINATOR_FLOOR = 1e-12

LossFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _true_and_best_other(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return z_y, others.amax(dim=1)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j``: positive while ``y`` is predicted."""
    z_y, z_other = _true_and_best_other(logits, y)
    return z_y - z_other


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def cw_loss(logits: Tensor, y: Tensor, kappa: float = 50.0) -> Tensor:
    return -margin(logits, y).clamp(min=-kappa)


def targeted_cw_loss(logits: Tensor, target: Tensor, kappa: float = 50.0) -> Tensor:
    return -(-margin(logits, target)).clamp(min=-kappa)


def _need_classes(logits: Tensor, n: int, what: str) -> None:
    if logits.dim() != 2 or logits.shape[1] < n:
        raise ValueError(f"fastadv.attacks: the {what} DLR loss needs at least {n} classes, the model gives "
                         f"{logits.shape[1] if logits.dim() == 2 else tuple(logits.shape)}; use loss='ce' or 'cw'")


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    _need_classes(logits, 3, "untargeted")
    top = logits.topk(3, dim=1).values
    z_y, z_other = _true_and_best_other(logits, y)
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + DLR_DENOMINATOR_FLOOR)


def targeted_dlr_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    _need_classes(logits, 4, "targeted")
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DLR_DENOMINATOR_FLOOR)


def check_loss(owner: str, loss) -> None:
    if callable(loss):
        return
    if loss not in LOSSES:
        raise ValueError(f"fastadv.attacks.{owner}: unknown `loss` {loss!r}; expected one of "
                         f"{', '.join(map(repr, LOSSES))} or a callable (logits, labels) -> per-sample loss")


def make_loss(loss, *, targeted: bool, kappa: float = 50.0) -> LossFn:
    """The loss as ``fn(logits, y, target) -> (B,)`` to maximise. A callable ``loss(logits, labels)`` gets the
    true labels when untargeted and the target labels when targeted."""
    if callable(loss):
        if targeted:
            return lambda z, y, t: loss(z, t)
        return lambda z, y, t: loss(z, y)
    if loss == "ce":
        if targeted:
            return lambda z, y, t: -ce_loss(z, t)
        return lambda z, y, t: ce_loss(z, y)
    if loss == "cw":
        if targeted:
            return lambda z, y, t: targeted_cw_loss(z, t, kappa)
        return lambda z, y, t: cw_loss(z, y, kappa)
    if loss == "dlr":
        if targeted:
            return targeted_dlr_loss
        return lambda z, y, t: dlr_loss(z, y)
    raise ValueError(f"fastadv.attacks: unknown loss {loss!r}")
