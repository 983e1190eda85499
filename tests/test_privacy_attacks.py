"""Threshold attacks (oracle, Song & Mittal transferred), LiRA and RMIA against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from fastadv.privacy import (
    fit_class_thresholds,
    lira_scores,
    make_in_mask,
    oracle_threshold_attack,
    rmia_scores,
    roc_metrics,
    threshold_metrics,
    transferred_threshold_attack,
)

# --------------------------------------------------------------------------------------------- thresholds


def test_oracle_attack_predictions_reach_the_reported_balanced_accuracy():
    g = torch.Generator().manual_seed(0)
    member = torch.randint(0, 8, (300,), generator=g).float() + 1
    nonmember = torch.randint(0, 8, (200,), generator=g).float()
    result = oracle_threshold_attack(member, nonmember)
    assert result.regime == "oracle" and result.to_dict()["regime"] == "oracle"
    assert torch.equal(result.member_predictions, member >= result.thresholds)
    fixed = threshold_metrics(result.member_predictions, result.nonmember_predictions)
    assert fixed["balanced_accuracy"] == pytest.approx(result.metrics["balanced_accuracy"], abs=1e-12)
    assert fixed["advantage"] == pytest.approx(result.metrics["advantage"], abs=1e-12)


def brute_force_class_thresholds(ms, ml, ns, nl, num_classes):
    out = {}
    for c in range(num_classes):
        m, n = ms[ml == c], ns[nl == c]
        if m.size == 0 or n.size == 0:
            continue
        best = (-1.0, None)
        for t in sorted(set(m.tolist()) | set(n.tolist()), reverse=True):
            ba = 0.5 * (np.mean(m >= t) + np.mean(n < t))
            if ba > best[0]:
                best = (ba, t)
        out[c] = best
    return out


@pytest.mark.parametrize("seed", range(6))
def test_class_thresholds_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    c = 4
    ms, ml = rng.integers(0, 6, 80).astype(np.float64) + 1, rng.integers(0, c, 80)
    ns, nl = rng.integers(0, 6, 70).astype(np.float64), rng.integers(0, c, 70)
    if seed == 0:  # class 3 without shadow non-members: falls back to the global threshold
        ns, nl = ns[nl != 3], nl[nl != 3]
    fitted = fit_class_thresholds(
        torch.from_numpy(ms), torch.from_numpy(ml), torch.from_numpy(ns), torch.from_numpy(nl), num_classes=c
    )
    ref = brute_force_class_thresholds(ms, ml, ns, nl, c)
    global_t = roc_metrics(torch.from_numpy(ms), torch.from_numpy(ns))["best_threshold"]
    for k in range(c):
        if k in ref:
            assert not fitted.fallback[k]
            assert fitted.thresholds[k].item() == ref[k][1]
            assert fitted.shadow_balanced_accuracy[k].item() == pytest.approx(ref[k][0], abs=1e-12)
        else:
            assert fitted.fallback[k] and fitted.thresholds[k].item() == global_t
    assert fitted.global_threshold == global_t


def test_song_mittal_per_class_thresholds_transfer():
    # Class-dependent score levels: per class, non-members ~ N(3c, 1) and members ~ N(3c + 1, 1). The
    # best per-class threshold is 3c + 1/2 with balanced accuracy Φ(1/2); a single global threshold is
    # much worse because the classes overlap.
    g = torch.Generator().manual_seed(0)
    n, c = 4000, 5

    def draw(shift):
        labels = torch.randint(0, c, (n,), generator=g)
        return torch.randn(n, generator=g, dtype=torch.float64) + 3.0 * labels + shift, labels

    shadow = (*draw(1.0), *draw(0.0))
    target = (*draw(1.0), *draw(0.0))
    result = transferred_threshold_attack(*shadow, *target)
    assert result.regime == "transferred"
    assert result.member_predictions.shape == (n,) and result.member_predictions.dtype == torch.bool
    expected = sps.norm.cdf(0.5)
    assert result.metrics["balanced_accuracy"] == pytest.approx(expected, abs=0.02)
    thresholds = result.thresholds
    assert torch.allclose(thresholds, 3.0 * torch.arange(c, dtype=torch.float64) + 0.5, atol=0.35)
    single = transferred_threshold_attack(*shadow, *target, per_class=False)
    assert single.regime == "transferred"
    assert single.metrics["balanced_accuracy"] < result.metrics["balanced_accuracy"] - 0.05
    payload = result.to_dict()
    assert payload["regime"] == "transferred" and len(payload["thresholds"]) == c


def test_threshold_attack_bad_labels():
    with pytest.raises(ValueError, match="member_labels"):
        fit_class_thresholds(torch.ones(3), torch.tensor([0, 1]), torch.zeros(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="nonmember_labels"):
        fit_class_thresholds(torch.ones(2), torch.tensor([0, 1]), torch.zeros(2), torch.tensor([0, -1]))


# --------------------------------------------------------------------------------------------------- LiRA


def synthetic_lira(m=16, n=600, a=2, shift=2.0, noise=0.5, seed=0):
    """Per-example difficulty μ_n, membership shift, Gaussian noise; a known membership matrix."""
    g = torch.Generator().manual_seed(seed)
    difficulty = torch.randn(n, 1, generator=g, dtype=torch.float64) * 2.0
    in_mask = make_in_mask(m, n, generator=g)
    stats = difficulty + shift * in_mask.double().unsqueeze(-1) + noise * torch.randn(m, n, a, generator=g, dtype=torch.float64)
    target_member = torch.rand(n, generator=g) < 0.5
    target = difficulty + shift * target_member.double().unsqueeze(-1) + noise * torch.randn(n, a, generator=g, dtype=torch.float64)
    return stats, in_mask, target, target_member


def test_make_in_mask_is_balanced():
    mask = make_in_mask(8, 1000, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (8, 1000)
    assert torch.all(mask.sum(0) == 4)
    assert 0.4 < mask.float().mean(1).min() and mask.float().mean(1).max() < 0.6


def test_lira_separates_members_on_synthetic_data():
    stats, in_mask, target, member = synthetic_lira()
    aucs = {}
    for online in (True, False):
        for fixed in (False, True):
            scores = lira_scores(stats, in_mask, target, online=online, fixed_variance=fixed)
            assert scores.shape == (600,) and scores.dtype == torch.float64 and torch.isfinite(scores).all()
            aucs[online, fixed] = roc_metrics(scores[member], scores[~member])["auc"]
    raw = roc_metrics(target.mean(1)[member], target.mean(1)[~member])["auc"]
    assert min(aucs.values()) > 0.9
    assert raw < 0.85  # per-example calibration is what makes the attack strong here
    assert aucs[True, False] >= aucs[False, False] - 0.02
    assert aucs[True, True] >= aucs[False, True] - 0.02


def test_lira_matches_scipy_gaussians():
    stats, in_mask, target, _ = synthetic_lira(m=6, n=20, a=2, seed=1)
    s, mask, t = stats.numpy(), in_mask.numpy(), target.numpy()
    online = np.zeros(20)
    offline = np.zeros(20)
    for j in range(20):
        for k in range(2):
            x_in, x_out = s[mask[:, j], j, k], s[~mask[:, j], j, k]
            mi, si = x_in.mean(), x_in.std(ddof=1)
            mo, so = x_out.mean(), x_out.std(ddof=1)
            online[j] += (sps.norm.logpdf(t[j, k], mi, si) - sps.norm.logpdf(t[j, k], mo, so)) / 2
            offline[j] += sps.norm.logcdf(t[j, k], mo, so) / 2
    np.testing.assert_allclose(lira_scores(stats, in_mask, target).numpy(), online, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        lira_scores(stats, in_mask, target, online=False).numpy(), offline, rtol=1e-9, atol=1e-9
    )
    # Pooled variance: within-example squared deviations over pooled degrees of freedom, per augmentation.
    pooled_in = np.zeros(2)
    pooled_out = np.zeros(2)
    for k in range(2):
        ss_in = sum(((s[mask[:, j], j, k] - s[mask[:, j], j, k].mean()) ** 2).sum() for j in range(20))
        ss_out = sum(((s[~mask[:, j], j, k] - s[~mask[:, j], j, k].mean()) ** 2).sum() for j in range(20))
        pooled_in[k] = math.sqrt(ss_in / sum(mask[:, j].sum() - 1 for j in range(20)))
        pooled_out[k] = math.sqrt(ss_out / sum((~mask[:, j]).sum() - 1 for j in range(20)))
    fixed = np.zeros(20)
    for j in range(20):
        for k in range(2):
            mi, mo = s[mask[:, j], j, k].mean(), s[~mask[:, j], j, k].mean()
            fixed[j] += (sps.norm.logpdf(t[j, k], mi, pooled_in[k]) - sps.norm.logpdf(t[j, k], mo, pooled_out[k])) / 2
    np.testing.assert_allclose(
        lira_scores(stats, in_mask, target, fixed_variance=True).numpy(), fixed, rtol=1e-9, atol=1e-9
    )


def test_lira_offline_is_stable_in_the_tail():
    stats = torch.zeros(4, 1).double() + torch.tensor([[-1.0], [1.0], [-1.0], [1.0]], dtype=torch.float64)
    score = lira_scores(stats, None, torch.tensor([-60.0]), online=False)
    # log Φ(−60/σ) with σ = sqrt(4/3): finite, close to the asymptotic −x²/2 − log(x√(2π)).
    x = 60.0 / math.sqrt(4.0 / 3.0)
    assert torch.isfinite(score).all()
    assert score.item() == pytest.approx(-x * x / 2 - math.log(x * math.sqrt(2 * math.pi)), rel=1e-3)


def test_lira_too_few_reference_models():
    stats = torch.randn(2, 5, dtype=torch.float64)
    in_mask = torch.tensor([[True] * 5, [False] * 5])
    target = torch.randn(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"at least 2 OUT reference model.*5 example\(s\).*fixed_variance=True"):
        lira_scores(stats, in_mask, target)
    with pytest.raises(ValueError, match="at least 2 OUT"):
        lira_scores(stats, in_mask, target, online=False)
    stats4 = torch.randn(4, 5, dtype=torch.float64)
    mask4 = torch.tensor([[True] * 5, [False] * 5, [False] * 5, [False] * 5])
    with pytest.raises(ValueError, match="at least 2 IN"):
        lira_scores(stats4, mask4, target)
    with pytest.raises(ValueError, match="2 or more IN"):
        lira_scores(stats4, mask4, target, fixed_variance=True)
    mask_some = mask4.clone()
    mask_some[1, 0] = True
    assert torch.isfinite(lira_scores(stats4, mask_some, target, fixed_variance=True)).all()
    with pytest.raises(ValueError, match="at least 1 IN"):
        lira_scores(stats4, torch.zeros(4, 5, dtype=torch.bool), target, fixed_variance=True)


def test_lira_shape_errors():
    stats = torch.randn(4, 5, dtype=torch.float64)
    mask = make_in_mask(4, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="target_stats"):
        lira_scores(stats, mask, torch.randn(6))
    with pytest.raises(ValueError, match="in_mask"):
        lira_scores(stats, mask[:, :4], torch.randn(5))
    with pytest.raises(ValueError, match="stats"):
        lira_scores(torch.randn(5), mask, torch.randn(5))
    with pytest.raises(ValueError, match="stats"):
        lira_scores(stats.clone().fill_(math.nan), mask, torch.randn(5))
    with pytest.raises(ValueError, match="in_mask is required"):
        lira_scores(stats, None, torch.randn(5))


# --------------------------------------------------------------------------------------------------- RMIA


def rmia_inputs(n=50, z=70, m=4, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    px = torch.rand(n, generator=g, dtype=torch.float64)
    pz = torch.rand(z, generator=g, dtype=torch.float64)
    rx = torch.rand(m, n, generator=g, dtype=torch.float64)
    rz = torch.rand(m, z, generator=g, dtype=torch.float64)
    if ties:  # quantised probabilities: many equal ratios, and ratios exactly at γ = 1
        px, pz, rx, rz = (torch.round(t * 4) / 4 + 0.25 for t in (px, pz, rx, rz))
        pz[:10] = px[:10]
        rz[:, :10] = rx[:, :10]
    return px, pz, rx, rz


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("offline", [True, False])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("ties", [False, True])
def test_rmia_sort_equals_dense_exactly(seed, offline, gamma, ties):
    args = rmia_inputs(seed=seed, ties=ties)
    sort_based = rmia_scores(*args, offline=offline, gamma=gamma)
    dense = rmia_scores(*args, offline=offline, gamma=gamma, dense=True)
    assert torch.equal(sort_based, dense)


def test_rmia_sort_equals_dense_at_the_floating_point_boundary():
    # Choose γ as the exact computed ratio between a target and population points: the pairs sit on the
    # boundary of the test, where comparing r_z <= r_x / γ instead of r_x / r_z >= γ would go wrong.
    px, pz, rx, rz = rmia_inputs(n=200, z=300, seed=5)
    p_x = 0.5 * ((1 + 0.3) * rx.mean(0) + (1 - 0.3))
    r_x, r_z = px / p_x, pz / rz.mean(0)
    for i in range(60):
        gamma = float(r_x[i] / r_z[i])
        assert torch.equal(
            rmia_scores(px, pz, rx, rz, gamma=gamma), rmia_scores(px, pz, rx, rz, gamma=gamma, dense=True)
        )


def test_rmia_matches_a_python_double_loop():
    px, pz, rx, rz = rmia_inputs(n=12, z=15, m=3, seed=3)
    a, gamma = 0.4, 1.0
    expected = []
    for i in range(12):
        p_x = 0.5 * ((1 + a) * float(rx[:, i].mean()) + (1 - a))
        hits = 0
        for j in range(15):
            p_z = float(rz[:, j].mean())
            hits += (float(px[i]) / p_x) / (float(pz[j]) / p_z) >= gamma
        expected.append(hits / 15)
    assert rmia_scores(px, pz, rx, rz, a=a, gamma=gamma).tolist() == pytest.approx(expected, abs=1e-12)


def test_rmia_zero_probabilities():
    px = torch.tensor([0.0, 0.5], dtype=torch.float64)
    pz = torch.tensor([0.0, 0.2, 0.9], dtype=torch.float64)
    rx = torch.full((2, 2), 0.5, dtype=torch.float64)
    rz = torch.full((2, 3), 0.5, dtype=torch.float64)
    assert torch.equal(rmia_scores(px, pz, rx, rz), rmia_scores(px, pz, rx, rz, dense=True))
    assert rmia_scores(px, pz, rx, rz)[0] == 0.0


def test_rmia_members_score_higher():
    g = torch.Generator().manual_seed(0)
    n, z, m = 400, 1000, 4
    hardness_x = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1
    member = torch.rand(n, generator=g) < 0.5
    px = torch.where(member, (hardness_x + 0.15).clamp(max=1.0), hardness_x)
    rx = (hardness_x + 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)).clamp(0.01, 1.0)
    pz = torch.rand(z, generator=g, dtype=torch.float64) * 0.8 + 0.1
    rz = (pz + 0.05 * torch.randn(m, z, generator=g, dtype=torch.float64)).clamp(0.01, 1.0)
    # The reference models here play OUT models, so the offline correction with a large `a` fits best.
    raw = roc_metrics(px[member], px[~member])["auc"]
    scores = rmia_scores(px, pz, rx, rz, a=0.6)
    assert raw < 0.7
    assert roc_metrics(scores[member], scores[~member])["auc"] > 0.9


def test_rmia_bad_inputs():
    px, pz, rx, rz = rmia_inputs(n=5, z=6, m=2)
    with pytest.raises(ValueError, match="ref_target_probs"):
        rmia_scores(px, pz, rx[:, :4], rz)
    with pytest.raises(ValueError, match="ref_population_probs"):
        rmia_scores(px, pz, rx, rz[:, :5])
    with pytest.raises(ValueError, match="gamma"):
        rmia_scores(px, pz, rx, rz, gamma=0.0)
    with pytest.raises(ValueError, match="a must"):
        rmia_scores(px, pz, rx, rz, a=1.5)
    with pytest.raises(ValueError, match="target_probs"):
        rmia_scores(-px, pz, rx, rz)
    with pytest.raises(ValueError, match="population_probs"):
        rmia_scores(px, pz.reshape(2, 3), rx, rz)
