"""LiRA: the likelihood-ratio membership attack from reference models (Carlini et al., 2022).

For each example, the statistic (the scaled logit, :func:`fastadv.privacy.signals.compute_signals`) of
reference models trained *with* it (IN) and *without* it (OUT) is modelled by a Gaussian per example.

* **online**: score = ``log N(t; μ_in, σ_in²) − log N(t; μ_out, σ_out²)`` for the target model's statistic ``t``.
* **offline**: one-sided test against the OUT Gaussian only, score = ``log Φ((t − μ_out) / σ_out)``
  (``torch.special.log_ndtr``: finite and accurate far in the tail, where ``Φ`` itself underflows).
  Needs only OUT models, so the reference models can be trained once, without any target example.
* **fixed_variance**: σ_in and σ_out are each pooled over all examples (the within-example variances
  averaged with their degrees of freedom), which is far more stable when there are few reference models.
  Note that this is the pooled *within-example* spread; the LiRA reference code instead takes the standard
  deviation of all IN (OUT) statistics together, which also counts how much the per-example means differ.

With several augmentations (statistics of shape ``(M, N, A)``, e.g. the image and its flip), each
augmentation has its own Gaussians and the per-augmentation scores are averaged.
Higher score = more likely a member. Scores are "calibrated" in the threshold-regime vocabulary of
:mod:`fastadv.privacy`.
"""

from __future__ import annotations

import math

import torch

from . import _checks

__all__ = ["make_in_mask", "lira_scores"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def make_in_mask(
    n_models: int,
    n_examples: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random ``(n_models, n_examples)`` boolean membership matrix for training reference models.

    Every example is IN for exactly ``n_models // 2`` models (chosen uniformly at random per example),
    the split LiRA and RMIA assume. Draws from ``generator`` (``None``: the global RNG, never re-seeded).
    """
    for value, name in ((n_models, "n_models"), (n_examples, "n_examples")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    gen_device = generator.device if generator is not None else (device or "cpu")
    keys = torch.rand(n_models, n_examples, generator=generator, device=gen_device)
    rank = keys.argsort(0).argsort(0)  # a uniformly random permutation of the models per example
    return (rank < n_models // 2).to(device or gen_device)


def _check_inputs(stats, in_mask, target_stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    stats = _checks.as_tensor(stats, "stats")
    target = _checks.as_tensor(target_stats, "target_stats")
    if stats.dim() not in (2, 3):
        raise ValueError(f"stats must have shape (M, N) or (M, N, A), got {tuple(stats.shape)}")
    squeeze = stats.dim() == 2
    if squeeze:
        stats = stats.unsqueeze(-1)
    m, n, a = stats.shape
    if m == 0 or n == 0 or a == 0:
        raise ValueError(f"stats must be non-empty, got shape {tuple(stats.shape[: 2 if squeeze else 3])}")
    expected = (n,) if squeeze else (n, a)
    if tuple(target.shape) != expected:
        raise ValueError(f"target_stats must have shape {expected} to match stats, got {tuple(target.shape)}")
    if in_mask is None:
        mask = torch.zeros(m, n, dtype=torch.bool, device=stats.device)
    else:
        mask = _checks.as_tensor(in_mask, "in_mask")
        if tuple(mask.shape) != (m, n):
            raise ValueError(f"in_mask must have shape {(m, n)} to match stats, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("in_mask must be boolean (or 0/1 integers)")
            mask = mask.bool()
    _checks.same_device([stats, target, mask], ["stats", "target_stats", "in_mask"])
    for t, name in ((stats, "stats"), (target, "target_stats")):
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf values")
    target = target.to(torch.float64).reshape(n, a)
    return stats.to(torch.float64), mask, target, squeeze


def _gaussian_fit(stats: torch.Tensor, weight: torch.Tensor, fixed_variance: bool):
    """Per-example mean and variance of the statistics selected by ``weight`` (M, N, 1 of 0/1)."""
    count = weight.sum(0)  # (N, 1)
    mean = (weight * stats).sum(0) / count.clamp_min(1.0)
    sq = (weight * (stats - mean) ** 2).sum(0)  # (N, A)
    if fixed_variance:
        dof = (count - 1.0).clamp_min(0.0).sum(0)  # pooled degrees of freedom
        var = (sq.sum(0) / dof).expand_as(sq)
    else:
        var = sq / (count - 1.0)
    return mean, var


def _require(count: torch.Tensor, needed: int, what: str, mode: str, hint: str) -> None:
    short = (count < needed).nonzero().squeeze(1)
    if short.numel():
        first = int(short[0])
        raise ValueError(
            f"LiRA ({mode}) needs at least {needed} {what} reference model(s) per example; "
            f"{short.numel()} example(s) have fewer (e.g. example {first} has {int(count[first])}). "
            f"Train more reference models{hint}."
        )


def lira_scores(
    stats,
    in_mask,
    target_stats,
    *,
    online: bool = True,
    fixed_variance: bool = False,
    min_std: float = 1e-6,
) -> torch.Tensor:
    """LiRA membership scores (higher = member), float64 of shape ``(N,)``.

    Args:
        stats: reference-model statistics ``(M, N)`` or ``(M, N, A)`` (A augmentations), typically
            scaled logits.
        in_mask: boolean ``(M, N)``: ``in_mask[m, n]`` is True when reference model ``m`` trained on
            example ``n``. For ``online=False`` only OUT statistics are used and ``None`` means "all OUT".
        target_stats: the target model's statistics ``(N,)`` or ``(N, A)``.
        online: online likelihood ratio (needs IN and OUT models) or offline one-sided test.
        fixed_variance: pool the variance over examples (recommended below ~64 reference models).
        min_std: floor on the fitted standard deviations (guards against constant statistics).

    Raises:
        ValueError: on shape/device mismatch, non-finite statistics, or when an example has too few IN or
            OUT models: per-example variances need 2 of each (online) or 2 OUT (offline); with
            ``fixed_variance`` 1 suffices, and at least one example must have 2 for the pooled estimate.
    """
    if online and in_mask is None:
        raise ValueError("in_mask is required for online LiRA (it says which reference models are IN)")
    if not (min_std > 0.0):
        raise ValueError(f"min_std must be positive, got {min_std!r}")
    stats, mask, target, _ = _check_inputs(stats, in_mask, target_stats)
    m = stats.shape[0]
    w_in = mask.to(torch.float64).unsqueeze(-1)
    w_out = 1.0 - w_in
    n_in = mask.sum(0)
    n_out = m - n_in
    mode = ("online" if online else "offline") + (", fixed variance" if fixed_variance else "")
    needed = 1 if fixed_variance else 2
    hint = "" if fixed_variance else ", or use fixed_variance=True"
    _require(n_out, needed, "OUT", mode, hint)
    if online:
        _require(n_in, needed, "IN", mode, hint)
    if fixed_variance:
        if not bool((n_out >= 2).any()):
            raise ValueError(
                "LiRA with fixed_variance needs at least one example with 2 or more OUT reference models "
                "to estimate the pooled variance"
            )
        if online and not bool((n_in >= 2).any()):
            raise ValueError(
                "LiRA with fixed_variance needs at least one example with 2 or more IN reference models "
                "to estimate the pooled variance"
            )

    mu_out, var_out = _gaussian_fit(stats, w_out, fixed_variance)
    std_out = var_out.sqrt().clamp_min(min_std)
    if not online:
        return torch.special.log_ndtr((target - mu_out) / std_out).mean(-1)
    mu_in, var_in = _gaussian_fit(stats, w_in, fixed_variance)
    std_in = var_in.sqrt().clamp_min(min_std)

    def log_pdf(t, mu, std):
        return -0.5 * ((t - mu) / std) ** 2 - torch.log(std) - _HALF_LOG_2PI

    return (log_pdf(target, mu_in, std_in) - log_pdf(target, mu_out, std_out)).mean(-1)
