"""Exact ROC metrics for membership inference, from one sort, on the scores' device.

Convention: a threshold ``t`` flags an example as a *member* when ``score >= t``; higher scores mean
"more likely a member". Examples with equal scores always move together across a threshold, so the ROC
has one point per distinct score (plus the origin, "flag nobody"). Sweeps that split ties, as many
privacy tools do when they rank with ``argsort``, overstate TPR at low FPR; this module never does.

How it works: the member and non-member scores are concatenated and sorted once, descending. The
cumulative member count along that order, read at the last position of every run of equal scores, gives
the true-positive count ``TP`` of every distinct threshold; ``FP`` is the position minus ``TP``. From these
integer counts:

* AUC is the trapezoidal area, which equals the Mann–Whitney statistic with ties counted ½, computed in
  exact integer arithmetic: ``Σ_groups ΔFP · (TP_before + TP_after) / (2 n₁ n₀)``;
* balanced accuracy ``max ½(TPR + 1 − FPR)`` and advantage ``max (TPR − FPR)`` are maxima over the points;
* TPR at FPR ``α`` uses the ``≤`` convention: the largest TPR among thresholds whose FPR ≤ α, found with
  ``torch.searchsorted`` on the (non-decreasing) FPR sequence; the achieved FPR and the threshold come with
  it (of the highest threshold reaching that TPR, i.e. the smallest FPR that does).

Everything after the sort is a handful of vectorised tensor ops: O(n log n) time, O(n) memory, no Python loop
over thresholds. Bootstrap replicates reuse the *same* sort: resampling with replacement only changes how many
copies of each example there are, so a replicate is a weighted cumulative sum along the existing order.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

from . import _checks

__all__ = ["roc_metrics", "roc_curve"]

_CI_LEVEL = 0.95
# bootstrap replicates are processed in chunks holding at most this many (replicate, example) weights
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


def _prepare(member_scores, nonmember_scores) -> tuple[torch.Tensor, torch.Tensor]:
    member = _checks.score_vector(member_scores, "member_scores")
    nonmember = _checks.score_vector(nonmember_scores, "nonmember_scores")
    _checks.same_device([member, nonmember], ["member_scores", "nonmember_scores"])
    dtype = torch.promote_types(member.dtype, nonmember.dtype)
    return member.to(dtype), nonmember.to(dtype)


class _SortedScores:
    """The one sort shared by every metric: order, member flags and the end of every tie group."""

    def __init__(self, member: torch.Tensor, nonmember: torch.Tensor):
        self.n1 = member.numel()
        self.n0 = nonmember.numel()
        scores = torch.cat([member, nonmember])
        n = scores.numel()
        self.sorted_scores, self.order = torch.sort(scores, descending=True)
        self.is_member = self.order < self.n1  # members occupy the first n1 slots of `scores`
        last_of_group = torch.ones(n, dtype=torch.bool, device=scores.device)
        last_of_group[:-1] = self.sorted_scores[1:] != self.sorted_scores[:-1]
        self.ends = last_of_group.nonzero().squeeze(1)

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(TP, FP)`` at the origin and after every tie group, int64 of shape ``(G + 1,)``."""
        tp = torch.cumsum(self.is_member.to(torch.int64), 0)[self.ends]
        fp = self.ends + 1 - tp
        zero = tp.new_zeros(1)
        return torch.cat([zero, tp]), torch.cat([zero, fp])

    def weighted_counts(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`counts` for ``B`` replicates: ``weights`` ``(B, n)`` copies of each *original* example."""
        w = weights[:, self.order]
        member_w = torch.where(self.is_member, w, torch.zeros_like(w))
        tp = torch.cumsum(member_w, 1)[:, self.ends]
        fp = torch.cumsum(w - member_w, 1)[:, self.ends]
        zero = tp.new_zeros(tp.shape[0], 1)
        return torch.cat([zero, tp], 1), torch.cat([zero, fp], 1)

    def thresholds(self) -> torch.Tensor:
        """The threshold of every ROC point; ``+inf`` stands for the origin ("flag nobody")."""
        inf = self.sorted_scores.new_full((1,), math.inf)
        return torch.cat([inf, self.sorted_scores[self.ends]])


def _metrics_from_counts(tp: torch.Tensor, fp: torch.Tensor, n1: int, n0: int, levels: torch.Tensor) -> dict:
    """Metrics of ROC points given as integer counts; works on ``(P,)`` or batched ``(B, P)`` inputs."""
    tpr = tp.to(torch.float64) / n1
    fpr = fp.to(torch.float64) / n0
    # Trapezoids between consecutive points, in exact integer arithmetic (≤ 2·n1·n0 fits in int64).
    twice_area = ((fp[..., 1:] - fp[..., :-1]) * (tp[..., 1:] + tp[..., :-1])).sum(-1)
    auc = twice_area.to(torch.float64) / (2.0 * n1 * n0)
    balanced, best = (0.5 * (tpr + 1.0 - fpr)).max(-1)
    advantage = (tpr - fpr).max(-1).values
    # Last point whose FPR <= level: FPR never decreases along the sweep, and neither does TPR, so the
    # last admissible point has the largest admissible TPR. Then step back to the first point with that
    # TPR: same TPR, smallest FPR, highest threshold (the efficient end of a flat stretch of the ROC).
    query = levels.expand(*fpr.shape[:-1], levels.numel()).contiguous()
    last = torch.searchsorted(fpr.contiguous(), query, right=True) - 1
    tp = tp.contiguous()
    at = torch.searchsorted(tp, tp.gather(-1, last))
    return {
        "auc": auc,
        "balanced_accuracy": balanced,
        "advantage": advantage,
        "best_index": best,
        "level_index": at,
        "tpr_at": tpr.gather(-1, at),
        "fpr_at": fpr.gather(-1, at),
    }


def _bootstrap(sorted_scores: _SortedScores, n_boot: int, levels: torch.Tensor, generator) -> dict:
    """Percentile intervals from ``n_boot`` stratified resamples (members and non-members resampled apart)."""
    n1, n0 = sorted_scores.n1, sorted_scores.n0
    n = n1 + n0
    device = sorted_scores.sorted_scores.device
    gen_device = generator.device if generator is not None else device
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    per_metric: dict[str, list[torch.Tensor]] = {"auc": [], "balanced_accuracy": [], "advantage": [], "tpr_at": []}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        draws_m = torch.randint(0, n1, (b, n1), generator=generator, device=gen_device).to(device)
        draws_n = torch.randint(0, n0, (b, n0), generator=generator, device=gen_device).to(device)
        weights = torch.zeros(b, n, dtype=torch.int64, device=device)
        weights[:, :n1].scatter_add_(1, draws_m, torch.ones_like(draws_m))
        weights[:, n1:].scatter_add_(1, draws_n, torch.ones_like(draws_n))
        tp, fp = sorted_scores.weighted_counts(weights)
        m = _metrics_from_counts(tp, fp, n1, n0, levels)
        for key in per_metric:
            per_metric[key].append(m[key])
        done += b
    alpha = (1.0 - _CI_LEVEL) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64, device=device)

    def interval(values: torch.Tensor) -> torch.Tensor:
        return torch.quantile(values, q, dim=0)

    tpr_ci = interval(torch.cat(per_metric["tpr_at"], 0)).cpu()
    ci = {
        "level": _CI_LEVEL,
        "n_bootstrap": n_boot,
        "method": "percentile, members and non-members resampled separately",
    }
    for key in ("auc", "balanced_accuracy", "advantage"):
        lo, hi = interval(torch.cat(per_metric[key])).tolist()
        ci[key] = (lo, hi)
    ci["tpr_at_fpr"] = {
        float(level): (float(tpr_ci[0, i]), float(tpr_ci[1, i])) for i, level in enumerate(levels.tolist())
    }
    return ci


def _best_threshold(member: torch.Tensor, nonmember: torch.Tensor) -> float:
    """The threshold maximising balanced accuracy (checked inputs; no orientation warning)."""
    s = _SortedScores(member, nonmember)
    tp, fp = s.counts()
    tpr, fpr = tp.to(torch.float64) / s.n1, fp.to(torch.float64) / s.n0
    return float(s.thresholds()[(0.5 * (tpr + 1.0 - fpr)).argmax()])


def roc_metrics(
    member_scores,
    nonmember_scores,
    fpr: float | Sequence[float] = (0.01, 0.001),
    bootstrap: int = 0,
    generator: torch.Generator | None = None,
) -> dict:
    """Exact, tie-aware ROC metrics of a membership score (higher = more likely a member).

    Args:
        member_scores: 1-D scores of the members (tensor or array-like; ±inf allowed, NaN is an error).
        nonmember_scores: 1-D scores of the non-members, on the same device.
        fpr: false-positive-rate level(s) strictly inside (0, 1) for ``tpr_at_fpr``.
        bootstrap: number of bootstrap replicates for 95 % percentile intervals (0 = none).
        generator: ``torch.Generator`` for the bootstrap draws (``None``: the global RNG, never re-seeded).

    Returns:
        A dict with ``auc`` (Mann–Whitney, ties ½), ``balanced_accuracy`` (max ½(TPR + 1 − FPR)),
        ``advantage`` (max TPR − FPR), ``best_threshold`` (the highest threshold reaching both maxima),
        ``tpr_at_fpr`` (``{level: {"tpr", "fpr", "threshold"}}``, ``≤`` convention, achieved FPR reported),
        ``n_members``, ``n_nonmembers`` and, with ``bootstrap > 0``, ``ci``. A threshold of ``+inf`` means
        "flag nobody". All numbers are Python floats/ints.

    Warns when the AUC is below 0.5: the scores probably have the wrong orientation.
    """
    levels_tuple = _checks.fpr_levels(fpr)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative int (number of replicates), got {bootstrap!r}")
    member, nonmember = _prepare(member_scores, nonmember_scores)
    device = member.device
    levels = torch.tensor(levels_tuple, dtype=torch.float64, device=device)

    s = _SortedScores(member, nonmember)
    tp, fp = s.counts()
    m = _metrics_from_counts(tp, fp, s.n1, s.n0, levels)
    thresholds = s.thresholds()

    tpr_at, fpr_at = m["tpr_at"].tolist(), m["fpr_at"].tolist()
    level_thresholds = thresholds[m["level_index"]].tolist()
    result = {
        "auc": float(m["auc"]),
        "balanced_accuracy": float(m["balanced_accuracy"]),
        "advantage": float(m["advantage"]),
        "best_threshold": float(thresholds[m["best_index"]]),
        "tpr_at_fpr": {
            level: {"tpr": tpr_at[i], "fpr": fpr_at[i], "threshold": level_thresholds[i]}
            for i, level in enumerate(levels_tuple)
        },
        "n_members": s.n1,
        "n_nonmembers": s.n0,
    }
    if result["auc"] < 0.5:
        warnings.warn(
            f"membership AUC is {result['auc']:.4f} < 0.5: the scores may have the wrong orientation "
            "(fastadv expects higher = more likely a member; negate loss-like signals)",
            stacklevel=2,
        )
    if bootstrap:
        result["ci"] = _bootstrap(s, bootstrap, levels, generator)
    return result


def roc_curve(member_scores, nonmember_scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact ROC at its breakpoints: ``(fpr, tpr, thresholds)``.

    One point per distinct score (flag as member when ``score >= threshold``), in decreasing threshold
    order, preceded by the origin with threshold ``+inf`` ("flag nobody"). ``fpr``/``tpr`` are float64,
    ``thresholds`` has the scores' dtype; all on the scores' device.
    """
    member, nonmember = _prepare(member_scores, nonmember_scores)
    s = _SortedScores(member, nonmember)
    tp, fp = s.counts()
    return fp.to(torch.float64) / s.n0, tp.to(torch.float64) / s.n1, s.thresholds()
