"""``fastadv attack``: craft adversarial examples for a split with one attack and save them.

Writes ``adversarial.pt`` (``x_adv``, ``y``, the attack's settings; load with ``torch.load(...,
weights_only=True)``) and ``metrics.json`` (clean and robust accuracy, perturbation norms). With
``--transfer-to CHECKPOINT`` the examples crafted on the model are also evaluated on another model.
"""

from __future__ import annotations

import argparse

import torch

from . import common
from .runs import make_run_dir, write_json


def add_parser(sub):
    p = sub.add_parser("attack", help="craft and save adversarial examples for a checkpoint", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the model to attack (a fastadv training checkpoint)")
    p.add_argument("--attack", default="pgd20", help="attack name (default: %(default)s)")
    p.add_argument("--transfer-to", default=None, metavar="CHECKPOINT", help="also evaluate on this model")
    common.add_data_options(p)
    common.add_threat_options(p)
    common.add_run_options(p)
    p.set_defaults(run=run)


@torch.no_grad()
def _accuracy(model, x, y, batch_size):
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / max(1, len(x))


def run(args) -> int:
    device = common.resolve_device(args.device)
    model = common.load_model(args.checkpoint, device)
    x, y = common.load_split(args.dataset, args.data_dir, args.split, args.limit, device)
    attack = common.build_attack(args.attack, model, eps=args.eps, alpha=args.alpha, norm=args.norm, seed=args.seed,
                                 steps=args.steps)
    chunks = [attack(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
    x_adv = torch.cat(chunks) if chunks else x.clone()
    delta = (x_adv - x).flatten(1)
    metrics = {"attack": args.attack, "eps": args.eps, "norm": args.norm, "n": len(x),
               "clean_accuracy": _accuracy(model, x, y, args.batch_size),
               "robust_accuracy": _accuracy(model, x_adv, y, args.batch_size),
               "max_linf": delta.abs().max().item() if len(x) else 0.0,
               "mean_l2": delta.norm(dim=1).mean().item() if len(x) else 0.0}
    if args.transfer_to:
        target = common.load_model(args.transfer_to, device)
        metrics["transfer_target"] = args.transfer_to
        metrics["target_clean_accuracy"] = _accuracy(target, x, y, args.batch_size)
        metrics["target_robust_accuracy"] = _accuracy(target, x_adv, y, args.batch_size)
    run_dir = make_run_dir(args.out, "attack")
    torch.save({"x_adv": x_adv.cpu(), "y": y.cpu(), "attack": args.attack, "eps": args.eps, "norm": args.norm},
               run_dir / "adversarial.pt")
    write_json(run_dir / "metrics.json", metrics)
    print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    print(f"-> {run_dir}")
    return 0
