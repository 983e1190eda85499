"""Checkpoints: atomic writes, ``weights_only`` loading with clear errors, and RNG states as plain values.

A checkpoint is a dict of tensors and plain Python values only (no pickled objects), so that
``torch.load(path, weights_only=True)`` reads it. It is written to a temporary file in the destination folder,
flushed to disk and moved over the destination with ``os.replace``: a crash leaves either the old file or
the new one, never half of one.
"""

from __future__ import annotations

import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "fastadv.train.checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "config", "epoch", "step_in_epoch", "global_step", "model", "optimizer",
                 "scheduler", "scaler", "method", "ranks", "data", "history")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, not a fastadv training checkpoint, or
    incompatible with the run that tries to resume from it."""


def _atomic_write(path: str | os.PathLike, mode: str, write) -> Path:
    """``write(handle)`` into a temporary file in the same folder, fsync, then ``os.replace`` onto ``path``:
    readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        text = "b" not in mode
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if text else {})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (best effort: not every platform can open a folder)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``."""
    return _atomic_write(path, "wb", lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + ``os.replace``)."""
    return _atomic_write(path, "w", lambda handle: handle.write(text))


def _short_reason(text: str) -> str:
    """The informative line of a torch.load error (its boilerplate about weights_only removed)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        return found.group(1).strip().splitlines()[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a training checkpoint with ``torch.load(..., weights_only=True)`` and check its layout.

    Raises ``FileNotFoundError`` when ``path`` is missing and :class:`CheckpointError` (a ``ValueError``) when
    the file is truncated or corrupt, holds objects that ``weights_only`` refuses, or is not a fastadv training
    checkpoint (e.g. a bare state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): the file is truncated")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text:
            found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
            what = found.group(1) if found else "a Python object"
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds {what}, which torch.load(weights_only=True) refuses to unpickle; "
                "fastadv checkpoints contain tensors and plain values only"
            ) from exc
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated and cannot be read ({type(exc).__name__}: "
            f"{_short_reason(text)})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a fastadv training checkpoint (expected a dict with "
            f"format={FORMAT!r}); to load bare model weights use fastadv.models.create_model(checkpoint_path=...)"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {state.get('version')!r}; "
                              f"this fastadv reads version {VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the entries {', '.join(missing)} (incomplete file)")
    return state


# --------------------------------------------------------------------------------------------------
# RNG states as tensors and plain values


def capture_global_rng() -> dict:
    """The process-wide RNG states: torch CPU, every CUDA device, Python's ``random`` and NumPy's legacy
    global generator, as tensors / ints / floats / strings."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def frozen_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """The state-dict key prefixes of the parts ``model`` declares frozen and rebuildable from its config
    (``model.frozen_state_prefixes``, e.g. ``("source.",)`` for an LM-VP model's pre-trained network)."""
    prefixes = getattr(model, "frozen_state_prefixes", ())
    if isinstance(prefixes, str) or not all(isinstance(p, str) and p for p in prefixes):
        raise TypeError(f"{type(model).__name__}.frozen_state_prefixes must be a tuple of non-empty strings, "
                        f"got {prefixes!r}")
    return tuple(prefixes)


def fingerprint(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """``name -> [numel, sum, sum of squares]`` (float64) of each tensor: enough to tell whether a checkpoint's
    omitted frozen weights are the ones a run is about to resume with, without storing them."""
    out = {}
    for name, t in state.items():
        v = t.detach().double()
        out[name] = [float(t.numel()), float(v.sum()), float((v * v).sum())]
    return out


def fingerprint_mismatch(saved: dict, current: dict[str, list[float]]) -> str | None:
    """The first key whose fingerprint differs (up to summation-order rounding), or ``None``."""
    if set(saved) != set(current):
        return next(iter(sorted(set(saved) ^ set(current))))
    for name, (numel, total, squares) in current.items():
        s_numel, s_total, s_squares = saved[name]
        # float64 sums of float32 values agree to ~1e-16 of sum(|x|) <= sqrt(numel * squares) in any order
        slack = 1e-9 * math.sqrt(numel * max(squares, s_squares)) + 1e-12
        if numel != s_numel or abs(total - s_total) > slack or abs(squares - s_squares) > 1e-9 * squares + 1e-12:
            return name
    return None


def restore_global_rng(state: dict) -> None:
    """Inverse of :func:`capture_global_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise CheckpointError(f"the checkpoint holds RNG states of {len(cuda_states)} CUDA devices but "
                                  f"{torch.cuda.device_count()} are visible")
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


__all__ = ["CheckpointError", "FORMAT", "VERSION", "atomic_save", "atomic_write_text", "capture_global_rng",
           "fingerprint", "fingerprint_mismatch", "frozen_prefixes", "load_trained_model",
           "load_checkpoint", "restore_global_rng"]


def load_trained_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained network of a fastadv training checkpoint, rebuilt from the checkpoint alone (architecture,
    number of classes and input normalisation as recorded), in eval mode on ``device``."""
    state = load_checkpoint(path)
    config = state["config"]
    num_classes = state.get("num_classes") or config.get("num_classes")
    if num_classes is None:
        raise CheckpointError(f"checkpoint {str(path)!r} does not record its number of classes; it was written by an "
                              "older fastadv: build the model yourself and load state['model']")
    from ..models import create_model, with_normalization

    model = create_model(config["model"], num_classes=int(num_classes), **(config.get("model_kwargs") or {}))
    if state.get("normalization"):
        mean, std = state["normalization"]
        model = with_normalization(model, mean, std)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: the weights do not fit model {config['model']!r} "
                              f"({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()
