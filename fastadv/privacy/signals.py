"""Per-example membership signals from logits and labels.

Every signal is returned with the orientation **higher = more likely a member**, so that any of them can
be handed to :func:`fastadv.privacy.roc_metrics` unchanged:

==================== ================================================ ===========================
name                 returned score                                   note
==================== ================================================ ===========================
``correctness``      1 if ``argmax z == y`` else 0                    ties resolved by ``argmax``
``confidence``       ``p_y``
``loss``             ``log p_y`` = −(cross-entropy loss)              negated loss
``entropy``          ``Σ_i p_i log p_i`` = −(prediction entropy)      negated entropy
``modified_entropy`` −Mentr, Mentr = ``−(1−p_y) log p_y −              negated (Song & Mittal)
                     Σ_{i≠y} p_i log(1−p_i)``
``scaled_logit``     ``log p_y − log Σ_{i≠y} p_i`` (float64)           LiRA's statistic
``margin``           ``z_y − max_{j≠y} z_j``
==================== ================================================ ===========================

Precision: signals are computed from the logits in float32, or float64 when the logits are float64;
``scaled_logit`` always in float64. Half-precision logits (float16/bfloat16) are upcast with a warning —
probabilities must never be formed in half precision. The computations stay finite for confident
predictions: ``log(1 − p_i)`` and ``log Σ_{i≠y} p_i`` are evaluated as a log-sum-exp over the *other*
logits rather than as ``log(1 − p)``, which rounds to ``log 0`` once ``p`` is within an ulp of 1.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from . import _checks

__all__ = [
    "SIGNALS",
    "compute_signals",
    "signal_scores",
    "model_signals",
    "attack_config",
]

SIGNALS: tuple[str, ...] = (
    "correctness",
    "confidence",
    "loss",
    "entropy",
    "modified_entropy",
    "scaled_logit",
    "margin",
)


def _check_names(names) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    if not names:
        raise ValueError(f"names must list at least one signal; valid names: {', '.join(SIGNALS)}")
    for name in names:
        if name not in SIGNALS:
            raise ValueError(f"unknown signal {name!r}; valid names: {', '.join(SIGNALS)}")
    return names


def _prepare(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _checks.as_tensor(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes, got {logits.shape[1]}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        warnings.warn(
            f"logits are {logits.dtype}: upcasting to float32 before computing membership signals "
            "(half-precision probabilities distort low-FPR results)",
            stacklevel=3,
        )
        logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf values")
    labels = _checks.label_vector(labels, "labels", logits.shape[0], logits.device, logits.shape[1])
    return logits.detach(), labels


def _log_one_minus_softmax(z: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``log(1 − p_i)`` for every class, accurate both for small ``p_i`` and for ``p_i`` close to 1."""
    # p_i < 1/2: log1p(-p_i) is accurate.
    small = torch.log1p(-torch.exp(log_p))
    # p_i >= 1/2: 1 − p_i = Σ_{j≠i} p_j, evaluated as log-sum-exp of the other logits. Only the row's
    # arg-max can have p_i > 1/2 (another class tied at exactly 1/2 keeps log1p, accurate there).
    arg = z.argmax(1, keepdim=True)
    others = torch.logsumexp(z.scatter(1, arg, -math.inf), 1, keepdim=True)
    lse = torch.logsumexp(z, 1, keepdim=True)
    large = torch.zeros_like(z).scatter(1, arg, others - lse)
    is_top = torch.zeros_like(z, dtype=torch.bool).scatter(1, arg, True)
    return torch.where(is_top & (log_p >= -math.log(2.0)), large, small)


def _scaled_logit(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = z.to(torch.float64)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    # log p_y − log Σ_{i≠y} p_i = z_y − logsumexp_{i≠y} z_i: no probabilities, no cancellation near p_y = 1.
    return z_y - torch.logsumexp(z.scatter(1, y[:, None], -math.inf), 1)


def compute_signals(logits, labels, names: Sequence[str] | str = SIGNALS) -> dict[str, torch.Tensor]:
    """Several signals at once (shared softmax work): ``{name: 1-D tensor}``, higher = member.

    ``logits`` ``(N, C)`` (any float dtype, half precision upcast with a warning), ``labels`` ``(N,)``
    integer class indices on the same device. See the module docstring for the definitions.
    """
    names = _check_names(names)
    z, y = _prepare(logits, labels)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    yc = y[:, None]
    out: dict[str, torch.Tensor] = {}
    need_probs = {"confidence", "loss", "entropy", "modified_entropy"} & set(names)
    if need_probs:
        log_p = torch.log_softmax(z, 1)
        log_p_y = log_p.gather(1, yc).squeeze(1)
    for name in names:
        if name == "correctness":
            out[name] = (z.argmax(1) == y).to(z.dtype)
        elif name == "confidence":
            out[name] = torch.exp(log_p_y)
        elif name == "loss":
            out[name] = log_p_y  # −CE
        elif name == "entropy":
            out[name] = (torch.exp(log_p) * log_p).sum(1)  # −H(p); exp(log p)·log p → 0 as p → 0
        elif name == "modified_entropy":
            log_1m = _log_one_minus_softmax(z, log_p)
            p = torch.exp(log_p)
            true_term = -torch.exp(log_1m.gather(1, yc).squeeze(1)) * log_p_y  # −(1−p_y)·log p_y
            other = -(p * log_1m).scatter(1, yc, 0.0).sum(1)  # −Σ_{i≠y} p_i·log(1−p_i)
            out[name] = -(true_term + other)
        elif name == "scaled_logit":
            out[name] = _scaled_logit(z, y)
        elif name == "margin":
            z_y = z.gather(1, yc).squeeze(1)
            out[name] = z_y - z.scatter(1, yc, -math.inf).max(1).values
    return out


def signal_scores(name: str, logits, labels) -> torch.Tensor:
    """One signal by name (see :data:`SIGNALS`); higher = more likely a member."""
    if not isinstance(name, str) or name not in SIGNALS:
        raise ValueError(f"unknown signal {name!r}; valid names: {', '.join(SIGNALS)}")
    return compute_signals(logits, labels, (name,))[name]


def _batches(data, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    ):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: x has {x.shape[0]} examples but y has {y.shape[0]}")
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    if not isinstance(data, Iterable):
        raise ValueError("data must be a pair of tensors (x, y) or an iterable of (x, y) batches (a DataLoader)")
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"data: batch {i} is not an (x, y) pair but {type(batch).__name__}")
        yield batch[0], batch[1]


def _default_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def model_signals(
    model: torch.nn.Module,
    data,
    names: Sequence[str] | str = SIGNALS,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    return_labels: bool = False,
):
    """Run ``model`` over ``data`` and return ``{name: 1-D tensor}`` of membership signals.

    Args:
        model: a classifier returning logits ``(B, C)``. It runs in eval mode without gradients; the
            train/eval flag of every submodule is restored afterwards, even on error.
        data: a pair of tensors ``(x, y)`` (processed in slices of ``batch_size``) or an iterable of
            ``(x, y, ...)`` batches such as a ``DataLoader`` (its own batching is used).
        names: which signals (default: all of :data:`SIGNALS`).
        device: where the model runs (default: the device of the model's parameters).
        attack: optional callable ``attack(x, y) -> x_adv``. When given, every example is replaced by its
            attack example before the signals are computed (MIA on adversarial inputs); members and
            non-members must be run with the same attack. Record its configuration with
            :func:`attack_config` and pass it to the report.
        return_labels: also return the labels, in the order of the signals (useful with a shuffling loader).

    Returns:
        ``{name: tensor (N,)}`` on ``device``, or ``(that dict, labels)`` with ``return_labels=True``.
    """
    names = _check_names(names)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if attack is not None and not callable(attack):
        raise ValueError(f"attack must be callable as attack(x, y) -> x_adv, got {type(attack).__name__}")
    device = torch.device(device) if device is not None else _default_device(model)
    modes = [(module, module.training) for module in model.modules()]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    labels: list[torch.Tensor] = []
    try:
        model.eval()
        for x, y in _batches(data, batch_size):
            x = x.to(device)
            y = y.to(device)
            if attack is not None:
                x_adv = attack(x, y)
                if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
                    raise ValueError("attack must return a tensor shaped like its input x")
                x = x_adv.detach()
                model.eval()  # an attack should leave the model as it found it; do not rely on it
            with torch.no_grad():
                logits = model(x)
            if not isinstance(logits, torch.Tensor):
                raise ValueError(f"model must return a logits tensor, got {type(logits).__name__}")
            for name, values in compute_signals(logits, y, names).items():
                parts[name].append(values)
            labels.append(y)
    finally:
        for module, training in modes:
            module.training = training
    if not labels:
        raise ValueError("data yielded no examples")
    result = {name: torch.cat(values) for name, values in parts.items()}
    if return_labels:
        return result, torch.cat(labels)
    return result


def attack_config(attack) -> dict:
    """A JSON-friendly description of an attack object for the report (class and simple attributes).

    Collects the public attributes whose values are numbers, strings, booleans or ``None`` (for example
    ``eps``, ``alpha``, ``steps``, ``loss``); the model and tensors are skipped.
    """
    config: dict = {"class": type(attack).__qualname__}
    module = getattr(type(attack), "__module__", None)
    if module:
        config["module"] = module
    attributes: Mapping = getattr(attack, "__dict__", {})
    for key, value in sorted(attributes.items()):
        if key.startswith("_"):
            continue
        if isinstance(value, (bool, int, float, str)) or value is None:
            config[key] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            config[key] = value.item()
    return config
