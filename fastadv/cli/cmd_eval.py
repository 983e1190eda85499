"""``fastadv eval``: robust accuracy of a trained checkpoint under named attacks.

Reports clean, per-attack and worst-case accuracy with 95 % Wilson intervals (``metrics.json``,
``metrics.csv``). Attacks: fgsm, pgdN (e.g. pgd20), cwN (CW margin loss, e.g. cw20), apgd-ce, apgd-dlr, mma,
autoattack (the standard protocol: APGD-CE, APGD-T, FAB-T, Square).
"""

from __future__ import annotations

import argparse

from . import common
from .runs import make_run_dir, write_csv, write_json


def add_parser(sub):
    p = sub.add_parser("eval", help="robust accuracy of a checkpoint under named attacks", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a fastadv training checkpoint (best.pt / last.pt)")
    p.add_argument("--attacks", default="pgd20,cw20", help="comma-separated attack names (default: %(default)s)")
    common.add_data_options(p)
    common.add_threat_options(p)
    common.add_run_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from fastadv.evaluate import robust_accuracy

    device = common.resolve_device(args.device)
    model = common.load_model(args.checkpoint, device)
    x, y = common.load_split(args.dataset, args.data_dir, args.split, args.limit, device)
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    attacks = {n: common.build_attack(n, model, eps=args.eps, alpha=args.alpha, norm=args.norm, seed=args.seed,
                                      steps=args.steps) for n in names}
    result = robust_accuracy(model, (x, y), attacks, batch_size=args.batch_size, device=device,
                             progress=not args.no_progress)
    run_dir = make_run_dir(args.out, "eval")
    report = {"checkpoint": args.checkpoint, "dataset": args.dataset, "split": args.split, "eps": args.eps,
              "norm": args.norm, **result.as_dict()}
    write_json(run_dir / "metrics.json", report)
    rows = [{"attack": "clean", **result.clean.as_dict()}]
    rows += [{"attack": k, **v.as_dict()} for k, v in result.per_attack.items()]
    rows.append({"attack": "worst_case", **result.worst_case.as_dict()})
    write_csv(run_dir / "metrics.csv", rows)
    for row in rows:
        print(f"{row['attack']:>12}: {100 * row['accuracy']:.2f} %")
    print(f"-> {run_dir}")
    return 0
