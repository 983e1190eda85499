"""Finds and loads the compiled kernels; falls back to the reference ops with one clear warning.

The library is only loaded when it was built for the torch that is running (a library built for another
torch can crash on load or, worse, misbehave), so ``import fastadv`` never fails because of it.
Set ``FASTADV_DISABLE_NATIVE=1`` to run the reference ops on purpose.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_OPS = ("pgd_step", "pgd_step_", "masked_pgd_step_", "random_init", "prompt_pad", "prompt_pad_backward")

loaded = False
reason: str | None = None
build_info: dict = {}
_force_reference = False
_warned_devices: set[str] = set()


def _try_load() -> tuple[bool, str | None]:
    if os.environ.get("FASTADV_DISABLE_NATIVE", "").strip() in {"1", "true", "yes"}:
        return False, "FASTADV_DISABLE_NATIVE is set"
    try:
        info = importlib.import_module("fastadv._build_info")
    except ImportError:
        return False, "the package was not built (install it with `pip install --no-build-isolation .`)"
    build_info.update({k: v for k, v in vars(info).items() if not k.startswith("_")})
    built_for = build_info.get("torch_version")
    if built_for != torch.__version__:
        return False, f"the kernels were built for torch {built_for} but torch {torch.__version__} is running; " \
                      "reinstall fastadv to rebuild them"
    try:
        importlib.import_module("fastadv._C")
    except (ImportError, OSError) as exc:
        return False, f"the compiled library could not be loaded ({exc})"
    missing = [op for op in _OPS if not hasattr(torch.ops.fastadv, op)]
    if missing:
        return False, f"the compiled library lacks the ops {missing}"
    return True, None


loaded, reason = _try_load()
if not loaded:
    warnings.warn(f"fastadv: compiled kernels unavailable: {reason}. Using the pure-PyTorch reference ops "
                  "(correct, but slower).", RuntimeWarning, stacklevel=2)


def _native_device_types() -> frozenset[str]:
    if not loaded:
        return frozenset()
    types = {t for t, key in _DISPATCH_KEY.items()
             if torch._C._dispatch_has_kernel_for_dispatch_key("fastadv::pgd_step", key)}
    if "cuda" in types and not torch.cuda.is_available():
        types.discard("cuda")
    return frozenset(types)


# Computed once: a constant set that torch.compile can trace through (the dispatcher query cannot be).
NATIVE_DEVICE_TYPES = _native_device_types()


def has_native(device: str | torch.device = "cpu") -> bool:
    """Whether the compiled kernels for ``device`` are loaded (else the reference versions run)."""
    return torch.device(device).type in NATIVE_DEVICE_TYPES


def use_native(t: torch.Tensor) -> bool:
    """Route a call on ``t`` to the compiled op; warn once per device type that has no kernels."""
    if _force_reference:
        return False
    if t.device.type in NATIVE_DEVICE_TYPES:
        return True
    if loaded and t.device.type not in _warned_devices:
        _warned_devices.add(t.device.type)
        warnings.warn(f"fastadv: no compiled kernels for device '{t.device.type}'; using the reference ops",
                      RuntimeWarning, stacklevel=3)
    return False


@contextlib.contextmanager
def reference_ops():
    """Run the pure-PyTorch reference ops inside the block (for comparisons and benchmarks)."""
    global _force_reference
    previous, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = previous
