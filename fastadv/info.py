"""Build and runtime information: ``python -m fastadv.info`` (or ``fastadv info``)."""

from __future__ import annotations

import platform
import sys

import torch

from .ops import _load


def collect() -> dict:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return {
        "fastadv": _fastadv_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_for_torch": _load.build_info.get("torch_version"),
        "compiled_cuda": _load.build_info.get("cuda_version"),
        "compiled_cuda_archs": _load.build_info.get("cuda_archs"),
        "native_loaded": _load.loaded,
        "fallback_reason": _load.reason,
        "native_devices": {d: _load.has_native(d) for d in devices},
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }


def _fastadv_version() -> str:
    from . import __version__

    return __version__


def format_info(info: dict) -> str:
    width = max(len(k) for k in info)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in info.items())


def main() -> int:
    print(format_info(collect()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
