"""Helpers shared by the benchmark runners: the machine's name and writing a JSON report."""

from __future__ import annotations

import json
import platform
from pathlib import Path


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
