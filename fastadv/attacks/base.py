"""The attack engine: what every fastadv attack shares.

An attack is an object built with its hyper-parameters and called on a batch, ``adv = PGD(model, ...)(x, y)``.
:class:`Attack` owns, so that no attack does it on its own:

* **input-only gradients** — ``torch.autograd.grad(loss, x_adv)``; while an attack runs the model's parameters
  have ``requires_grad=False`` (the autograd graph has no edges to them), and their flags are restored
  exactly afterwards, so no parameter ever receives a ``.grad``;
* **the model's mode** — the attack runs in ``eval()`` mode; every sub-module's ``training`` flag is restored
  exactly afterwards (also when the attack raises);
* **randomness** — a private ``torch.Generator``; the global RNG is never read or re-seeded;
* **precision and layout** — optional ``amp="bf16" | "fp16"`` autocast around the forward pass (the loss is
  computed in float32 from float32 logits; fp16 gradients use a fixed loss scale) and the input layout:
  ``channels_last=True`` runs the attack on a channels-last copy of a 4-D batch (the result comes back in
  the input's layout); the default ``None`` does so when the model has a ``Conv2d`` and the batch is on the
  CPU (oneDNN convolutions are faster that way) or ``amp`` is set. Results agree with the other layout up
  to float rounding in the convolutions. On CPUs with AVX-512 BF16 or AMX, ``amp="bf16"`` is the fast
  path; converting the model itself (``model.to(memory_format=torch.channels_last)``) helps further;
* **BatchNorm folding** — ``fold_bn=True`` (the default) runs the eval-mode model with every BatchNorm that
  follows a convolution folded into it (:mod:`fastadv.models.fold`): the same function up to float rounding,
  without the normalisation's passes at each step;
* **the updates** — every step and projection goes through :mod:`fastadv.ops`, and no step loop synchronises
  with the host: per-sample decisions (early stop, best point) are ``torch.where`` selections.
"""

from __future__ import annotations

import copy
import numbers
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from .. import ops
from ..models.fold import eval_view
from ..utils import AMP_DTYPES, auto_channels_last, has_conv2d
from . import _checks
from .losses import margin

NORMS = ("linf", "l2")
# fp16 backward passes underflow on small loss gradients; the attacks only need the gradient's direction,
# so the loss is scaled up by this constant and the gradient scaled back down.
FP16_LOSS_SCALE = 1024.0


@contextmanager
def attack_mode(model: nn.Module):
    """Put ``model`` in eval mode with frozen parameters; restore every module's ``training`` flag and every
    parameter's ``requires_grad`` flag exactly on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def make_generator(owner: str, generator) -> torch.Generator:
    """A ``torch.Generator`` as given, one seeded with an ``int``, or (``None``) a private generator seeded
    non-deterministically. The global RNG is never touched."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        g = torch.Generator()
        g.seed()
        return g
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    _checks.fail(owner, f"`generator` must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample ``(B,)`` tensor viewed as ``(B, 1, ..., 1)`` to broadcast against ``like``."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def flat_norm(t: Tensor, norm: str) -> Tensor:
    """Per-sample norm of a ``(B, ...)`` tensor."""
    flat = t.reshape(t.shape[0], -1)
    if norm == "linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.norm(dim=1)


def input_layout(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a batch stored channels-last, else ``torch.contiguous_format``."""
    if x.dim() == 4 and x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Attack(ABC):
    """Base class of every attack. Subclasses implement :meth:`_perturb` (called in eval mode with frozen
    parameters and gradients enabled) and may use the helpers below.

    Common arguments: ``eps`` (budget in pixel units), ``norm`` (``"linf"`` or ``"l2"``), ``generator``
    (``torch.Generator``, an ``int`` seed or ``None``), ``amp`` (``None``, ``"bf16"`` or ``"fp16"``),
    ``channels_last`` (``None``: automatic, see the module docstring) and the pixel box ``lo``/``hi``.
    """

    targeted: bool = False
    #: norms the attack supports
    norms: tuple[str, ...] = NORMS

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "linf", generator=None, amp: str | None = None,
                 channels_last: bool | None = None, fold_bn: bool = True, lo: float = 0.0, hi: float = 1.0) -> None:
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastadv.attacks.{owner}: `model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.eps = _checks.real(owner, "eps", eps)
        self.norm = _checks.choice(owner, "norm", norm, self.norms)
        if amp is not None:
            _checks.choice(owner, "amp", amp, tuple(AMP_DTYPES))
        self.amp = amp
        self.channels_last = None if channels_last is None else bool(channels_last)
        self.fold_bn = bool(fold_bn)
        self._net: nn.Module = model  # what the attack calls: the model, or its BatchNorm-folded eval view
        self._has_conv = has_conv2d(model)
        self.lo, self.hi = _checks.box(owner, lo, hi)
        self.generator = make_generator(owner, generator)
        self._device_generators: dict[torch.device, torch.Generator] = {}
        # True while a CUDA graph is being captured (autocast's weight cache cannot be captured).
        self._capturing = False

    # ------------------------------------------------------------------ public interface

    def __call__(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        """Adversarial examples for ``(x, y)``: a tensor like ``x`` inside the ε-ball around ``x`` and the
        pixel box. ``target`` (targeted attacks only) gives the target class of each sample."""
        x_in = x
        x, y, target = self._check_inputs(x, y, target)
        if x.shape[0] == 0:
            return x.clone()
        with attack_mode(self.model), torch.enable_grad():
            self._net = eval_view(self.model) if self.fold_bn else self.model
            try:
                adv = self._perturb(x, y, target)
            finally:
                self._net = self.model  # the view holds no reference between calls
        return adv.detach().contiguous(memory_format=input_layout(x_in))

    def config(self) -> dict:
        """The hyper-parameters, JSON-friendly (for recording which attack a number comes from)."""
        return {"attack": type(self).__name__, "eps": self.eps, "norm": self.norm, "amp": self.amp,
                "channels_last": self.channels_last, "fold_bn": self.fold_bn}

    def with_eps(self, eps: float) -> Attack:
        """A shallow copy of the attack with another budget (sharing the model and the generator)."""
        new = copy.copy(self)
        new.eps = _checks.real(type(self).__name__, "eps", eps)
        new._device_generators = self._device_generators
        return new

    def __repr__(self) -> str:
        cfg = self.config()
        name = cfg.pop("attack")
        return f"{name}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"

    # ------------------------------------------------------------------ for subclasses

    @abstractmethod
    def _perturb(self, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """The adversarial batch for validated inputs (eval mode, frozen parameters, gradients enabled)."""

    def _check_inputs(self, x, y, target):
        owner = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            _checks.fail(owner, "`x` must be a floating-point (B, ...) tensor")
        if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1]:
            _checks.fail(owner, f"`y` must be a tensor of shape ({x.shape[0]},) with one label per sample")
        if x.is_inference():
            x = x.clone()
        x = x.detach()
        if self._channels_last_for(x):
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.detach().to(device=x.device, dtype=torch.long)
        if target is not None:
            if not self.targeted:
                _checks.fail(owner, "`target` was given but the attack is untargeted (construct it with targeted=True)")
            if not isinstance(target, torch.Tensor) or target.shape != x.shape[:1]:
                _checks.fail(owner, f"`target` must be a tensor of shape ({x.shape[0]},)")
            target = target.detach().to(device=x.device, dtype=torch.long)
        return x, y, target

    def _channels_last_for(self, x: Tensor) -> bool:
        if x.dim() != 4:
            return False
        if self.channels_last is not None:
            return self.channels_last
        return auto_channels_last(self._has_conv, x.device, self.amp)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """The private generator for ``device``: the given generator when it lives there, else one seeded once
        from it (so results stay a deterministic function of the given generator)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.generator.device == device or (self.generator.device.type == device.type == "cpu"):
            return self.generator
        g = self._device_generators.get(device)
        if g is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device).item())
            g = torch.Generator(device=device).manual_seed(seed)
            self._device_generators[device] = g
        return g

    def _autocast(self, x: Tensor):
        if self.amp is None:
            return nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=AMP_DTYPES[self.amp],
                              cache_enabled=not self._capturing)

    def _logits(self, x_adv: Tensor) -> Tensor:
        """Float32 logits of the model (under autocast when ``amp`` is set)."""
        with self._autocast(x_adv):
            out = self._net(x_adv)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            _checks.fail(type(self).__name__, "the model must return a (B, num_classes) tensor of logits")
        return out.float()

    def _predict_logits(self, x_adv: Tensor) -> Tensor:
        with torch.no_grad():
            return self._logits(x_adv)

    def _loss_grad(self, x: Tensor, delta: Tensor, y: Tensor, target: Tensor | None, loss_fn):
        """Loss (B,), logits and the input gradient at ``x + delta``; gradients flow only to the input."""
        x_adv = (x + delta).requires_grad_(True)
        logits = self._logits(x_adv)
        loss = loss_fn(logits, y, target)
        total = loss.sum()
        scale = FP16_LOSS_SCALE if self.amp == "fp16" else None
        (grad,) = torch.autograd.grad(total * scale if scale else total, x_adv)
        if scale:
            grad = grad / scale
        return loss.detach(), logits.detach(), grad

    def _project(self, delta: Tensor, x: Tensor) -> Tensor:
        """Projection onto the ε-ball and the pixel box: a ``pgd_step`` with a zero step."""
        return ops.pgd_step(delta, torch.zeros_like(delta), x, eps=self.eps, alpha=0.0, norm=self.norm,
                            lo=self.lo, hi=self.hi)

    def _random_start(self, x: Tensor, eps=None) -> Tensor:
        return ops.random_init(x, eps=self.eps if eps is None else eps, norm=self.norm, lo=self.lo, hi=self.hi,
                               generator=self._generator_for(x.device))

    def _finish(self, x: Tensor, delta: Tensor) -> Tensor:
        # delta already keeps x + delta inside the box; the clamp only removes the last rounding ulp.
        return (x + delta).clamp_(self.lo, self.hi)

    @staticmethod
    def _misclassified(logits: Tensor, y: Tensor) -> Tensor:
        return logits.argmax(dim=1) != y

    @staticmethod
    def _true_margin(logits: Tensor, y: Tensor) -> Tensor:
        return margin(logits, y)
