"""Periodic evaluation during training: natural and PGD accuracy on a held-out subset, sharded over the ranks
and summed with one all-reduce."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..utils import autocast_context
from .distributed import DistInfo, all_reduce_sum


def evaluate_robustness(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, eps: float, alpha: float,
                        steps: int, norm: str = "linf", generator: torch.Generator | None = None,
                        amp: str | None = None, channels_last: bool = False, fold_bn: bool = True,
                        dist_info: DistInfo | None = None, device: torch.device | None = None) -> dict[str, float]:
    """``{"nat_acc", "pgd_acc", "n"}`` of ``model`` over ``batches`` (this rank's share); ``steps=0`` skips the
    attack (``pgd_acc`` is then NaN). The PGD attack is :class:`fastadv.attacks.PGD` with a random start drawn
    from ``generator``. Counts are summed over all ranks, so every rank returns the global figures. The model's
    train/eval state is restored."""
    attack = None
    if steps > 0:
        from ..attacks import PGD

        attack = PGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=True, generator=generator,
                     amp=None if amp in (None, "none") else amp, channels_last=channels_last, fold_bn=fold_bn)
    dist_info = dist_info or DistInfo()
    if device is None:
        device = next(model.parameters()).device
    counts = torch.zeros(3, dtype=torch.float64, device=device)

    def forward(inputs: Tensor) -> Tensor:
        with torch.no_grad(), autocast_context(device, amp):
            return model(inputs)

    was_training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for x, y in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = forward(x)
            counts[0] += (logits.argmax(dim=1) == y).sum()
            counts[2] += y.shape[0]
            if attack is not None:
                x_adv = attack(x, y)
                counts[1] += (forward(x_adv).argmax(dim=1) == y).sum()
    finally:
        for m, training in was_training:
            m.training = training
    all_reduce_sum(counts, dist_info)
    nat, adv, n = counts.tolist()
    if n == 0:
        return {"nat_acc": float("nan"), "pgd_acc": float("nan"), "n": 0}
    return {"nat_acc": nat / n, "pgd_acc": adv / n if attack is not None else float("nan"), "n": int(n)}


__all__ = ["evaluate_robustness"]
