"""Optimisers and per-step learning-rate schedules: SGD, Adam and SAM (an optimiser wrapper), and the
constant / multistep / cosine / cyclic schedules as one ``LambdaLR`` that is stepped after every optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .config import TrainConfig


class SAM(Optimizer):
    """Sharpness-aware minimisation (Foret et al. 2021) around any base optimiser.

    ``step(closure)`` evaluates ``closure`` (forward + backward, returns the loss) at ``w``, moves to
    ``w + ρ·g/‖g‖`` (ASAM with ``adaptive=True``: ``ρ·w²·g/‖w·g‖``), evaluates ``closure`` again, returns to ``w``
    and lets the base optimiser step with the gradient of the second evaluation. The base optimiser's parameter
    groups are shared (an LR scheduler built on the wrapper changes the base's learning rates), and
    ``state_dict`` is the base's.
    """

    def __init__(self, base_optimizer: Optimizer, rho: float = 0.05, adaptive: bool = False) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"SAM: base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"SAM: rho must be a finite number >= 0, got {rho!r}")
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        # The same group dicts as the base (so LR changes reach it), and no per-parameter state of our own
        # beyond the transient ascent vectors.
        self.param_groups = base_optimizer.param_groups
        self._ascent: dict[Tensor, Tensor] = {}

    def _params_with_grad(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self) -> None:
        """Move every parameter to the ascent point ``w + e(w)`` (gradients must be populated)."""
        params = self._params_with_grad()
        if not params:
            return
        scaled = [(p.abs() * p.grad) if self.adaptive else p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled]))
        scale = self.rho / (norm + 1e-12)
        for p, s in zip(params, scaled):
            e = (p.abs() * s if self.adaptive else s) * scale.to(p.dtype)
            p.add_(e)
            self._ascent[p] = e

    @torch.no_grad()
    def second_step(self) -> None:
        """Return to ``w`` and step the base optimiser with the current (ascent-point) gradients."""
        for p, e in self._ascent.items():
            p.sub_(e)
        self._ascent.clear()
        self.base_optimizer.step()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM.step needs a closure that runs forward + backward and returns the loss")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        self.base_optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # load_state_dict replaces the base's group list; keep sharing it.
        self.param_groups = self.base_optimizer.param_groups


def build_optimizer(config: TrainConfig, params: Iterable[nn.Parameter]) -> Optimizer:
    """The optimiser named by ``config.optimizer`` over ``params``."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    kind = config.sam_base if config.optimizer == "sam" else config.optimizer
    if kind == "sgd":
        base: Optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                          weight_decay=config.weight_decay,
                                          nesterov=config.nesterov and config.momentum > 0)
    else:
        base = torch.optim.Adam(params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    if config.optimizer == "sam":
        return SAM(base, rho=config.sam_rho, adaptive=config.sam_adaptive)
    return base


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    """Multiplier of ``config.lr`` for optimiser step ``step`` (0-based) of ``total_steps``.

    Progress is measured in nominal epochs, ``t = config.epochs · step / total_steps`` (so Free AT's fewer,
    replayed passes follow the same curve). Ramps (warm-up, the cyclic schedule) use ``step + 1`` so that the
    first step does not have a zero learning rate.
    """
    total_steps = max(total_steps, 1)
    epochs = config.epochs
    t = epochs * step / total_steps
    t_next = epochs * (step + 1) / total_steps
    floor = config.lr_min / config.lr
    schedule = config.lr_schedule
    if schedule == "cyclic":
        # Triangle: floor -> 1 at cyclic_peak of training -> floor at the end (Wong et al. 2020).
        peak = config.cyclic_peak * epochs
        u = t_next / peak if t_next <= peak else max(0.0, (epochs - t_next) / (epochs - peak))
        return floor + (1.0 - floor) * u
    warmup = config.lr_warmup_epochs
    if warmup > 0 and t < warmup:
        return min(1.0, t_next / warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        milestones = config.milestones if config.milestones is not None else (0.5 * epochs, 0.75 * epochs)
        return config.lr_gamma ** sum(1 for m in milestones if t >= m)
    # cosine, after the warm-up
    span = max(epochs - warmup, 1e-12)
    u = min(max((t - warmup) / span, 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * u))


def build_scheduler(config: TrainConfig, optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`, to be stepped once per optimiser step. The factor is a plain
    function (not saved in ``state_dict``): a resumed run recomputes it from the config."""

    def factor(step: int) -> float:
        return lr_factor(config, step, total_steps)

    return LambdaLR(optimizer, factor)


__all__ = ["SAM", "build_optimizer", "build_scheduler", "lr_factor"]
