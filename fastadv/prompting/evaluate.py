"""Evaluation of a trained LM-VP model: natural accuracy, white-box PGD-10 / PGD-20 / CW-20 through the whole
LM-VP model, transferred PGD-20 crafted on the threat model, and membership inference on natural and
adversarial inputs — one JSON-friendly dict (and file) per run.

Accuracies come from :func:`fastadv.evaluate.robust_accuracy` (a sample is robust when both its clean and its
adversarial input are classified correctly; 95 % Wilson intervals). Every attack perturbs the image in pixel
space ``[0, 1]`` before it is placed on the canvas — never the normalised canvas. Membership inference uses
:func:`fastadv.privacy.model_signals` (fp32 logits) on the first ``mia_subset`` training examples (members)
and as many test examples (non-members), and :func:`fastadv.privacy.evaluate` with the ``oracle`` threshold
regime (the best threshold on the evaluated data: an upper bound; TARP-VP's "MIA success rate" is its
``balanced_accuracy``). The adversarial variant replaces every member and non-member by its PGD example
(true label) before the signals are computed.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

from ..attacks import PGD, TransferAttack
from ..evaluate import robust_accuracy
from ..train.checkpoint import atomic_write_text
from . import _data
from .config import LMVPConfig

RESULT_FORMAT = "fastadv.prompting.result/1"


def _amp(config: LMVPConfig) -> str | None:
    return None if config.amp == "none" else config.amp


def build_eval_attacks(model: nn.Module, config: LMVPConfig, *, threat_model: nn.Module | None = None) -> dict:
    """``{"pgd10", "pgd20", "cw20"}`` (those in ``config.eval_attacks``) on the LM-VP model and, with a threat
    model and ``config.transfer_steps > 0``, ``"transfer_pgd<steps>"`` crafted on the threat model only."""
    eps, alpha, amp = config.attack_eps, config.attack_alpha, _amp(config)
    specs = {"pgd10": (10, "ce"), "pgd20": (20, "ce"), "cw20": (20, "cw")}
    attacks: dict = {}
    for offset, name in enumerate(config.eval_attacks):
        steps, loss = specs[name]
        attacks[name] = PGD(model, eps=eps, alpha=alpha, steps=steps, norm=config.norm, loss=loss,
                            kappa=config.cw_kappa, random_start=True, generator=config.seed + 100 + offset, amp=amp)
    if threat_model is not None and config.transfer_steps > 0:
        crafted = PGD(threat_model, eps=eps, alpha=alpha, steps=config.transfer_steps, norm=config.norm, loss="ce",
                      random_start=True, generator=config.seed + 200, amp=amp)
        attacks[f"transfer_pgd{config.transfer_steps}"] = TransferAttack(threat_model, crafted, model)
    return attacks


def _mia(model: nn.Module, members, nonmembers, config: LMVPConfig, device: torch.device) -> dict:
    from .. import privacy

    n = min(_data.num_examples(members) or 0, _data.num_examples(nonmembers) or 0)
    if config.mia_subset is not None:
        n = min(n, config.mia_subset)
    if n == 0:
        raise ValueError("fastadv.prompting.evaluate_lmvp: membership inference needs members and non-members")
    members = _data.subset(members, n, "member_data")
    nonmembers = _data.subset(nonmembers, n, "test_data")
    members = (_data.to_float_images(members[0]), members[1])
    nonmembers = (_data.to_float_images(nonmembers[0]), nonmembers[1])
    out: dict = {"n_members": n, "n_nonmembers": n}
    variants: dict = {"natural": None}
    if config.mia_steps > 0:
        variants["adversarial"] = PGD(model, eps=config.attack_eps, alpha=config.attack_alpha, steps=config.mia_steps,
                                      norm=config.norm, loss="ce", random_start=True, generator=config.seed + 300,
                                      amp=_amp(config))
    for name, attack in variants.items():
        kwargs = {"device": device, "batch_size": config.eval_batch_size, "attack": attack}
        member_scores = privacy.model_signals(model, members, **kwargs)
        nonmember_scores = privacy.model_signals(model, nonmembers, **kwargs)
        metadata = {"inputs": name}
        if attack is not None:
            metadata["attack"] = attack.config()
        report = privacy.evaluate(member_scores, nonmember_scores, regime="oracle", metadata=metadata, plots=False)
        out[name] = {
            "regime": "oracle",
            "attack": metadata.get("attack"),
            "signals": report["signals"],
            "balanced_accuracy": {k: v["balanced_accuracy"] for k, v in report["signals"].items()},
            "auc": {k: v["auc"] for k, v in report["signals"].items()},
        }
    return out


def evaluate_lmvp(model: nn.Module, test_data, config: LMVPConfig, *, threat_model: nn.Module | None = None,
                  member_data=None, out_path: str | Path | None = None, metadata: dict | None = None) -> dict:
    """Evaluate an LM-VP model (see the module docstring); returns the result dict and, with ``out_path``,
    writes it there as JSON (atomically).

    ``test_data``: the held-out set (an ``(x, y)`` pair or ImageSet); accuracies use its first
    ``config.eval_subset`` examples. ``threat_model``: enables the transferred attack. ``member_data``: the
    training set, for membership inference (with ``config.mia``). ``metadata`` is stored as it is.
    """
    device = next(iter(model.parameters())).device
    started = time.perf_counter()
    pair = _data.as_pair(test_data, "test_data")
    if pair is None:
        raise ValueError("fastadv.prompting.evaluate_lmvp: `test_data` must be an (x, y) pair or an ImageSet")
    x, y = _data.subset(test_data, config.eval_subset, "test_data")
    x = _data.to_float_images(x)
    attacks = build_eval_attacks(model, config, threat_model=threat_model)
    robust = robust_accuracy(model, (x, y), attacks, batch_size=config.eval_batch_size, device=device,
                             progress=config.progress, sanity_checks=config.sanity_checks)
    accuracy = {"natural": robust.clean.as_dict(), **{k: v.as_dict() for k, v in robust.per_attack.items()}}
    result = {
        "format": RESULT_FORMAT,
        "model": model.config() if hasattr(model, "config") else {"class": type(model).__name__},
        "config": config.to_dict(),
        "accuracy": accuracy,
        "accuracy_convention": "robust = clean and adversarial input both classified correctly; 95% Wilson "
                               "intervals",
        "attacks": robust.configs,
        "sanity_flags": robust.flags,
        "n_eval": robust.n,
    }
    if config.mia:
        if member_data is None:
            raise ValueError("fastadv.prompting.evaluate_lmvp: config.mia needs `member_data` (the training set)")
        result["mia"] = _mia(model, member_data, test_data, config, device)
    result["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                             "device": str(device)}
    result["eval_time_s"] = time.perf_counter() - started
    result["metadata"] = dict(metadata or {})
    result = json_safe(result)
    if out_path is not None:
        atomic_write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", out_path)
    return result


def json_safe(value):
    """``value`` with tuples as lists, tensors as numbers/lists and non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["RESULT_FORMAT", "build_eval_attacks", "evaluate_lmvp", "json_safe"]
