"""``fastadv mia``: membership inference against a trained checkpoint.

Members are the first ``--members`` training examples the model was trained on (train with ``train_subset``
to make that exact), non-members the first ``--nonmembers`` examples of ``--nonmember-split``. Every signal
(confidence, loss, entropy, modified entropy, scaled logit, margin, correctness) is scored with the oracle
threshold attack; with ``--adversarial`` the same is repeated on PGD examples of every member and non-member.
Writes ``mia.json`` (every number labelled with its threshold regime) and ROC plots.
"""

from __future__ import annotations

import argparse

from . import common
from .runs import make_run_dir


def add_parser(sub):
    p = sub.add_parser("mia", help="membership inference (natural and adversarial inputs) on a checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a fastadv training checkpoint")
    p.add_argument("--members", type=int, default=1000, help="number of training examples used as members")
    p.add_argument("--nonmembers", type=int, default=1000, help="number of held-out examples used as non-members")
    p.add_argument("--nonmember-split", default="test", help="split the non-members come from")
    p.add_argument("--adversarial", action="store_true", help="also run MIA on PGD examples of both sets")
    p.add_argument("--dataset", default="digits", help="dataset the model was trained on")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    common.add_threat_options(p)
    common.add_run_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from fastadv import privacy

    device = common.resolve_device(args.device)
    model = common.load_model(args.checkpoint, device)
    members = common.load_split(args.dataset, args.data_dir, "train", args.members, device)
    nonmembers = common.load_split(args.dataset, args.data_dir, args.nonmember_split, args.nonmembers, device)
    run_dir = make_run_dir(args.out, "mia")
    views = {"natural": None}
    if args.adversarial:
        views["adversarial"] = common.build_attack("pgd20" if args.steps is None else f"pgd{args.steps}", model,
                                                   eps=args.eps, alpha=args.alpha, norm=args.norm, seed=args.seed)
    reports = {}
    for view, attack in views.items():
        kw = {"device": device, "batch_size": args.batch_size, "attack": attack}
        m = privacy.model_signals(model, members, **kw)
        n = privacy.model_signals(model, nonmembers, **kw)
        metadata = {"checkpoint": args.checkpoint, "inputs": view, "members": len(members[0]),
                    "nonmembers": len(nonmembers[0])}
        if attack is not None:
            metadata["attack"] = privacy.attack_config(attack)
        reports[view] = privacy.evaluate(m, n, out_dir=run_dir / view, metadata=metadata)
        for signal, row in reports[view]["signals"].items():
            print(f"{view:>11} {signal:>16}: AUC {row['auc']:.3f}  balanced acc {row['balanced_accuracy']:.3f}")
    print(f"-> {run_dir}")
    return 0
