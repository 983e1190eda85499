"""fastadv: fast adversarial-robustness and privacy research on fused C++/CUDA kernels.

Subpackages are imported lazily so that ``import fastadv`` stays cheap and never fails because an
optional dependency (timm, matplotlib, ...) is missing; ``fastadv.ops`` is the only eager import.
"""

from __future__ import annotations

import importlib

from . import ops

__version__ = "0.1.0"

_SUBMODULES = {
    "attacks", "train", "prompting", "privacy", "evaluate", "data", "models", "cam", "cli", "utils", "info", "demo",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastadv' has no attribute {name!r}")


__all__ = ["ops", "__version__", *sorted(_SUBMODULES)]
