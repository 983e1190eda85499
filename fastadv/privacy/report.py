"""One membership-inference report: metrics per signal, each labelled with its threshold regime.

Threshold regimes (SPECS §4), stated next to every number:

* ``oracle`` — threshold chosen on the evaluated data itself (an upper bound, not a deployable attack);
* ``transferred`` — thresholds chosen on shadow data and applied unchanged (Song & Mittal);
* ``calibrated`` — per-example calibrated scores from reference models (LiRA, RMIA); their TPR-at-FPR and
  balanced accuracy still sweep the threshold on the evaluated scores, as the LiRA and RMIA papers report.

AUC does not depend on a threshold, but it is labelled with the regime of the scores it summarises.
"""

from __future__ import annotations

import json
import math
import os
import platform
import warnings
from typing import Mapping, Sequence

import torch

from . import _checks
from .metrics import roc_curve, roc_metrics

__all__ = ["REGIMES", "evaluate"]

REGIMES: tuple[str, ...] = ("oracle", "transferred", "calibrated")
_REGIME_DESCRIPTIONS = {
    "oracle": "threshold chosen on the evaluated data (upper bound)",
    "transferred": "thresholds chosen on shadow data, applied unchanged",
    "calibrated": "scores calibrated per example with reference models (LiRA/RMIA); threshold swept",
}


def _json_safe(value):
    """Plain JSON values: tensors to lists, tuples to lists, non-finite floats to strings, keys to str."""
    if isinstance(value, torch.Tensor):
        return _json_safe(value.detach().cpu().tolist())
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    return str(value)


def _regime_of(regime, name: str) -> str:
    value = regime.get(name, "oracle") if isinstance(regime, Mapping) else regime
    if value not in REGIMES:
        raise ValueError(f"regime for {name!r} must be one of {', '.join(REGIMES)}, got {value!r}")
    return value


def _rows(signal: str, regime: str, metrics: Mapping) -> list[dict]:
    rows = [
        {"signal": signal, "metric": key, "value": metrics[key], "regime": regime}
        for key in ("auc", "balanced_accuracy", "advantage")
    ]
    for level, entry in metrics["tpr_at_fpr"].items():
        rows.append(
            {
                "signal": signal,
                "metric": f"tpr_at_fpr={level:g}",
                "value": entry["tpr"],
                "achieved_fpr": entry["fpr"],
                "threshold": entry["threshold"],
                "regime": regime,
            }
        )
    return rows


def _plot(curves: Mapping[str, tuple], out_dir: str, fpr_levels: Sequence[float]) -> dict[str, str]:
    # Imported lazily (matplotlib is slow to import and optional). Figures are drawn on an Agg canvas
    # directly, without pyplot, so the caller's global backend and figure state are left untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = {}
    for kind in ("linear", "loglog"):
        fig = Figure(figsize=(5.5, 5.0))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        smallest = 1.0
        for label, (fpr, tpr, regime, auc) in curves.items():
            fpr_np, tpr_np = fpr.cpu().numpy(), tpr.cpu().numpy()
            text = f"{label} [{regime}] AUC={auc:.3f}"
            if kind == "loglog":
                keep = (fpr_np > 0) & (tpr_np > 0)
                if keep.any():
                    smallest = min(smallest, float(fpr_np[keep].min()))
                    ax.plot(fpr_np[keep], tpr_np[keep], label=text, drawstyle="steps-post")
            else:
                ax.plot(fpr_np, tpr_np, label=text)
        if kind == "loglog":
            lo = min(smallest, min(fpr_levels, default=1.0)) / 2.0
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, 1.0)
            ax.set_ylim(lo, 1.0)
            ax.plot([lo, 1.0], [lo, 1.0], color="grey", linestyle="--", linewidth=0.8, label="chance")
            for level in fpr_levels:
                ax.axvline(level, color="lightgrey", linewidth=0.6)
        else:
            ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"Membership inference ROC ({'log-log' if kind == 'loglog' else 'linear'})")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = os.path.join(out_dir, f"roc_{kind}.png")
        fig.savefig(path, dpi=120)
        paths[kind] = path
    return paths


def evaluate(
    member_scores_by_signal: Mapping[str, object],
    nonmember_scores_by_signal: Mapping[str, object],
    out_dir: str | os.PathLike | None = None,
    *,
    regime: str | Mapping[str, str] = "oracle",
    fpr: float | Sequence[float] = (0.01, 0.001),
    bootstrap: int = 0,
    generator: torch.Generator | None = None,
    extra_results: Mapping[str, Mapping] | None = None,
    metadata: Mapping | None = None,
    plots: bool = True,
) -> dict:
    """Evaluate membership scores per signal and assemble one JSON-serialisable report.

    Args:
        member_scores_by_signal: ``{signal name: member scores}`` (higher = member), e.g. the dict of
            :func:`~fastadv.privacy.model_signals` on the members, or ``{"lira": lira_scores(...)}``.
        nonmember_scores_by_signal: the same keys for the non-members.
        out_dir: when given, ``mia.json`` and ``roc_linear.png`` / ``roc_loglog.png`` are written there.
        regime: the threshold regime of the scores: one of :data:`REGIMES` for all signals, or a mapping
            ``{signal: regime}`` (missing signals: ``"oracle"``). Use ``"calibrated"`` for LiRA/RMIA scores.
        fpr, bootstrap, generator: as in :func:`~fastadv.privacy.roc_metrics`.
        extra_results: already computed results to include, e.g.
            ``{"loss/song_mittal": transferred_threshold_attack(...).to_dict()}``; each must carry a
            ``"regime"`` key.
        metadata: free-form JSON-friendly context (model, dataset, attack config from
            :func:`~fastadv.privacy.attack_config`, ...), stored under ``"metadata"``.
        plots: write the ROC plots when ``out_dir`` is given.

    Returns:
        The report dict: ``signals`` (per signal: regime and the full ROC metrics), ``rows`` (one flat row
        per number with its regime), ``extra_results``, ``regimes`` (their meaning), ``metadata``,
        environment info and, with ``out_dir``, ``files``.
    """
    if not isinstance(member_scores_by_signal, Mapping) or not isinstance(nonmember_scores_by_signal, Mapping):
        raise ValueError("member_scores_by_signal and nonmember_scores_by_signal must be mappings {signal: scores}")
    missing = set(member_scores_by_signal) ^ set(nonmember_scores_by_signal)
    if missing:
        raise ValueError(
            "member_scores_by_signal and nonmember_scores_by_signal must have the same signals; "
            f"unmatched: {sorted(map(str, missing))}"
        )
    if not member_scores_by_signal and not extra_results:
        raise ValueError("member_scores_by_signal is empty: nothing to evaluate")
    levels = _checks.fpr_levels(fpr)

    signals: dict[str, dict] = {}
    rows: list[dict] = []
    curves: dict[str, tuple] = {}
    for name in member_scores_by_signal:
        label = str(name)
        reg = _regime_of(regime, label)
        member, nonmember = member_scores_by_signal[name], nonmember_scores_by_signal[name]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = roc_metrics(member, nonmember, fpr=levels, bootstrap=bootstrap, generator=generator)
        for w in caught:
            warnings.warn(f"signal {label!r}: {w.message}", w.category, stacklevel=2)
        entry = {"regime": reg, **metrics}
        if metrics["auc"] < 0.5:
            entry["warning"] = "AUC < 0.5: the scores may have the wrong orientation"
        signals[label] = entry
        rows.extend(_rows(label, reg, metrics))
        if out_dir is not None and plots:
            fpr_c, tpr_c, _ = roc_curve(member, nonmember)
            curves[label] = (fpr_c, tpr_c, reg, metrics["auc"])

    extras: dict[str, dict] = {}
    for key, result in (extra_results or {}).items():
        if not isinstance(result, Mapping) or result.get("regime") not in REGIMES:
            raise ValueError(
                f"extra_results[{key!r}] must be a mapping with a 'regime' in {', '.join(REGIMES)}"
            )
        extras[str(key)] = dict(result)

    report = {
        "format": "fastadv.privacy.mia/1",
        "orientation": "higher score = more likely a member; member predicted when score >= threshold",
        "regimes": {r: _REGIME_DESCRIPTIONS[r] for r in REGIMES},
        "fpr_levels": list(levels),
        "tpr_at_fpr_convention": "largest TPR among thresholds with FPR <= level; achieved FPR reported",
        "ties": "examples with equal scores move together across a threshold",
        "signals": signals,
        "rows": rows,
        "extra_results": extras,
        "metadata": dict(metadata or {}),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    report = _json_safe(report)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        files = {"json": os.path.join(os.fspath(out_dir), "mia.json")}
        if plots and curves:
            files.update(_plot(curves, os.fspath(out_dir), levels))
        report["files"] = files
        with open(files["json"], "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, allow_nan=False)
            fh.write("\n")
    return report
