"""Helpers shared by the benchmark runners: the machine's name and writing a JSON report."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (with the architecture), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def write_report(report: dict, out: str | None) -> None:
    """Write ``report`` as JSON to ``out`` (creating its folder), or print it when ``out`` is empty."""
    text = json.dumps(report, indent=2) + "\n"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    else:
        print(text)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on the shared 2-core machines a second thread makes "
                             "timings swing with other jobs, and CPU time then also counts spin-waiting; "
                             "0 = torch's default)")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
