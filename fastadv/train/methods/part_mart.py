"""PART-M: PART over MART (warm-up with MART, then MART's inner maximisation with PART's per-pixel budget;
MART's outer loss throughout)."""

from __future__ import annotations

from .mart import MART
from .part import PART


class PARTMART(PART):
    name = "part_mart"
    base_class = MART
