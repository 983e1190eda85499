"""The short inner-maximisation loop shared by the methods whose inner problem is not a plain attack
(TRADES' KL objective, MART's start, PART's per-pixel budget): input-only gradients with the model in eval
mode and its parameters frozen (:func:`fastadv.attacks.attack_mode`), every update through a fused op."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from ... import ops
from ...attacks import attack_mode
from ...models.fold import eval_view
from ...utils import autocast_context

# fp16 input gradients underflow on small losses; only their sign / direction is used, so the objective is
# scaled up before the backward pass (as the attack engine does).
FP16_LOSS_SCALE = 1024.0

StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def plain_step(eps: float, alpha: float, norm: str) -> StepFn:
    """``step(delta, grad, x)``: one in-place :func:`fastadv.ops.pgd_step_` with a global budget."""
    return partial(ops.pgd_step_, eps=eps, alpha=alpha, norm=norm)


def masked_step(mask: Tensor, eps_high: float, eps_low: float, alpha: float) -> StepFn:
    """``step(delta, grad, x)``: PART's :func:`fastadv.ops.masked_pgd_step_` (``eps_high`` where ``mask``)."""

    def step(delta: Tensor, grad: Tensor, x: Tensor) -> Tensor:
        return ops.masked_pgd_step_(delta, grad, x, mask, eps_high=eps_high, eps_low=eps_low, alpha=alpha)

    return step


def gaussian_start(x: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """``delta = std · N(0, 1)`` (TRADES / MART), kept inside the pixel box ``[0, 1]``."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    return (x + std * noise).clamp_(0.0, 1.0) - x


def ascend(model: nn.Module, x: Tensor, delta: Tensor, objective: Callable[[Tensor], Tensor], *, steps: int,
           step: StepFn, amp: str | None = None, fold_bn: bool = True) -> Tensor:
    """``steps`` ascent steps on ``objective(logits of x + delta)`` (a scalar), updating ``delta`` in place with
    ``step(delta, grad, x)``; returns ``x + delta``. Gradients flow to the input only; ``fold_bn`` runs the
    BatchNorm-folded eval view of the model (:func:`fastadv.models.fold.eval_view`), as the attacks do."""
    scale = FP16_LOSS_SCALE if amp == "fp16" else None
    with attack_mode(model), torch.enable_grad():
        net = eval_view(model) if fold_bn else model
        for _ in range(steps):
            x_adv = (x + delta).requires_grad_(True)
            with autocast_context(x.device, amp):
                logits = net(x_adv)
            value = objective(logits.float())
            (grad,) = torch.autograd.grad(value * scale if scale else value, x_adv)
            step(delta, grad, x)
    return (x + delta).clamp_(0.0, 1.0)
