"""CSV and JSON run logs, rewritten atomically from the full history after every epoch (so a resumed run's
logs hold exactly the epochs of the run it continues, never a duplicated or half-written row)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


class RunLogger:
    """Writes ``log.csv`` (one row per epoch) and ``log.json`` (config, history, best, stop reason) in
    ``out_dir``. Disabled (writes nothing) when ``out_dir`` is ``None``."""

    def __init__(self, out_dir: str | Path | None) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None

    @property
    def csv_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "log.csv"

    @property
    def json_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "log.json"

    def write(self, config: dict, history: list[dict], best: dict | None, stop_reason: str | None) -> None:
        if self.out_dir is None:
            return
        columns: list[str] = []
        for record in history:
            for key in record:
                if key not in columns:
                    columns.append(key)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for record in history:
            writer.writerow({k: record.get(k, "") for k in columns})
        atomic_write_text(buffer.getvalue(), self.csv_path)
        document = {
            "config": config,
            "history": [{k: _plain(v) for k, v in record.items()} for record in history],
            "best": None if best is None else {k: _plain(v) for k, v in best.items()},
            "stop_reason": stop_reason,
        }
        atomic_write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", self.json_path)


__all__ = ["RunLogger"]
