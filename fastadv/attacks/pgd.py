"""FGSM, FGSM-RS and PGD (Madry et al.), L∞ and L2, untargeted and targeted, with restarts.

PGD starts at a uniform random point of the ε-ball (``random_start=True``) or at ``x``; every step is one
fused :func:`fastadv.ops.pgd_step_` (signed step for L∞, normalised-gradient step for L2, projection onto the
ball, clip to the pixel box). The attack returns the last iterate of each run. With ``restarts > 1`` every
further run starts afresh on the samples not yet adversarial, and each sample keeps the first adversarial
point found (else the point of highest loss). ``early_stop=True`` freezes a sample (step size 0) as soon as
it is adversarial, without leaving the device. ``cuda_graph=True`` captures the whole step loop of a
fixed-shape batch in a CUDA graph and replays it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from . import _checks
from .base import Attack, bcast
from .losses import check_loss, make_loss

TARGET_RULES = ("random", "least_likely", "most_likely")


class PGD(Attack):
    """Projected gradient descent: ``adv = PGD(model, eps=8/255, alpha=2/255, steps=10)(x, y)``.

    Arguments beyond the engine's (see :class:`Attack`): ``alpha`` step size; ``steps``; ``loss`` ``"ce"``,
    ``"cw"`` (margin clamped at ``kappa``), ``"dlr"`` or a callable ``(logits, labels) -> (B,)`` to maximise;
    ``random_start``; ``restarts``; ``targeted`` (then call ``attack(x, y, target=t)`` or let
    ``target_rule`` pick the target from the clean logits: ``"random"`` wrong class, ``"least_likely"``,
    ``"most_likely"`` wrong class, or a callable ``(logits, y) -> t``); ``early_stop``; ``cuda_graph``.
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 norm: str = "linf", loss="ce", random_start: bool = True, restarts: int = 1,
                 targeted: bool = False, generator=None, amp: str | None = None, *, kappa: float = 50.0,
                 target_rule="random", early_stop: bool = False, channels_last: bool | None = None,
                 fold_bn: bool = True, cuda_graph: bool = False, lo: float = 0.0, hi: float = 1.0) -> None:
        super().__init__(model, eps=eps, norm=norm, generator=generator, amp=amp, channels_last=channels_last,
                         fold_bn=fold_bn, lo=lo, hi=hi)
        owner = type(self).__name__
        self.alpha = _checks.real(owner, "alpha", alpha)
        self.steps = _checks.integer(owner, "steps", steps, minimum=1)
        self.restarts = _checks.integer(owner, "restarts", restarts, minimum=1)
        check_loss(owner, loss)
        self.loss = loss
        self.kappa = _checks.real(owner, "kappa", kappa)
        self.random_start = bool(random_start)
        self.targeted = bool(targeted)
        if not callable(target_rule):
            _checks.choice(owner, "target_rule", target_rule, TARGET_RULES)
        self.target_rule = target_rule
        self.early_stop = bool(early_stop)
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph:  # a captured graph keeps the tensors it read: call the model's own parameters
            self.fold_bn = False
        self._loss_fn = make_loss(loss, targeted=self.targeted, kappa=self.kappa)
        self._graphs: dict = {}

    def config(self) -> dict:
        return {**super().config(), "alpha": self.alpha, "steps": self.steps,
                "loss": self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "custom"),
                "random_start": self.random_start, "restarts": self.restarts, "targeted": self.targeted,
                "early_stop": self.early_stop}

    def with_eps(self, eps: float) -> PGD:
        new = super().with_eps(eps)
        new._graphs = {}                        # a captured graph has the budget baked in
        return new

    # ------------------------------------------------------------------ targets and success

    def _targets(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor | None:
        if not self.targeted or target is not None:
            return target
        logits = self._predict_logits(x)
        k = logits.shape[1]
        if callable(self.target_rule):
            return self.target_rule(logits, y).to(device=x.device, dtype=torch.long)
        if k < 2:
            _checks.fail(type(self).__name__, "a targeted attack needs at least 2 classes")
        if self.target_rule == "least_likely":
            return logits.argmin(dim=1)
        if self.target_rule == "most_likely":
            return logits.scatter(1, y[:, None], float("-inf")).argmax(dim=1)
        shift = torch.randint(1, k, y.shape, generator=self._generator_for(x.device), device=x.device)
        return (y + shift) % k

    def _success(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if self.targeted:
            return logits.argmax(dim=1) == target
        return logits.argmax(dim=1) != y

    # ------------------------------------------------------------------ the step loop

    def _start(self, x: Tensor) -> Tensor:
        if self.random_start and self.eps > 0:
            return self._random_start(x)
        return torch.zeros_like(x)

    def _steps(self, x: Tensor, y: Tensor, target: Tensor | None, delta: Tensor) -> Tensor:
        """``steps`` in-place PGD steps on ``delta``; no host synchronisation."""
        alpha = self.alpha
        if self.early_stop:
            alpha_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            full = torch.full(x.shape[:1], self.alpha, dtype=alpha_dtype, device=x.device)
            frozen = torch.zeros_like(full)
            done = torch.zeros(x.shape[:1], dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            _, logits, grad = self._loss_grad(x, delta, y, target, self._loss_fn)
            if self.early_stop:
                done |= self._success(logits, y, target)
                alpha = torch.where(done, frozen, full)
            ops.pgd_step_(delta, grad, x, eps=self.eps, alpha=alpha, norm=self.norm, lo=self.lo, hi=self.hi)
        return delta

    def _run(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if self.cuda_graph:
            return self._graphed_run(x, y, target)
        return self._steps(x, y, target, self._start(x))

    def _perturb(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if self.cuda_graph and x.device.type != "cuda":
            raise RuntimeError(f"fastadv.attacks.{type(self).__name__}: cuda_graph=True needs CUDA tensors, got "
                               f"x on {x.device}; construct the attack with cuda_graph=False on this device")
        target = self._targets(x, y, target)
        delta = self._run(x, y, target)
        if self.restarts == 1:
            return self._finish(x, delta)
        best = delta
        logits = self._predict_logits(x + best)
        best_loss = self._loss_fn(logits, y, target)
        best_ok = self._success(logits, y, target)
        for _ in range(1, self.restarts):
            # Between runs (not inside a step loop): keep working only on the samples not yet adversarial.
            # A captured graph has a fixed shape, so with cuda_graph every run covers the whole batch.
            if self.cuda_graph:
                idx = torch.arange(x.shape[0], device=x.device)
            else:
                idx = (~best_ok).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
            xs, ys = x[idx], y[idx]
            ts = target[idx] if target is not None else None
            d = self._run(xs, ys, ts)
            logits = self._predict_logits(xs + d)
            loss = self._loss_fn(logits, ys, ts)
            ok = self._success(logits, ys, ts)
            take = ~best_ok[idx] & (ok | (loss > best_loss[idx]))
            best[idx] = torch.where(bcast(take, d), d, best[idx])
            best_loss[idx] = torch.where(take, loss, best_loss[idx])
            best_ok[idx] = best_ok[idx] | (take & ok)
        return self._finish(x, best)

    # ------------------------------------------------------------------ CUDA graphs

    def _graphed_run(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """One PGD run replayed from a CUDA graph of the whole step loop (captured once per shape)."""
        key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last),
               target is not None)
        graph = self._graphs.get(key)
        if graph is None:
            graph = _CapturedPGD(self, x, y, target)
            self._graphs[key] = graph
        return graph.replay(x, y, target, self._start(x))


class _CapturedPGD:
    """Static input buffers, the step loop captured in a ``torch.cuda.CUDAGraph``, and its replay.

    The graph reads the model's parameters and buffers at their current addresses, so it stays valid while
    the model is updated in place (an optimizer step) but not if its tensors are replaced.
    """

    def __init__(self, attack: PGD, x: Tensor, y: Tensor, target: Tensor | None) -> None:
        self.attack = attack
        self.x = x.clone()
        self.y = y.clone()
        self.target = target.clone() if target is not None else None
        self.delta = torch.zeros_like(x)       # each replay copies its own start in (no random draw here)
        self.graph = torch.cuda.CUDAGraph()
        attack._capturing = True
        try:
            # Warm up on a side stream (autograd and the kernels allocate their workspaces), then capture.
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    warm = self.delta.clone()
                    attack._steps(self.x, self.y, self.target, warm)
            torch.cuda.current_stream(x.device).wait_stream(side)
            with torch.cuda.graph(self.graph):
                attack._steps(self.x, self.y, self.target, self.delta)
        finally:
            attack._capturing = False

    def replay(self, x: Tensor, y: Tensor, target: Tensor | None, delta0: Tensor) -> Tensor:
        self.x.copy_(x)
        self.y.copy_(y)
        if self.target is not None:
            self.target.copy_(target)
        self.delta.copy_(delta0)
        self.graph.replay()
        return self.delta.clone()


class FGSM(PGD):
    """One signed-gradient step of size ``alpha`` (default ``eps``) from ``x`` (FGSM), or from a uniform random
    start with ``alpha = 1.25 * eps`` by default (``random_start=True``: FGSM-RS, Wong et al.)."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float | None = None, norm: str = "linf",
                 loss="ce", random_start: bool = False, targeted: bool = False, generator=None,
                 amp: str | None = None, **kwargs) -> None:
        if alpha is None:
            eps_checked = _checks.real(type(self).__name__, "eps", eps)
            alpha = 1.25 * eps_checked if random_start else eps_checked
        super().__init__(model, eps=eps, alpha=alpha, steps=1, norm=norm, loss=loss, random_start=random_start,
                         restarts=1, targeted=targeted, generator=generator, amp=amp, **kwargs)
