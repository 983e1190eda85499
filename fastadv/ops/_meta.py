"""Fake (meta) kernels so that the ops trace under torch.compile and FakeTensor: shapes, dtypes and strides
exactly as the compiled kernels produce them."""

from __future__ import annotations

import torch


def register() -> None:
    @torch.library.register_fake("fastadv::pgd_step")
    def _pgd_step(delta, grad, x, eps, alpha, eps_tensor=None, alpha_tensor=None, norm="linf", lo=0.0, hi=1.0):
        return torch.empty_like(delta)

    @torch.library.register_fake("fastadv::pgd_step_")
    def _pgd_step_(delta, grad, x, eps, alpha, eps_tensor=None, alpha_tensor=None, norm="linf", lo=0.0, hi=1.0):
        return None

    @torch.library.register_fake("fastadv::masked_pgd_step_")
    def _masked(delta, grad, x, mask, eps_high, eps_low, alpha, alpha_tensor=None, lo=0.0, hi=1.0):
        return None

    @torch.library.register_fake("fastadv::random_init")
    def _random_init(x, eps, eps_tensor=None, norm="linf", lo=0.0, hi=1.0, generator=None):
        return torch.empty_like(x)

    @torch.library.register_fake("fastadv::prompt_pad")
    def _prompt_pad(x, prompt, out_size, inner_size, activation="sigmoid", mode="replace", mean=None, std=None,
                    normalize="canvas"):
        return x.new_empty((x.shape[0], x.shape[1], out_size[0], out_size[1]))

    @torch.library.register_fake("fastadv::prompt_pad_backward")
    def _prompt_pad_backward(grad_out, x, prompt, out_size, inner_size, activation, mode, mean, std, normalize,
                             need_x, need_prompt):
        gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
        gp = prompt.new_empty(prompt.shape) if need_prompt else prompt.new_empty((0,))
        return gx, gp
