"""PART-T: PART over TRADES (warm-up with TRADES, then TRADES' KL inner maximisation with PART's per-pixel
budget; TRADES' outer loss throughout)."""

from __future__ import annotations

from .part import PART
from .trades import TRADES


class PARTTRADES(PART):
    name = "part_trades"
    base_class = TRADES
