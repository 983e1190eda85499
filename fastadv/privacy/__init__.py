"""Membership-inference evaluation (SPECS §4).

Orientation everywhere: **higher score = more likely a member**; a threshold flags a member when
``score >= threshold``. Every reported number states its threshold regime: ``oracle`` (threshold chosen
on the evaluated data: an upper bound), ``transferred`` (chosen on shadow data) or ``calibrated``
(LiRA / RMIA scores from reference models).

Typical use::

    from fastadv import privacy
    members = privacy.model_signals(model, (x_train, y_train))
    nonmembers = privacy.model_signals(model, (x_test, y_test))
    report = privacy.evaluate(members, nonmembers, out_dir="runs/mia")

Modules: :mod:`.signals` (per-example signals, model runner), :mod:`.metrics` (exact one-sort ROC
engine), :mod:`.attacks` (oracle and Song & Mittal transferred thresholds), :mod:`.lira`, :mod:`.rmia`,
:mod:`.report`, :mod:`.shadow` (reference models trained with any fastadv.train recipe, resumable).
"""

from __future__ import annotations

from .attacks import (
    ClassThresholds,
    ThresholdAttackResult,
    fit_class_thresholds,
    oracle_threshold_attack,
    threshold_metrics,
    transferred_threshold_attack,
)
from .lira import lira_scores, make_in_mask
from .metrics import roc_curve, roc_metrics
from .report import REGIMES, evaluate
from .rmia import rmia_scores
from .shadow import ReferenceModels, reference_statistics, train_reference_models
from .signals import SIGNALS, attack_config, compute_signals, model_signals, signal_scores

__all__ = [
    "SIGNALS",
    "REGIMES",
    "compute_signals",
    "signal_scores",
    "model_signals",
    "attack_config",
    "roc_metrics",
    "roc_curve",
    "threshold_metrics",
    "oracle_threshold_attack",
    "fit_class_thresholds",
    "transferred_threshold_attack",
    "ClassThresholds",
    "ThresholdAttackResult",
    "make_in_mask",
    "lira_scores",
    "rmia_scores",
    "evaluate",
    "ReferenceModels",
    "train_reference_models",
    "reference_statistics",
]
