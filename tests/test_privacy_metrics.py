"""ROC engine of fastadv.privacy against independent references (brute force, scipy, analytic curves)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from fastadv.privacy import roc_curve, roc_metrics

LEVELS = (0.5, 0.25, 0.1, 0.01)


def brute_force(member, nonmember, levels):
    """Every candidate threshold enumerated; 'member' when score >= t; +inf stands for 'flag nobody'."""
    member = np.asarray(member, dtype=np.float64)
    nonmember = np.asarray(nonmember, dtype=np.float64)
    candidates = sorted(set(member.tolist()) | set(nonmember.tolist()), reverse=True)
    points = [(0.0, 0.0, math.inf)]  # (tpr, fpr, threshold) of "flag nobody"
    for t in candidates:
        points.append((float(np.mean(member >= t)), float(np.mean(nonmember >= t)), t))
    best_ba = max(0.5 * (tpr + 1.0 - fpr) for tpr, fpr, _ in points)
    best_t = max(t for tpr, fpr, t in points if 0.5 * (tpr + 1.0 - fpr) == best_ba)
    advantage = max(tpr - fpr for tpr, fpr, _ in points)
    at = {}
    for level in levels:
        admissible = [p for p in points if p[1] <= level]
        top = max(p[0] for p in admissible)
        chosen = min((p for p in admissible if p[0] == top), key=lambda p: p[1])
        at[level] = {"tpr": chosen[0], "fpr": chosen[1], "threshold": chosen[2]}
    return {"balanced_accuracy": best_ba, "best_threshold": best_t, "advantage": advantage, "tpr_at_fpr": at}


def mann_whitney_double_loop(member, nonmember):
    total = 0.0
    for a in member:
        for b in nonmember:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(member) * len(nonmember))


tied_scores = st.lists(st.integers(min_value=-3, max_value=3), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(member=tied_scores, nonmember=tied_scores)
def test_matches_brute_force_with_ties(member, nonmember):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random inputs may have AUC < 0.5
        got = roc_metrics(torch.tensor(member, dtype=torch.float32), torch.tensor(nonmember), fpr=LEVELS)
    ref = brute_force(member, nonmember, LEVELS)
    assert got["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-12)
    assert got["advantage"] == pytest.approx(ref["advantage"], abs=1e-12)
    assert got["best_threshold"] == ref["best_threshold"]
    assert got["auc"] == pytest.approx(mann_whitney_double_loop(member, nonmember), abs=1e-12)
    for level in LEVELS:
        assert got["tpr_at_fpr"][level] == pytest.approx(ref["tpr_at_fpr"][level], abs=1e-12)
        assert got["tpr_at_fpr"][level]["fpr"] <= level
    assert got["n_members"] == len(member) and got["n_nonmembers"] == len(nonmember)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_scipy_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    member = rng.integers(0, 20, size=3000) + (rng.random(3000) < 0.3)  # heavy ties, shifted up
    nonmember = rng.integers(0, 20, size=2000)
    u = sps.mannwhitneyu(member, nonmember, alternative="two-sided", method="asymptotic").statistic
    got = roc_metrics(torch.from_numpy(member), torch.from_numpy(nonmember))
    assert got["auc"] == pytest.approx(u / (member.size * nonmember.size), abs=1e-12)


def test_random_real_scores_with_infinities_match_brute_force():
    rng = np.random.default_rng(7)
    member = np.concatenate([rng.normal(0.5, 1, 200), [np.inf, np.inf, -np.inf]])
    nonmember = np.concatenate([rng.normal(0, 1, 150), [np.inf, -np.inf]])
    got = roc_metrics(torch.from_numpy(member), torch.from_numpy(nonmember), fpr=LEVELS)
    ref = brute_force(member, nonmember, LEVELS)
    assert got["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-12)
    assert got["auc"] == pytest.approx(mann_whitney_double_loop(member, nonmember), abs=1e-12)
    for level in LEVELS:
        assert got["tpr_at_fpr"][level]["tpr"] == pytest.approx(ref["tpr_at_fpr"][level]["tpr"], abs=1e-12)


def test_two_gaussians_match_the_analytic_roc():
    mu, n = 1.0, 200_000
    g = torch.Generator().manual_seed(0)
    member = torch.randn(n, generator=g, dtype=torch.float64) + mu
    nonmember = torch.randn(n, generator=g, dtype=torch.float64)
    got = roc_metrics(member, nonmember, fpr=(0.1, 0.01, 0.001))
    assert got["auc"] == pytest.approx(sps.norm.cdf(mu / math.sqrt(2.0)), abs=4e-3)
    # Equal-variance Gaussians: best balanced accuracy at the midpoint, Φ(μ/2).
    assert got["balanced_accuracy"] == pytest.approx(sps.norm.cdf(mu / 2.0), abs=4e-3)
    for level, tol in ((0.1, 0.01), (0.01, 0.01), (0.001, 0.005)):
        analytic = sps.norm.sf(sps.norm.isf(level) - mu)
        assert got["tpr_at_fpr"][level]["tpr"] == pytest.approx(analytic, abs=tol)
        assert got["tpr_at_fpr"][level]["fpr"] == pytest.approx(level, abs=2e-4)
    fpr, tpr, thresholds = roc_curve(member, nonmember)
    grid = np.linspace(0.01, 0.99, 50)
    idx = np.searchsorted(fpr.numpy(), grid, side="right") - 1
    assert np.max(np.abs(tpr.numpy()[idx] - sps.norm.sf(sps.norm.isf(grid) - mu))) < 0.01
    assert math.isinf(float(thresholds[0])) and fpr[0] == 0 and tpr[0] == 0
    assert fpr[-1] == 1 and tpr[-1] == 1


def test_roc_curve_points_are_exact_breakpoints():
    fpr, tpr, thr = roc_curve(torch.tensor([3.0, 2.0, 2.0, 1.0]), torch.tensor([2.0, 0.0]))
    assert thr.tolist()[1:] == [3.0, 2.0, 1.0, 0.0]
    assert tpr.tolist() == [0.0, 0.25, 0.75, 1.0, 1.0]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]


def test_ties_are_never_split():
    # All scores tied: the only points are (0, 0) and (1, 1); a tie-splitting sweep would report TPR > 0
    # at FPR 0 or a balanced accuracy above 1/2.
    got = roc_metrics(torch.ones(100), torch.ones(100), fpr=0.01)
    assert got["auc"] == 0.5
    assert got["balanced_accuracy"] == 0.5
    assert got["tpr_at_fpr"][0.01] == {"tpr": 0.0, "fpr": 0.0, "threshold": math.inf}


def test_wrong_orientation_warns():
    g = torch.Generator().manual_seed(1)
    member = torch.randn(500, generator=g) - 1.0
    nonmember = torch.randn(500, generator=g)
    with pytest.warns(UserWarning, match="wrong orientation"):
        roc_metrics(member, nonmember)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roc_metrics(-member, -nonmember)  # the right orientation does not warn


def test_bootstrap_intervals_contain_estimate_and_have_the_right_width():
    n1, n0 = 3000, 2000
    g = torch.Generator().manual_seed(2)
    member = torch.randn(n1, generator=g) + 0.8
    nonmember = torch.randn(n0, generator=g)
    got = roc_metrics(member, nonmember, fpr=(0.1, 0.01), bootstrap=400, generator=torch.Generator().manual_seed(3))
    ci = got["ci"]
    assert ci["level"] == 0.95 and ci["n_bootstrap"] == 400
    for key in ("auc", "balanced_accuracy", "advantage"):
        lo, hi = ci[key]
        assert lo < got[key] < hi
    for level in (0.1, 0.01):
        lo, hi = ci["tpr_at_fpr"][level]
        assert lo <= got["tpr_at_fpr"][level]["tpr"] <= hi and lo < hi
    # Hanley & McNeil's standard error of the AUC: the bootstrap interval should be ~ ±1.96 SE.
    a = got["auc"]
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    width = ci["auc"][1] - ci["auc"][0]
    assert 0.75 * 2 * 1.96 * se < width < 1.25 * 2 * 1.96 * se
    again = roc_metrics(member, nonmember, fpr=(0.1, 0.01), bootstrap=400, generator=torch.Generator().manual_seed(3))
    assert again["ci"] == ci  # the generator alone decides the draws


def test_result_types_are_plain_python():
    got = roc_metrics([0.1, 0.9, 0.8], np.array([0.2, 0.3]))
    assert all(isinstance(got[k], float) for k in ("auc", "balanced_accuracy", "advantage", "best_threshold"))
    assert isinstance(got["n_members"], int)


@pytest.mark.parametrize(
    "member, nonmember, kwargs, name",
    [
        (torch.tensor([]), torch.tensor([1.0]), {}, "member_scores"),
        (torch.tensor([1.0]), torch.tensor([]), {}, "nonmember_scores"),
        (torch.tensor([1.0, math.nan]), torch.tensor([1.0]), {}, "member_scores"),
        (torch.tensor([1.0]), torch.tensor([math.nan]), {}, "nonmember_scores"),
        (torch.ones(2, 2), torch.tensor([1.0]), {}, "member_scores"),
        (torch.tensor([1.0]), torch.tensor(1.0), {}, "nonmember_scores"),
        (torch.tensor([1.0]), torch.tensor([0.0]), {"fpr": 0.0}, "fpr"),
        (torch.tensor([1.0]), torch.tensor([0.0]), {"fpr": (0.01, 1.0)}, "fpr"),
        (torch.tensor([1.0]), torch.tensor([0.0]), {"fpr": -0.1}, "fpr"),
        (torch.tensor([1.0]), torch.tensor([0.0]), {"fpr": math.nan}, "fpr"),
        (torch.tensor([1.0]), torch.tensor([0.0]), {"bootstrap": -1}, "bootstrap"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(member, nonmember, kwargs, name):
    with pytest.raises(ValueError, match=name):
        roc_metrics(member, nonmember, **kwargs)
    if "fpr" not in kwargs and "bootstrap" not in kwargs:
        with pytest.raises(ValueError, match=name):
            roc_curve(member, nonmember)
