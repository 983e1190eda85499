"""Robust accuracy over a dataset: per attack and worst case, with Wilson confidence intervals.

A sample counts as robust against an attack when the model classifies both the clean input and the
attack's output correctly (AutoAttack's convention). The *worst case* is per sample: robust against every
attack at once — at most the lowest single-attack accuracy. An :class:`~fastadv.attacks.AutoAttack` in
``attacks`` also reports its sub-attacks' cumulative accuracies under ``breakdown``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
from torch import Tensor, nn

from ..attacks.autoattack import AutoAttack
from ..attacks.base import attack_mode
from .sanity import run_sanity_checks


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion ``successes / n``."""
    if not 0 < confidence < 1:
        raise ValueError(f"fastadv.evaluate: `confidence` must be in (0, 1), got {confidence}")
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval always contains p; min/max only guard the last rounding digit.
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


@dataclass
class Estimate:
    """An accuracy with its confidence interval."""

    correct: int
    n: int
    confidence: float = 0.95

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n, self.confidence)

    def as_dict(self) -> dict:
        lo, hi = self.interval
        return {"accuracy": self.accuracy, "ci_low": lo, "ci_high": hi, "correct": self.correct, "n": self.n,
                "confidence": self.confidence}

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.accuracy:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}]"


@dataclass
class RobustAccuracyResult:
    """``clean``, ``per_attack`` (name → :class:`Estimate`), ``worst_case`` (per-sample over all attacks),
    ``breakdown`` (AutoAttack name → sub-attack → cumulative :class:`Estimate`), ``robust`` (name → per-sample
    bool tensor on the CPU, plus ``"clean"`` and ``"worst_case"``), ``flags`` (sanity warnings) and
    ``configs`` (each attack's hyper-parameters)."""

    n: int
    clean: Estimate
    per_attack: dict[str, Estimate]
    worst_case: Estimate
    breakdown: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    robust: dict[str, Tensor] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    configs: dict[str, dict] = field(default_factory=dict)

    @property
    def worst_attack(self) -> str | None:
        """The attack with the lowest accuracy on its own."""
        if not self.per_attack:
            return None
        return min(self.per_attack, key=lambda k: self.per_attack[k].correct)

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "clean": self.clean.as_dict(),
            "per_attack": {k: v.as_dict() for k, v in self.per_attack.items()},
            "worst_case": self.worst_case.as_dict(),
            "breakdown": {k: {s: e.as_dict() for s, e in v.items()} for k, v in self.breakdown.items()},
            "flags": list(self.flags),
            "configs": self.configs,
        }

    def __str__(self) -> str:
        rows = [("clean", self.clean), *self.per_attack.items(), ("worst case", self.worst_case)]
        width = max(len(r[0]) for r in rows)
        lines = [f"robust accuracy on {self.n} samples ({int(100 * self.clean.confidence)}% Wilson intervals)"]
        lines += [f"  {name:<{width}}  {est}" for name, est in rows]
        for msg in self.flags:
            lines.append(f"  ! {msg}")
        return "\n".join(lines)


def _named(attacks) -> dict[str, object]:
    if isinstance(attacks, Mapping):
        out = dict(attacks)
    else:
        if callable(attacks):
            attacks = [attacks]
        out = {}
        for a in attacks:
            base = type(a).__name__
            name, i = base, 2
            while name in out:
                name, i = f"{base}_{i}", i + 1
            out[name] = a
    if not out:
        raise ValueError("fastadv.evaluate.robust_accuracy: `attacks` is empty")
    for name, a in out.items():
        if not callable(a):
            raise ValueError(f"fastadv.evaluate.robust_accuracy: attack {name!r} is not callable")
    return out


def _batches(data, batch_size: int) -> tuple[Iterable, int | None, int | None]:
    """Batches of ``(x, y)`` and (if known) the number of samples and of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"fastadv.evaluate.robust_accuracy: `data` tensors disagree on the number of samples "
                             f"({x.shape[0]} and {y.shape[0]})")
        n = x.shape[0]
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)), n, \
            -(-n // batch_size)
    if isinstance(data, Iterable):
        try:
            n_batches = len(data)
        except TypeError:
            n_batches = None
        dataset = getattr(data, "dataset", None)
        try:
            n = len(dataset) if dataset is not None else None
        except TypeError:
            n = None
        return ((b[0], b[1]) for b in data), n, n_batches
    raise ValueError("fastadv.evaluate.robust_accuracy: `data` must be an (x, y) tensor pair or an iterable of "
                     "(x, y) batches such as a DataLoader")


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def robust_accuracy(model: nn.Module, data, attacks, *, batch_size: int = 256, device=None, progress: bool = True,
                    sanity_checks: bool = True, sanity_samples: int = 32,
                    confidence: float = 0.95) -> RobustAccuracyResult:
    """Clean, per-attack and worst-case robust accuracy of ``model`` on ``data``.

    ``data``: an ``(x, y)`` tensor pair (split into batches of ``batch_size``) or an iterable of ``(x, y)``
    batches (a ``DataLoader``). ``attacks``: an attack, a list of attacks or a ``{name: attack}`` mapping; any
    callable ``(x, y) -> x_adv`` works. ``device``: where batches are evaluated (default: the model's device;
    the model is not moved). ``sanity_checks`` runs the checks of :mod:`fastadv.evaluate.sanity` on the first
    ``sanity_samples`` samples and warns (:class:`~fastadv.evaluate.sanity.SanityWarning`) for each flag.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError("fastadv.evaluate.robust_accuracy: `model` must be a torch.nn.Module")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fastadv.evaluate.robust_accuracy: `batch_size` must be a positive int, got {batch_size!r}")
    wilson_interval(0, 1, confidence)  # validates `confidence`
    named = _named(attacks)
    model_device = _model_device(model)
    device = model_device if device is None else torch.device(device)
    if device.type != model_device.type:
        raise ValueError(f"fastadv.evaluate.robust_accuracy: `device` {device} differs from the model's device "
                         f"{model_device}; move the model first")
    batches, n_total, n_batches = _batches(data, batch_size)

    robust: dict[str, list[Tensor]] = {"clean": [], **{name: [] for name in named}, "worst_case": []}
    sub_robust: dict[str, dict[str, list[Tensor]]] = {
        name: {sub: [] for sub in a.attacks} for name, a in named.items() if isinstance(a, AutoAttack)}
    flags: list[str] = []
    seen = worst_correct = 0
    bar = tqdm(total=n_total if n_total is not None else n_batches, disable=not progress, desc="robust accuracy",
               unit="img" if n_total is not None else "batch")
    try:
        for b, (x, y) in enumerate(batches):
            x = x.to(device)
            y = y.to(device=device, dtype=torch.long)
            if b == 0 and sanity_checks:
                k = min(sanity_samples, x.shape[0])
                flags = run_sanity_checks(model, x[:k], y[:k], named)
            with attack_mode(model), torch.no_grad():
                clean_ok = model(x).argmax(dim=1) == y
            robust["clean"].append(clean_ok.cpu())
            worst = clean_ok.clone()
            for name, attack in named.items():
                if isinstance(attack, AutoAttack):
                    res = attack.run(x, y)
                    adv = res.x_adv
                else:
                    adv = attack(x, y)
                with attack_mode(model), torch.no_grad():
                    ok = clean_ok & (model(adv).argmax(dim=1) == y)
                robust[name].append(ok.cpu())
                worst &= ok
                if isinstance(attack, AutoAttack):
                    # Sub-attack accuracies of this batch, cumulative in AutoAttack's order.
                    for sub in sub_robust[name]:
                        sub_robust[name][sub].append(res.robust_after[sub].cpu() & clean_ok.cpu())
            robust["worst_case"].append(worst.cpu())
            seen += x.shape[0]
            worst_correct += int(worst.sum())
            bar.update(x.shape[0] if n_total is not None else 1)
            bar.set_postfix(worst_case=f"{100 * worst_correct / max(seen, 1):.1f}%")
    finally:
        bar.close()

    masks = {name: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for name, v in robust.items()}

    def est(mask: Tensor) -> Estimate:
        return Estimate(int(mask.sum()), int(mask.numel()), confidence)

    breakdown = {name: {sub: est(torch.cat(v)) for sub, v in subs.items()} for name, subs in sub_robust.items()}
    configs = {name: a.config() for name, a in named.items() if hasattr(a, "config")}
    return RobustAccuracyResult(n=seen, clean=est(masks["clean"]), per_attack={k: est(masks[k]) for k in named},
                                worst_case=est(masks["worst_case"]), breakdown=breakdown, robust=masks, flags=flags,
                                configs=configs)
