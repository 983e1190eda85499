"""``fastadv demo``: the whole toolkit, offline, on scikit-learn's handwritten digits, in a few minutes on a CPU.

Trains a standard, a PGD-AT and a PART model (small CNN); evaluates natural, PGD-20, CW-20 and APGD-CE
accuracy; measures membership inference (oracle confidence attack: AUC, TPR at 1 % FPR) on natural and
adversarial inputs; reprograms the standard model with an LM-VP prompt and label mapping for relabelled
digits; writes ``report.md`` with plots, ``metrics.json`` and ``metrics.csv`` to the run folder and prints a
results table. Scale it up with e.g. ``--dataset cifar10 --data-dir DATA --device cuda --set model=resnet18
--set epochs=100``.
"""

from __future__ import annotations

import argparse

from . import config as cfg
from .runs import make_run_dir


def add_parser(sub):
    p = sub.add_parser("demo", help="run the offline end-to-end demo and write a report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="run folder (default: ./fastadv-runs/demo-<time>)")
    p.add_argument("--quick", action="store_true", help="the reduced configuration (fewer epochs and iterations)")
    p.add_argument("--dataset", default=None, help="dataset (default digits, embedded; others need --data-dir)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--config", default=None, help="YAML or JSON file of demo settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one demo setting (e.g. epochs=10, model=resnet18)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args) -> int:
    from fastadv.demo import DemoConfig, run_demo

    values = cfg.apply_overrides(cfg.load_file(args.config), args.overrides)
    for key, value in (("dataset", args.dataset), ("data_dir", args.data_dir), ("device", args.device)):
        if value is not None:
            values[key] = value
    if args.no_progress:
        values["progress"] = False
    if values.get("data_dir") is not None:
        from pathlib import Path

        if not Path(str(values["data_dir"])).expanduser().is_dir():
            raise cfg.ConfigError(f"--data-dir {values['data_dir']!r} is not a directory")
    if args.quick:
        cfg.build(DemoConfig, values, what="demo config")  # report unknown keys before building the preset
        config = DemoConfig.quick(**values)
    else:
        config = cfg.build(DemoConfig, values, what="demo config")
    run_dir = make_run_dir(args.out, "demo")
    summary = run_demo(config, run_dir)
    print(summary["table"])
    lm = summary["lmvp"]
    print(f"LM-VP (relabelled digits): {100 * lm['source_accuracy_without_prompt']:.1f} % for the source model alone, "
          f"{100 * lm['natural_accuracy']:.1f} % reprogrammed")
    print(f"report: {run_dir / 'report.md'}  ({summary['seconds']:.0f} s)")
    return 0
