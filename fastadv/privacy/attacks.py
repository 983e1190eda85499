"""Threshold membership-inference attacks on a single signal.

Two threshold regimes, and the label each result carries:

* ``"oracle"`` — :func:`oracle_threshold_attack`: the best threshold chosen *on the evaluated data
  itself*. It is an upper bound on what a threshold on that signal can achieve, not an attack an
  adversary could run; report it as such.
* ``"transferred"`` — :func:`transferred_threshold_attack`: thresholds chosen on shadow data (one per
  class, as in Song & Mittal, "Systematic evaluation of privacy risks of machine learning models") and
  applied unchanged to the target data.

Scores follow the package-wide orientation (higher = more likely a member); an example is predicted a
member when ``score >= threshold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import _checks
from .metrics import _best_threshold, _prepare, roc_metrics

__all__ = [
    "ThresholdAttackResult",
    "ClassThresholds",
    "threshold_metrics",
    "oracle_threshold_attack",
    "fit_class_thresholds",
    "transferred_threshold_attack",
]


@dataclass
class ThresholdAttackResult:
    """Per-example predictions of a threshold attack and its metrics.

    ``metrics`` holds only JSON-friendly numbers; :meth:`to_dict` adds the regime and thresholds but not
    the per-example predictions.
    """

    regime: str
    member_predictions: torch.Tensor
    nonmember_predictions: torch.Tensor
    metrics: dict
    thresholds: torch.Tensor | float
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        thresholds = self.thresholds
        if isinstance(thresholds, torch.Tensor):
            thresholds = thresholds.tolist()
        return {"regime": self.regime, "thresholds": thresholds, **self.info, **self.metrics}


def threshold_metrics(member_predictions, nonmember_predictions) -> dict:
    """Metrics of fixed member/non-member predictions (booleans): TPR, FPR, balanced accuracy, ..."""
    mp = _checks.as_tensor(member_predictions, "member_predictions")
    npred = _checks.as_tensor(nonmember_predictions, "nonmember_predictions")
    for t, name in ((mp, "member_predictions"), (npred, "nonmember_predictions")):
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    n1, n0 = mp.numel(), npred.numel()
    tp = int(mp.bool().sum())
    fp = int(npred.bool().sum())
    tpr, fpr = tp / n1, fp / n0
    return {
        "tpr": tpr,
        "fpr": fpr,
        "balanced_accuracy": 0.5 * (tpr + 1.0 - fpr),
        "advantage": tpr - fpr,
        "accuracy": (tp + n0 - fp) / (n1 + n0),
        "n_members": n1,
        "n_nonmembers": n0,
    }


def oracle_threshold_attack(
    member_scores,
    nonmember_scores,
    *,
    fpr: float | Sequence[float] = (0.01, 0.001),
    bootstrap: int = 0,
    generator: torch.Generator | None = None,
) -> ThresholdAttackResult:
    """Best single threshold on the evaluated data (regime ``"oracle"``: an upper bound).

    The threshold maximises balanced accuracy (equivalently the advantage); ``metrics`` is the full
    :func:`~fastadv.privacy.roc_metrics` dict (AUC, TPR at FPR, ...).
    """
    metrics = roc_metrics(member_scores, nonmember_scores, fpr=fpr, bootstrap=bootstrap, generator=generator)
    member, nonmember = _prepare(member_scores, nonmember_scores)
    threshold = metrics["best_threshold"]
    if threshold == math.inf:  # the origin: flag nobody
        member_pred = torch.zeros_like(member, dtype=torch.bool)
        nonmember_pred = torch.zeros_like(nonmember, dtype=torch.bool)
    else:
        member_pred, nonmember_pred = member >= threshold, nonmember >= threshold
    return ThresholdAttackResult("oracle", member_pred, nonmember_pred, metrics, threshold)


@dataclass
class ClassThresholds:
    """Per-class thresholds fitted on shadow data.

    ``thresholds[c]`` applies to examples labelled ``c``; classes without both shadow members and
    shadow non-members use ``global_threshold`` (fitted on all shadow data) and are marked in
    ``fallback``. ``shadow_balanced_accuracy[c]`` is the balanced accuracy reached on the shadow data.
    """

    thresholds: torch.Tensor
    fallback: torch.Tensor
    global_threshold: float
    shadow_balanced_accuracy: torch.Tensor

    def predict(self, scores, labels, *, name: str = "labels") -> torch.Tensor:
        """Boolean member predictions ``scores >= thresholds[labels]`` (compared in float64)."""
        scores = _checks.score_vector(scores, "scores")
        labels = _checks.label_vector(labels, name, scores.numel(), scores.device, self.thresholds.numel())
        return scores.to(torch.float64) >= self.thresholds.to(scores.device)[labels]


def fit_class_thresholds(
    member_scores,
    member_labels,
    nonmember_scores,
    nonmember_labels,
    *,
    num_classes: int | None = None,
) -> ClassThresholds:
    """Song & Mittal's per-class thresholds: for each class the threshold maximising balanced accuracy.

    Candidate thresholds are the distinct shadow scores of the class (ties move together); among equally
    good thresholds the largest is taken. Vectorised over classes with one sort by (class, score).
    """
    member, nonmember = _prepare(member_scores, nonmember_scores)
    device = member.device
    ym = _checks.label_vector(member_labels, "member_labels", member.numel(), device, num_classes)
    yn = _checks.label_vector(nonmember_labels, "nonmember_labels", nonmember.numel(), device, num_classes)
    if num_classes is None:
        num_classes = int(torch.maximum(ym.max(), yn.max())) + 1
    c = num_classes

    scores = torch.cat([member, nonmember])
    labels = torch.cat([ym, yn])
    is_member = torch.zeros(scores.numel(), dtype=torch.bool, device=device)
    is_member[: member.numel()] = True
    # Sort by score (descending), then stably by class: classes become contiguous, scores descend inside.
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(labels[by_score], stable=True).indices]
    s, y, m = scores[order], labels[order], is_member[order]

    n1_c = torch.bincount(ym, minlength=c)
    n0_c = torch.bincount(yn, minlength=c)
    members_before = torch.cumsum(n1_c, 0) - n1_c  # members in classes < c
    nonmembers_before = torch.cumsum(n0_c, 0) - n0_c
    tp = torch.cumsum(m.to(torch.int64), 0) - members_before[y]
    fp = torch.cumsum((~m).to(torch.int64), 0) - nonmembers_before[y]

    n = s.numel()
    last = torch.ones(n, dtype=torch.bool, device=device)
    last[:-1] = (s[1:] != s[:-1]) | (y[1:] != y[:-1])
    ends = last.nonzero().squeeze(1)
    ye = y[ends]
    valid_c = (n1_c > 0) & (n0_c > 0)
    ok = valid_c[ye]
    ends, ye = ends[ok], ye[ok]
    tpr = tp[ends].to(torch.float64) / n1_c[ye]
    fpr = fp[ends].to(torch.float64) / n0_c[ye]
    ba = 0.5 * (tpr + 1.0 - fpr)

    best = torch.full((c,), -math.inf, dtype=torch.float64, device=device)
    best.scatter_reduce_(0, ye, ba, reduce="amax")
    # First (highest-threshold) point of each class reaching its maximum.
    position = torch.arange(ends.numel(), device=device)
    hit = torch.where(ba == best[ye], position, torch.full_like(position, ends.numel()))
    first = torch.full((c,), ends.numel(), dtype=torch.int64, device=device)
    first.scatter_reduce_(0, ye, hit, reduce="amin")

    global_threshold = _best_threshold(member, nonmember)
    thresholds = torch.full((c,), global_threshold, dtype=torch.float64, device=device)
    chosen = valid_c.nonzero().squeeze(1)
    thresholds[chosen] = s[ends[first[chosen]]].to(torch.float64)
    best = torch.where(valid_c, best, torch.full_like(best, math.nan))
    return ClassThresholds(thresholds, ~valid_c, global_threshold, best)


def transferred_threshold_attack(
    shadow_member_scores,
    shadow_member_labels,
    shadow_nonmember_scores,
    shadow_nonmember_labels,
    target_member_scores,
    target_member_labels,
    target_nonmember_scores,
    target_nonmember_labels,
    *,
    per_class: bool = True,
    num_classes: int | None = None,
) -> ThresholdAttackResult:
    """Thresholds fitted on shadow data, applied to the target (regime ``"transferred"``).

    ``per_class=True`` is Song & Mittal's attack (one threshold per class, see
    :func:`fit_class_thresholds`); ``per_class=False`` transfers the single best shadow threshold.
    Returns per-example predictions for the target members and non-members and their
    :func:`threshold_metrics`.
    """
    if per_class:
        fitted = fit_class_thresholds(
            shadow_member_scores,
            shadow_member_labels,
            shadow_nonmember_scores,
            shadow_nonmember_labels,
            num_classes=num_classes,
        )
        if num_classes is None:
            num_classes = fitted.thresholds.numel()
        target_member, target_nonmember = _prepare(target_member_scores, target_nonmember_scores)
        member_pred = fitted.predict(target_member, target_member_labels, name="target_member_labels")
        nonmember_pred = fitted.predict(target_nonmember, target_nonmember_labels, name="target_nonmember_labels")
        info = {
            "per_class": True,
            "n_classes": num_classes,
            "fallback_classes": fitted.fallback.nonzero().squeeze(1).tolist(),
            "global_threshold": fitted.global_threshold,
        }
        thresholds: torch.Tensor | float = fitted.thresholds
    else:
        shadow_member, shadow_nonmember = _prepare(shadow_member_scores, shadow_nonmember_scores)
        threshold = _best_threshold(shadow_member, shadow_nonmember)
        target_member, target_nonmember = _prepare(target_member_scores, target_nonmember_scores)
        member_pred, nonmember_pred = target_member >= threshold, target_nonmember >= threshold
        info = {"per_class": False}
        thresholds = threshold
    metrics = threshold_metrics(member_pred, nonmember_pred)
    return ThresholdAttackResult("transferred", member_pred, nonmember_pred, metrics, thresholds, info)
