"""Autograd for the differentiable op (prompt_pad); its backward is itself a registered op."""

from __future__ import annotations

import torch


def _setup_context(ctx, inputs, output):
    x, prompt, *config = inputs
    ctx.save_for_backward(x, prompt)
    ctx.config = config


def _backward(ctx, grad):
    x, prompt = ctx.saved_tensors
    need_x, need_prompt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gp = torch.ops.fastadv.prompt_pad_backward(grad.to(x.dtype), x, prompt, *ctx.config, need_x, need_prompt)
    return (gx if need_x else None, gp if need_prompt else None) + (None,) * len(ctx.config)


def register() -> None:
    torch.library.register_autograd("fastadv::prompt_pad", _backward, setup_context=_setup_context)
