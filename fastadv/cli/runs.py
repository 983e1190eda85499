"""Run folders: every CLI run writes its resolved config, metrics (JSON and CSV) and plots into one folder."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any


def make_run_dir(out: str | Path | None, command: str, *, create: bool = True) -> Path:
    """``out`` if given, else ``./fastadv-runs/<command>-<timestamp>`` (never an existing folder's files).
    ``create=False`` only chooses the path, so that a run whose config fails validation leaves nothing."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path("fastadv-runs") / f"{command}-{stamp}"
        path, k = base, 1
        while path.exists():
            k += 1
            path = base.with_name(f"{base.name}-{k}")
    else:
        path = Path(out)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            return _plain(value.item())
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Any) -> Path:
    from fastadv.train.checkpoint import atomic_write_text

    return atomic_write_text(json.dumps(_plain(data), indent=2, allow_nan=False) + "\n", path)


def write_csv(path: Path, rows: list[dict]) -> Path:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _plain(v) for k, v in row.items()})
    return path
