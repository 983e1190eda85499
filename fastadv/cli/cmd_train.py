"""``fastadv train``: train a model with any fastadv.train method.

The run is configured by TrainConfig keys, from ``--config FILE`` (YAML or JSON) and ``--set key=value``
overrides, e.g. ``fastadv train --set method=part --set model=resnet18 --set dataset=cifar10
--set data_dir=~/data``. The run folder holds the resolved ``config.json``, checkpoints (``best.pt``,
``last.pt``), ``metrics.json`` and the trainer's CSV/JSON logs. ``--resume`` continues an interrupted run in
the same folder exactly where its last checkpoint left it. Multi-GPU: ``torchrun --nproc-per-node N -m
fastadv train ...``.
"""

from __future__ import annotations

import argparse

from . import config as cfg
from .runs import make_run_dir, write_json

_TUPLE_KEYS = ("milestones", "adam_betas")  # JSON has no tuples


def add_parser(sub):
    p = sub.add_parser("train", help="train a model (standard, pgd_at, trades, mart, part*, fast_at, free_at, rrm)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML or JSON file of TrainConfig keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key (repeatable); values are parsed as YAML (e.g. eps=0.0314, "
                        "model_kwargs={width: 16})")
    p.add_argument("--out", default=None, help="run folder (default: ./fastadv-runs/train-<time>)")
    p.add_argument("--resume", action="store_true", help="resume from the run folder's last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from fastadv.train import TrainConfig, train

    if args.resume and args.out is None:
        raise cfg.ConfigError("--resume needs --out: the folder of the interrupted run")
    run_dir = make_run_dir(args.out, "train", create=False)
    if args.resume and args.config is None and not args.overrides and (run_dir / "config.json").is_file():
        values = cfg.load_file(run_dir / "config.json")  # the interrupted run's own settings
        for key in ("out_dir", "resume", "progress"):
            values.pop(key, None)
    else:
        values = cfg.apply_overrides(cfg.load_file(args.config), args.overrides)
    values["out_dir"] = str(run_dir)
    if args.resume:
        if not (run_dir / "last.pt").is_file():
            raise cfg.ConfigError(f"--resume: {str(run_dir / 'last.pt')!r} does not exist; pass the folder of the "
                                  "interrupted run with --out")
        values["resume"] = "auto"
    if args.no_progress:
        values["progress"] = False
    if "data_dir" in values and values["data_dir"] is not None:
        from pathlib import Path

        data_dir = Path(str(values["data_dir"])).expanduser()
        if not data_dir.is_dir():
            raise cfg.ConfigError(f"data_dir {str(data_dir)!r} is not a directory")
        values["data_dir"] = str(data_dir)
    values = {k: tuple(v) if isinstance(v, list) and k in _TUPLE_KEYS else v for k, v in values.items()}
    config = cfg.build(TrainConfig, values, what="train config")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config.to_dict())
    result = train(config)
    summary = {"final": result.final, "best": result.best, "stop_reason": result.stop_reason,
               "last_checkpoint": result.last_checkpoint, "best_checkpoint": result.best_checkpoint,
               "resumed_from": result.resumed_from, "history": result.history}
    write_json(run_dir / "metrics.json", summary)
    final = result.final or {}
    print(f"trained {config.method} for {final.get('epoch', '?')} epochs: "
          + ", ".join(f"{k}={v:.4f}" for k, v in final.items() if k in ("nat_acc", "pgd_acc") and v is not None)
          + f"  -> {run_dir}")
    return 0
