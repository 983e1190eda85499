"""Small helpers shared across layers."""

from __future__ import annotations

import torch
from torch import nn


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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device | str, amp: str | None):
    """``torch.autocast`` for ``amp`` in ``{"bf16", "fp16"}``; a disabled one for ``None`` / ``"none"``."""
    device_type = torch.device(device).type
    if amp in (None, "none"):
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=AMP_DTYPES[amp])


def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def auto_channels_last(has_conv: bool, device: torch.device | str, amp: str | None) -> bool:
    """The automatic memory-format choice for 4-D batches: channels-last for a network with a 2-D convolution
    when it runs on the CPU (oneDNN's convolutions and pooling are faster that way; NCHW max-pooling is several
    times slower) or under autocast on any device (tensor-core kernels want NHWC). fp32 CUDA keeps NCHW."""
    return has_conv and (torch.device(device).type == "cpu" or amp not in (None, "none"))


__all__ = ["AMP_DTYPES", "auto_channels_last", "autocast_context", "has_conv2d", "resolve_device"]
