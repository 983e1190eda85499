"""Training methods: each module defines one method's inner maximisation and outer loss.

==================  ===================================================================================
``standard``        ``CE(f(x), y)``
``pgd_at``          PGD-10 (attack engine) → ``CE(f(x_adv), y)``
``trades``          KL inner maximisation → ``CE(f(x), y) + β·KL(f(x) ‖ f(x_adv))``
``mart``            CE inner maximisation from a Gaussian start → BCE-margin + β·KL·(1 − p_y)
``part``            PART over PGD-AT (per-pixel budget after a warm-up)
``part_trades``     PART over TRADES
``part_mart``       PART over MART
``fast_at``         FGSM-RS (α = 1.25ε), catastrophic-overfitting check
``free_at``         m replays per batch, one backward for input and weight gradients
``rrm``             ``λ·CE(S(x), y) − mean cos(g_S(x), g_T(x))`` against a frozen teacher
==================  ===================================================================================
"""

from __future__ import annotations

from .base import AdversarialMethod, Method
from .fast_at import FastAT
from .free_at import FreeAT
from .mart import MART, mart_loss
from .part import PART
from .part_mart import PARTMART
from .part_trades import PARTTRADES
from .pgd_at import PGDAT
from .rrm import RRM, StudentWithProjection, rrm_loss
from .standard import Standard
from .trades import TRADES, trades_kl

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a :class:`Method` subclass to :data:`METHODS` under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise ValueError("register_method needs a Method subclass with a non-empty `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"training method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


for _cls in (Standard, PGDAT, TRADES, MART, PART, PARTTRADES, PARTMART, FastAT, FreeAT, RRM):
    register_method(_cls)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown training method {name!r}; valid: {', '.join(sorted(METHODS))}") from None


def create_method(config) -> Method:
    """An instance of ``config.method`` configured by ``config``."""
    return get_method(config.method)(config)


__all__ = ["MART", "METHODS", "PART", "PARTMART", "PARTTRADES", "PGDAT", "RRM", "TRADES", "AdversarialMethod",
           "FastAT", "FreeAT", "Method", "Standard", "StudentWithProjection", "create_method", "get_method",
           "mart_loss", "register_method", "rrm_loss", "trades_kl"]
