"""fastadv.evaluate: robust accuracy over datasets, confidence intervals and sanity checks.

``robust_accuracy(model, data, attacks)`` gives clean, per-attack and worst-case accuracy with Wilson
intervals over a tensor pair or a DataLoader, and warns (:class:`SanityWarning`) when the evaluation looks
unreliable: probability outputs, a randomised model, zero gradients, or an attack whose ε = 0 version
changes predictions.
"""

from .robust import Estimate, RobustAccuracyResult, robust_accuracy, wilson_interval
from .sanity import (
    SanityWarning,
    check_probabilities,
    check_randomness,
    check_zero_eps,
    check_zero_gradients,
    run_sanity_checks,
)

__all__ = [
    "Estimate",
    "RobustAccuracyResult",
    "SanityWarning",
    "check_probabilities",
    "check_randomness",
    "check_zero_eps",
    "check_zero_gradients",
    "robust_accuracy",
    "run_sanity_checks",
    "wilson_interval",
]
