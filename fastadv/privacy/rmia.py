"""RMIA: the relative membership-inference attack (Zarifzadeh et al., ICML 2024).

With ``p(x|θ)`` the target model's probability of ``x``'s true label and ``p(x)`` its average over
reference models, the score of a target example ``x`` against a population ``Z`` is

    score(x) = |{z ∈ Z : (p(x|θ)/p(x)) / (p(z|θ)/p(z)) ≥ γ}| / |Z|.

``p(x)`` is the mean over the reference models (online: half of them trained on ``x``). Offline, all
reference models are OUT for ``x`` and the IN half is approximated linearly:
``p(x) ≈ ½((1 + a)·p_OUT(x) + (1 − a))`` with the dataset-dependent parameter ``a`` (the paper calibrates it
on one extra reference model). Population points are never in a reference model's training set, so
``p(z)`` is always the plain mean over the reference models.

The score only needs, for each target, the number of population ratios ``r_z = p(z|θ)/p(z)`` that pass the
test, and the test is monotone in ``r_z``. So the population ratios are sorted once and each target is
answered with one ``torch.searchsorted``: O((|X| + |Z|) log |Z|) time and O(|X| + |Z|) memory, instead of the
|X|×|Z| likelihood-ratio matrix (``dense=True`` keeps that path for testing and benchmarking).
To make both paths agree *exactly* in floating point, the sort path does not compare with ``r_x/γ``
directly: it finds, per target, the largest float ``b`` that still satisfies the floating-point test
``r_x / b ≥ γ`` (a few ``nextafter`` steps away from ``r_x/γ``), and counts ``r_z ≤ b``.
Higher score = member; scores are "calibrated" in the threshold-regime vocabulary of :mod:`fastadv.privacy`.
"""

from __future__ import annotations

import math

import torch

from . import _checks

__all__ = ["rmia_scores"]

_MAX_REFINE_STEPS = 64


def _probabilities(x, name: str, dims: int) -> torch.Tensor:
    x = _checks.as_tensor(x, name)
    if x.dim() != dims:
        shape = "(N,)" if dims == 1 else "(M, N)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold real probabilities, got dtype {x.dtype}")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    return x


def _largest_passing(r_x: torch.Tensor, gamma: float) -> torch.Tensor:
    """For each positive ``r_x``, the largest float ``b >= 0`` with ``r_x / b >= gamma`` (as computed)."""
    # `r_x / b` is monotone non-increasing in b (IEEE division is correctly rounded), and b = 0 passes
    # (r_x / 0 = inf), so the passing set is [0, b*]. Start from r_x / γ, which is within a few ulps of b*.
    b = r_x / gamma
    down, up = torch.tensor(-math.inf, dtype=b.dtype, device=b.device), torch.tensor(math.inf, dtype=b.dtype, device=b.device)
    for _ in range(_MAX_REFINE_STEPS):
        failing = ~(r_x / b >= gamma)
        if not bool(failing.any()):
            break
        b = torch.where(failing, torch.nextafter(b, down), b)
    else:  # pragma: no cover - guarded by the rounding analysis above
        raise RuntimeError("RMIA threshold refinement did not converge")
    for _ in range(_MAX_REFINE_STEPS):
        bigger = torch.nextafter(b, up)
        passing = r_x / bigger >= gamma
        if not bool(passing.any()):
            break
        b = torch.where(passing, bigger, b)
    else:  # pragma: no cover
        raise RuntimeError("RMIA threshold refinement did not converge")
    return b


def rmia_scores(
    target_probs,
    population_probs,
    ref_target_probs,
    ref_population_probs,
    *,
    offline: bool = True,
    a: float = 0.3,
    gamma: float = 1.0,
    dense: bool = False,
) -> torch.Tensor:
    """RMIA scores in [0, 1] (higher = member), float64 of shape ``(N,)``.

    Args:
        target_probs: ``p(x|θ)`` of the target model for the N target examples ``(N,)``.
        population_probs: ``p(z|θ)`` of the target model for the Z population examples ``(Z,)``.
        ref_target_probs: ``(M, N)`` the same probability under each of the M reference models.
        ref_population_probs: ``(M, Z)``.
        offline: reference models are all OUT for the targets and ``p(x)`` uses the linear approximation
            with ``a``; ``offline=False`` averages the (mixed IN/OUT) reference models directly.
        a: offline parameter in [0, 1] (ignored online). The paper tunes it per dataset.
        gamma: likelihood-ratio threshold γ > 0.
        dense: build the |X|×|Z| likelihood-ratio matrix instead of sorting (quadratic memory; for tests
            and benchmarks). Both paths return identical values.
    """
    px = _probabilities(target_probs, "target_probs", 1)
    pz = _probabilities(population_probs, "population_probs", 1)
    ref_x = _probabilities(ref_target_probs, "ref_target_probs", 2)
    ref_z = _probabilities(ref_population_probs, "ref_population_probs", 2)
    _checks.same_device(
        [px, pz, ref_x, ref_z], ["target_probs", "population_probs", "ref_target_probs", "ref_population_probs"]
    )
    if ref_x.shape != (ref_z.shape[0], px.numel()):
        raise ValueError(
            f"ref_target_probs must have shape (M, N) = ({ref_z.shape[0]}, {px.numel()}), got {tuple(ref_x.shape)}"
        )
    if ref_z.shape[1] != pz.numel():
        raise ValueError(
            f"ref_population_probs must have shape (M, Z) = ({ref_x.shape[0]}, {pz.numel()}), "
            f"got {tuple(ref_z.shape)}"
        )
    if not (isinstance(gamma, (int, float)) and gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    if offline and not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
        raise ValueError(f"a must lie in [0, 1], got {a!r}")

    mean_x = ref_x.mean(0)
    p_x = 0.5 * ((1.0 + a) * mean_x + (1.0 - a)) if offline else mean_x
    p_z = ref_z.mean(0)
    if bool((p_x <= 0).any()):
        raise ValueError("ref_target_probs: the reference probability p(x) is 0 for some target; cannot form p(x|θ)/p(x)")
    if bool((p_z <= 0).any()):
        raise ValueError("ref_population_probs: the mean reference probability is 0 for some population point")
    r_x = px / p_x
    r_z = pz / p_z
    n_pop = r_z.numel()

    if dense:
        counts = (r_x[:, None] / r_z[None, :] >= gamma).sum(1)
        return counts.to(torch.float64) / n_pop

    sorted_r_z = torch.sort(r_z).values
    positive = r_x > 0  # r_x = 0 passes against no population point (0/r = 0 < γ, 0/0 = NaN)
    bound = _largest_passing(torch.where(positive, r_x, torch.ones_like(r_x)), float(gamma))
    counts = torch.searchsorted(sorted_r_z, bound, right=True)
    counts = torch.where(positive, counts, torch.zeros_like(counts))
    return counts.to(torch.float64) / n_pop
