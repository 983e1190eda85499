"""Small helpers shared across layers."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device, *, what: str = "device") -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU; asking for CUDA without it is a ``ValueError`` that
    names ``what`` (the option or config field the name came from)."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what}: {name!r} requested but CUDA is not available on this machine")
    return device


__all__ = ["resolve_device"]
