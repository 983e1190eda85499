"""Batches from the data forms the prompting API accepts: an ``(x, y)`` tensor pair, an
:class:`fastadv.data.ImageSet`, a :class:`fastadv.data.TensorLoader` or any iterable of ``(x, y, ...)`` batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from ..data import ImageSet, TensorLoader


def as_pair(data, what: str) -> tuple[Tensor, Tensor] | None:
    """``(x, y)`` for a tensor pair or an ImageSet; ``None`` for a loader / iterable."""
    if isinstance(data, ImageSet):
        return data.x, data.y
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"`{what}`: x has {x.shape[0]} examples but y has {y.shape[0]}")
        return x, y
    return None


def to_float_images(x: Tensor) -> Tensor:
    """``uint8`` images become ``float32`` in ``[0, 1]``; float images are returned as they are."""
    return x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x


def batches(data, batch_size: int, device: torch.device, what: str = "data") -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches on ``device`` (float images, ``int64`` labels), in the data's order."""
    pair = as_pair(data, what)
    if pair is not None:
        x, y = pair
        for start in range(0, x.shape[0], batch_size):
            yield (to_float_images(x[start:start + batch_size].to(device)),
                   y[start:start + batch_size].to(device=device, dtype=torch.long))
        return
    if not isinstance(data, Iterable):
        raise ValueError(f"`{what}` must be an (x, y) tensor pair, an ImageSet, a TensorLoader or an iterable of "
                         f"(x, y) batches, got {type(data).__name__}")
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"`{what}`: batch {i} is not an (x, y) pair but {type(batch).__name__}")
        yield to_float_images(batch[0].to(device)), batch[1].to(device=device, dtype=torch.long)


def first_images(data, n: int, device: torch.device, what: str = "data") -> tuple[Tensor, Tensor]:
    """The first ``n`` examples (or fewer) of ``data`` as one batch."""
    xs, ys, count = [], [], 0
    for x, y in batches(data, n, device, what):
        xs.append(x[: n - count])
        ys.append(y[: n - count])
        count += xs[-1].shape[0]
        if count >= n:
            break
    if not xs:
        raise ValueError(f"`{what}` yielded no examples")
    return torch.cat(xs), torch.cat(ys)


def subset(data, n: int | None, what: str):
    """The first ``n`` examples of a tensor pair / ImageSet as an ``(x, y)`` pair (loaders are returned as
    they are when ``n`` is None)."""
    pair = as_pair(data, what)
    if pair is None:
        if n is not None:
            raise ValueError(f"`{what}`: a subset size needs an (x, y) pair or an ImageSet, not a loader")
        return data
    x, y = pair
    return (x[:n], y[:n]) if n is not None else (x, y)


def num_examples(data) -> int | None:
    pair = as_pair(data, "data")
    if pair is not None:
        return int(pair[0].shape[0])
    if isinstance(data, TensorLoader):
        return data.num_examples
    return None
