"""``fastadv bench SUITE``: run a benchmark suite of the source tree and write its JSON results.

Suites: ops (kernels vs eager PyTorch and torch.compile), attacks (whole attacks vs torchattacks),
privacy (ROC engine and RMIA vs the reference approaches), prompting (LM-VP training steps), train
(batched PART masks and PGD-AT epochs vs the reference loops). Arguments after
the suite name go to the suite (e.g. ``fastadv bench ops --no-compile --sizes cifar``). The suites live in
``benchmarks/`` of a fastadv checkout; run this from its root.
"""

from __future__ import annotations

import argparse
import importlib

SUITES = ("ops", "attacks", "privacy", "prompting", "train")


def add_parser(sub):
    p = sub.add_parser("bench", help="run a benchmark suite and write JSON results", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=SUITES, help="which suite")
    p.add_argument("--out", default=None, help="JSON file for the results (default: benchmarks/results/<suite>_<device>.json)")
    p.add_argument("suite_args", nargs=argparse.REMAINDER, help="arguments passed on to the suite")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        module = importlib.import_module(f"benchmarks.bench_{args.suite}")
    except ModuleNotFoundError:
        raise FileNotFoundError("the benchmark suites live in benchmarks/ of a fastadv checkout; run "
                                "`fastadv bench` from its root") from None
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or f"benchmarks/results/{args.suite}_{device}.json"
    status = module.main(["--out", out, *args.suite_args])
    return status if isinstance(status, int) else 0
