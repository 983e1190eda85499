"""Datasets read from local files in their published on-disk formats (nothing is ever downloaded),
plus the offline default built from scikit-learn's bundled 8×8 digits.

Every loader returns an :class:`ImageSet`: images ``(N, 3, H, W)`` — ``uint8`` for the file datasets
(``ImageSet.float()`` gives ``float32`` in ``[0, 1]``), ``float32`` in ``[0, 1]`` for ``digits`` — and
``int64`` labels. Missing or malformed files raise ``FileNotFoundError`` / ``ValueError`` naming the path
and what was expected there.
"""

from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .loader import TensorLoader

PathLike = str | os.PathLike

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images ``x`` ``(N, C, H, W)`` (``uint8`` 0..255 or float in ``[0, 1]``), labels ``y`` ``(N,)`` int64."""

    x: Tensor
    y: Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"ImageSet {self.name!r}: expected x (N, C, H, W) and y (N,), "
                f"got {tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def float(self, dtype: torch.dtype = torch.float32) -> ImageSet:
        """The same set with images as floats in ``[0, 1]``."""
        x = self.x.to(dtype).div_(255) if self.x.dtype == torch.uint8 else self.x.to(dtype)
        return ImageSet(x, self.y, self.classes, self.name)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and population standard deviation of the images on the ``[0, 1]`` scale
        (accumulated in float64, a chunk of images at a time)."""
        scale = 255.0 if self.x.dtype == torch.uint8 else 1.0
        total = torch.zeros(self.x.shape[1], dtype=torch.float64, device=self.x.device)
        squares = torch.zeros_like(total)
        for chunk in self.x.split(4096):
            values = chunk.double() / scale
            total += values.sum(dim=(0, 2, 3))
            squares += values.square().sum(dim=(0, 2, 3))
        count = self.x.shape[0] * self.x.shape[2] * self.x.shape[3]
        mean = total / count
        std = (squares / count - mean.square()).clamp(min=0).sqrt()
        return tuple(mean.tolist()), tuple(std.tolist())

    def loader(self, batch_size: int, **kwargs: Any) -> TensorLoader:
        """A :class:`TensorLoader` over this set (keyword arguments as for ``TensorLoader``)."""
        return TensorLoader(self.x, self.y, batch_size, **kwargs)


# --------------------------------------------------------------------------------------------------
# helpers


def _require_dir(data_dir: PathLike | None, dataset: str, expected: str) -> Path:
    if data_dir is None:
        raise ValueError(
            f"dataset {dataset!r} is read from local files and nothing is downloaded: "
            f"pass data_dir=<folder containing {expected}>"
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset}: data_dir {str(root)!r} is not a folder (expected {expected})")
    return root


def _locate(root: Path, subfolder: str, marker: str) -> Path:
    """``root/subfolder`` when it exists, else ``root`` itself when it holds ``marker``, else ``root/subfolder``."""
    nested = root / subfolder
    if nested.is_dir():
        return nested
    if (root / marker).exists():
        return root
    return nested


def _require_file(path: Path, dataset: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: missing file {str(path)!r} ({what})")
    return path


def _check_split(dataset: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise ValueError(f"{dataset}: unknown split {split!r}; valid splits: {', '.join(valid)}")


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (the "python version" pickle batches)


def _numpy_reconstructor() -> Callable[..., Any]:
    return np.ndarray((0,)).__reduce__()[0]


def _numpy_scalar_constructor() -> Callable[..., Any]:
    return np.float64(0).__reduce__()[0]


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches are made of (dicts, lists, strings, numpy arrays).

    The batches are pickles, and a pickle can name any callable; refusing every other global means a
    tampered file raises an error instead of running code.
    """

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstructor(),
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstructor(),
        ("numpy.core.multiarray", "scalar"): _numpy_scalar_constructor(),
        ("numpy._core.multiarray", "scalar"): _numpy_scalar_constructor(),
        # Protocol-2 pickles written by Python 3 encode ``bytes`` through this call.
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of a CIFAR batch") from None


def _read_cifar_batch(path: Path, dataset: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    _require_file(path, dataset, "a pickled batch of the python version of the dataset")
    try:
        with open(path, "rb") as handle:
            # latin1 decodes the Python 2 strings of the original files; keys may then be str or bytes.
            batch = _CifarUnpickler(handle, encoding="latin1").load()
    except Exception as exc:  # any unpickling failure means the file is not a CIFAR batch
        raise ValueError(f"{dataset}: {str(path)!r} is not a readable CIFAR pickle batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{dataset}: {str(path)!r} should hold a dict, found {type(batch).__name__}")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(
            f"{dataset}: {str(path)!r} lacks the 'data' and {label_key!r} entries of a CIFAR batch "
            f"(found keys {sorted(map(str, batch))})"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{dataset}: {str(path)!r} 'data' should be uint8 of shape (N, 3072), "
            f"got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"{dataset}: {str(path)!r} has {data.shape[0]} images but labels of shape {labels.shape}"
        )
    return data, labels.astype(np.int64)


def _read_cifar_names(path: Path, key: str) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            meta = _CifarUnpickler(handle, encoding="latin1").load()
        names = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in meta.items()}[key]
        return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a readable CIFAR meta file ({exc})") from exc


def _cifar_set(
    files: list[Path], dataset: str, label_key: str, num_classes: int, names: tuple[str, ...], name: str
) -> ImageSet:
    parts = [_read_cifar_batch(f, dataset, label_key) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{dataset}: labels outside [0, {num_classes}) in {', '.join(str(f) for f in files)}"
        )
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageSet(x, torch.from_numpy(labels), names, name)


def load_cifar10(data_dir: PathLike | None, split: str = "train") -> ImageSet:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py/`` (or ``data_dir`` itself): ``data_batch_1..5`` for
    ``split="train"``, ``test_batch`` for ``"test"``; class names from ``batches.meta`` when present."""
    _check_split("cifar10", split, ("train", "test"))
    root = _locate(_require_dir(data_dir, "cifar10", "cifar-10-batches-py/"), "cifar-10-batches-py", "test_batch")
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    classes = _read_cifar_names(root / "batches.meta", "label_names") or CIFAR10_CLASSES
    if len(classes) != 10:
        raise ValueError(f"cifar10: {str(root / 'batches.meta')!r} lists {len(classes)} class names, expected 10")
    return _cifar_set([root / n for n in names], "cifar10", "labels", 10, classes, f"cifar10-{split}")


def load_cifar100(data_dir: PathLike | None, split: str = "train", label_type: str = "fine") -> ImageSet:
    """CIFAR-100 from ``data_dir/cifar-100-python/`` (or ``data_dir`` itself): the ``train`` / ``test``
    pickles; ``label_type="fine"`` (100 classes) or ``"coarse"`` (20 superclasses)."""
    _check_split("cifar100", split, ("train", "test"))
    if label_type not in ("fine", "coarse"):
        raise ValueError(f"cifar100: label_type must be 'fine' or 'coarse', got {label_type!r}")
    root = _locate(_require_dir(data_dir, "cifar100", "cifar-100-python/"), "cifar-100-python", "test")
    num_classes = 100 if label_type == "fine" else 20
    classes = _read_cifar_names(root / "meta", f"{label_type}_label_names") or tuple(
        str(i) for i in range(num_classes)
    )
    if len(classes) != num_classes:
        raise ValueError(
            f"cifar100: {str(root / 'meta')!r} lists {len(classes)} {label_type} class names, expected {num_classes}"
        )
    return _cifar_set(
        [root / split], "cifar100", f"{label_type}_labels", num_classes, classes, f"cifar100-{split}"
    )


# --------------------------------------------------------------------------------------------------
# SVHN (cropped digits, format 2: MATLAB v5 files)


def load_svhn(data_dir: PathLike | None, split: str = "train") -> ImageSet:
    """SVHN from ``data_dir/<split>_32x32.mat`` (also looked for in ``data_dir/svhn/``): ``X`` of shape
    ``(32, 32, 3, N)`` uint8 and ``y`` ``(N, 1)`` with digit 0 stored as label 10 (mapped back to 0)."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ImportError("svhn: reading the .mat files needs scipy (pip install scipy)") from exc

    _check_split("svhn", split, ("train", "test", "extra"))
    filename = f"{split}_32x32.mat"
    root = _require_dir(data_dir, "svhn", filename)
    if not (root / filename).exists() and (root / "svhn" / filename).exists():
        root = root / "svhn"
    path = _require_file(root / filename, "svhn", "the MATLAB file of the cropped-digits format")
    try:
        content = loadmat(str(path))
    except Exception as exc:
        raise ValueError(f"svhn: {str(path)!r} is not a readable MATLAB file ({exc})") from exc
    if "X" not in content or "y" not in content:
        raise ValueError(f"svhn: {str(path)!r} lacks the 'X' and 'y' variables of the cropped-digits format")
    images, labels = np.asarray(content["X"]), np.asarray(content["y"]).reshape(-1)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.dtype != np.uint8:
        raise ValueError(
            f"svhn: {str(path)!r} 'X' should be uint8 of shape (32, 32, 3, N), got {images.dtype} {images.shape}"
        )
    if labels.shape[0] != images.shape[3]:
        raise ValueError(f"svhn: {str(path)!r} has {images.shape[3]} images but {labels.shape[0]} labels")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(f"svhn: {str(path)!r} labels should lie in 1..10 (10 = digit 0)")
    labels[labels == 10] = 0
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1)))
    return ImageSet(x, torch.from_numpy(labels), tuple(str(d) for d in range(10)), f"svhn-{split}")


# --------------------------------------------------------------------------------------------------
# Tiny-ImageNet (folder layout of tiny-imagenet-200.zip)


def _read_images(paths: list[Path], dataset: str) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    if not paths:
        raise ValueError(f"{dataset}: no images to read")
    out: np.ndarray | None = None
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                # A few Tiny-ImageNet images are grayscale; every image becomes RGB.
                arr = np.asarray(img.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{dataset}: missing image {str(path)!r}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{dataset}: {str(path)!r} is not a readable image ({exc})") from exc
        if out is None:
            out = np.empty((len(paths), *arr.shape), dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise ValueError(
                f"{dataset}: {str(path)!r} has size {arr.shape[:2]}, expected {out.shape[1:3]} like the others"
            )
        out[i] = arr
    assert out is not None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_tiny_imagenet(data_dir: PathLike | None, split: str = "train") -> ImageSet:
    """Tiny-ImageNet from ``data_dir/tiny-imagenet-200/`` (or ``data_dir`` itself).

    Classes are the WordNet ids of ``wnids.txt`` in sorted order (the order a folder-based loader
    assigns). ``"train"``: ``train/<wnid>/images/*.JPEG``; ``"val"``: ``val/images/*`` labelled by
    ``val/val_annotations.txt`` (tab-separated: file name, wnid, box). The test split has no labels.
    """
    _check_split("tiny_imagenet", split, ("train", "val"))
    root = _locate(_require_dir(data_dir, "tiny_imagenet", "tiny-imagenet-200/"), "tiny-imagenet-200", "wnids.txt")
    wnids_path = _require_file(root / "wnids.txt", "tiny_imagenet", "one WordNet id per line")
    wnids = sorted({line.strip() for line in wnids_path.read_text().splitlines() if line.strip()})
    if not wnids:
        raise ValueError(f"tiny_imagenet: {str(wnids_path)!r} lists no classes")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for wnid in wnids:
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise FileNotFoundError(f"tiny_imagenet: missing folder {str(folder)!r} for class {wnid}")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
            paths.extend(files)
            labels.extend([index[wnid]] * len(files))
    else:
        annotations = _require_file(
            root / "val" / "val_annotations.txt", "tiny_imagenet", "tab-separated: file, wnid, box"
        )
        for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise ValueError(
                    f"tiny_imagenet: {str(annotations)!r} line {lineno} should start with "
                    f"'<file>\\t<wnid from wnids.txt>', got {line!r}"
                )
            paths.append(root / "val" / "images" / fields[0])
            labels.append(index[fields[1]])
    x = _read_images(paths, "tiny_imagenet")
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64), tuple(wnids), f"tiny_imagenet-{split}")


# --------------------------------------------------------------------------------------------------
# CIFAR-10-C (Hendrycks & Dietterich: one .npy per corruption, severities 1..5 stacked)

CIFAR10C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
CIFAR10C_EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")


def _load_npy(path: Path, what: str) -> np.ndarray:
    _require_file(path, "cifar10c", what)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"cifar10c: {str(path)!r} is not a readable .npy array ({exc})") from exc


def load_cifar10c(data_dir: PathLike | None, corruption: str, severity: int | None = 5) -> ImageSet:
    """CIFAR-10-C from ``data_dir/CIFAR-10-C/`` (or ``data_dir`` itself): ``<corruption>.npy``, uint8
    ``(5·n, 32, 32, 3)`` holding the ``n`` test images at severity 1, then 2, … 5 (n = 10000 in the
    published files), and ``labels.npy`` ``(5·n,)``. ``severity`` 1..5 selects one block; ``None`` returns
    all five."""
    root = _locate(_require_dir(data_dir, "cifar10c", "CIFAR-10-C/"), "CIFAR-10-C", "labels.npy")
    known = CIFAR10C_CORRUPTIONS + CIFAR10C_EXTRA_CORRUPTIONS
    if corruption not in known:
        raise ValueError(f"cifar10c: unknown corruption {corruption!r}; valid: {', '.join(known)}")
    if severity is not None and severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"cifar10c: severity must be 1..5 or None (all), got {severity!r}")
    images = _load_npy(root / f"{corruption}.npy", f"uint8 array (5*n, 32, 32, 3) for {corruption}")
    labels = _load_npy(root / "labels.npy", "integer labels (5*n,)")
    path = root / f"{corruption}.npy"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[0] % 5:
        raise ValueError(
            f"cifar10c: {str(path)!r} should be uint8 (5*n, H, W, 3), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
        raise ValueError(
            f"cifar10c: {str(root / 'labels.npy')!r} should hold {images.shape[0]} integer labels, "
            f"got {labels.dtype} {labels.shape}"
        )
    per_severity = images.shape[0] // 5
    if severity is None:
        rows = slice(0, images.shape[0])
    else:
        rows = slice((severity - 1) * per_severity, severity * per_severity)
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images[rows]).transpose(0, 3, 1, 2)))
    y = torch.from_numpy(np.asarray(labels[rows]).astype(np.int64))
    if y.numel() and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"cifar10c: labels outside 0..9 in {str(root / 'labels.npy')!r}")
    tag = "all" if severity is None else str(severity)
    return ImageSet(x, y, CIFAR10_CLASSES, f"cifar10c-{corruption}-{tag}")



# --------------------------------------------------------------------------------------------------
# scikit-learn digits: the offline default


def digits(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0, size: int = 32) -> ImageSet:
    """scikit-learn's bundled handwritten digits (1797 real 8×8 grayscale scans, values 0..16) as
    ``float32`` images ``(N, 3, size, size)`` in ``[0, 1]``: scaled by 1/16, bilinearly upsampled and
    repeated to three channels. The train/test split is stratified per class and fixed by ``seed``
    (the same ``seed`` and ``test_fraction`` always give the same, disjoint splits)."""
    from sklearn.datasets import load_digits

    _check_split("digits", split, ("train", "test"))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))

    generator = torch.Generator().manual_seed(seed)
    chosen: list[Tensor] = []
    for cls in range(10):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_test = round(members.numel() * test_fraction)
        chosen.append(members[:n_test] if split == "test" else members[n_test:])
    index = torch.cat(chosen).sort().values

    x = images[index].unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    x = x.expand(-1, 3, -1, -1).contiguous()
    return ImageSet(x, labels[index], tuple(str(d) for d in range(10)), f"digits-{split}")


# --------------------------------------------------------------------------------------------------
# dispatch

_DATASETS: dict[str, Callable[..., ImageSet]] = {
    "digits": lambda data_dir, split, **kw: digits(split, **kw),
    "cifar10": lambda data_dir, split, **kw: load_cifar10(data_dir, split, **kw),
    "cifar100": lambda data_dir, split, **kw: load_cifar100(data_dir, split, **kw),
    "svhn": lambda data_dir, split, **kw: load_svhn(data_dir, split, **kw),
    "tiny_imagenet": lambda data_dir, split, **kw: load_tiny_imagenet(data_dir, split, **kw),
    "cifar10c": lambda data_dir, split, **kw: _cifar10c_split(data_dir, split, **kw),
}

DATASETS = tuple(_DATASETS)


def _cifar10c_split(data_dir: PathLike | None, split: str, **kwargs: Any) -> ImageSet:
    _check_split("cifar10c", split, ("test",))
    if "corruption" not in kwargs:
        raise ValueError(
            "cifar10c: pass corruption=<name> (and optionally severity=1..5 or None); valid corruptions: "
            + ", ".join(CIFAR10C_CORRUPTIONS + CIFAR10C_EXTRA_CORRUPTIONS)
        )
    return load_cifar10c(data_dir, **kwargs)


def get_dataset(
    name: str, data_dir: PathLike | None = None, split: str | None = None, **kwargs: Any
) -> ImageSet:
    """Load dataset ``name`` (one of :data:`DATASETS`) from ``data_dir``.

    ``split`` defaults to ``"train"`` (``"test"`` for ``cifar10c``, its only split). ``digits`` needs no
    files; ``cifar10c`` needs ``corruption=`` (and takes ``severity=``); ``tiny_imagenet`` has ``"train"``
    and ``"val"``; ``svhn`` also has ``"extra"``. Other keyword arguments go to the specific loader."""
    try:
        build = _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None
    if split is None:
        split = "test" if name == "cifar10c" else "train"
    return build(data_dir, split, **kwargs)
