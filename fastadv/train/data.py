"""The trainer's view of the data: resumable, sharded epochs of indexed batches, and on-device augmentation.

Two sources are accepted:

* in-memory images (an :class:`fastadv.data.ImageSet` or ``(x, y)`` tensors) go through
  :class:`fastadv.data.TensorLoader` on the training device; the epoch order comes from a
  ``torch.Generator`` seeded identically on every rank, whose state at the start of the epoch is part of the
  checkpoint (so a resumed epoch replays the same order);
* a map-style ``torch.utils.data.Dataset`` returning ``(image, label)`` tensors goes through a ``DataLoader`` with
  a ``DistributedSampler`` (order = a function of ``seed`` and the epoch; a resumed epoch skips the finished
  batches in the sampler, without loading them).

Every batch carries the dataset indices of its examples (PART caches masks by index) and its positions in the
epoch. Augmentation (random crop with zero padding + horizontal flip) is drawn on the device from the trainer's
generator *after* loading, and its offsets/flips are kept so that per-pixel masks can follow the images.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data import TensorLoader
from ..data.augment import crop_flip


@dataclass
class Batch:
    """One training batch on the device.

    ``x``: the (augmented) images the method trains on; ``y``: labels; ``index``: dataset indices;
    ``position``: positions within this rank's epoch order; ``raw``: the images before augmentation;
    ``crop``: ``(offsets, flips, padding)`` of the augmentation (``None`` without augmentation).
    """

    x: Tensor
    y: Tensor
    index: Tensor | None = None
    position: Tensor | None = None
    raw: Tensor | None = None
    crop: tuple[Tensor, Tensor, int] | None = None

    def __post_init__(self) -> None:
        if self.raw is None:
            self.raw = self.x

    def follow_augmentation(self, maps: Tensor) -> Tensor:
        """Apply this batch's crop and flip to per-pixel ``maps`` ``(B, C, H, W)`` (e.g. PART masks computed on
        ``raw``), filling the padding with zeros."""
        if self.crop is None:
            return maps
        offsets, flips, padding = self.crop
        return crop_flip(maps, offsets, flips, padding=padding, fill=0)


class _IndexedDataset(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.dataset[i][:2]
        return torch.as_tensor(x), torch.as_tensor(y), i


class _SkippingBatchSampler:
    """Batches of a sampler's indices for one epoch, starting after ``skip`` batches."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, drop_last: bool, skip: int) -> None:
        self.sampler, self.batch_size, self.drop_last, self.skip = sampler, batch_size, drop_last, skip

    def _all(self) -> list[list[int]]:
        order = list(self.sampler)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self):
        return iter(self._all()[self.skip:])

    def __len__(self) -> int:
        return max(len(self._all()) - self.skip, 0)


def _as_tensors(source) -> tuple[Tensor, Tensor] | None:
    if hasattr(source, "x") and hasattr(source, "y") and isinstance(getattr(source, "x"), Tensor):
        return source.x, source.y
    if isinstance(source, (tuple, list)) and len(source) == 2 and all(isinstance(t, Tensor) for t in source):
        return source[0], source[1]
    return None


class TrainData:
    """Epochs of :class:`Batch` for this rank, resumable at batch granularity."""

    def __init__(self, source, *, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1,
                 seed: int = 0, drop_last: bool = False, num_workers: int = 0) -> None:
        self.device = device
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        tensors = _as_tensors(source)
        self._pending_state: Tensor | None = None
        if tensors is not None:
            x, y = tensors
            if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"training data: expected images (N, C, H, W) and labels (N,), got "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}")
            self.dataset = None
            self.x = x.to(device)
            self.y = y.to(device=device, dtype=torch.long)
            self.generator = torch.Generator().manual_seed(seed)
            self._epoch_start_state = self.generator.get_state()
            self.loader = TensorLoader(self.x, torch.arange(x.shape[0], device=device), batch_size, shuffle=True,
                                       generator=self.generator, drop_last=drop_last, rank=rank,
                                       world_size=world_size, to_float=False)
            self.num_examples = x.shape[0]
            self.sample_shape = tuple(x.shape[1:])
        elif isinstance(source, Dataset):
            self.dataset = source
            self.generator = None
            self.num_examples = len(source)  # type: ignore[arg-type]
            self.sampler = DistributedSampler(source, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                              drop_last=False)
            self.drop_last = drop_last
            self.num_workers = num_workers
            first = torch.as_tensor(source[0][0])
            if first.dim() != 3:
                raise ValueError(f"training dataset items must be (image (C, H, W), label); got an image of shape "
                                 f"{tuple(first.shape)}")
            self.sample_shape = tuple(first.shape)
        else:
            raise TypeError("training data must be an ImageSet, an (x, y) pair of tensors or a map-style "
                            f"torch Dataset, got {type(source).__name__}")
        if self.num_examples == 0:
            raise ValueError("training data is empty")

    def __len__(self) -> int:
        if self.dataset is None:
            return len(self.loader)
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    @staticmethod
    def _float(x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255)
        return x if x.dtype == torch.float32 else x.float()

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` for this rank, without the first ``skip`` ones."""
        if self.dataset is None:
            if self._pending_state is not None:
                self.generator.set_state(self._pending_state)
                self._pending_state = None
            self._epoch_start_state = self.generator.get_state()
            self.loader.set_epoch(epoch)
            batches = itertools.islice(iter(self.loader), skip, None)
            return self._tensor_batches(batches, skip)
        self.sampler.set_epoch(epoch)
        loader = DataLoader(_IndexedDataset(self.dataset), batch_sampler=_SkippingBatchSampler(
            self.sampler, self.batch_size, self.drop_last, skip), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda")
        return self._dataset_batches(loader, skip)

    def _tensor_batches(self, batches, skip: int) -> Iterator[Batch]:
        start = skip * self.batch_size
        for xb, index in batches:
            n = index.shape[0]
            position = torch.arange(start, start + n, device=self.device)
            start += n
            yield Batch(self._float(xb), self.y[index], index, position)

    def _dataset_batches(self, loader, skip: int) -> Iterator[Batch]:
        start = skip * self.batch_size
        for xb, yb, index in loader:
            n = index.shape[0]
            position = torch.arange(start, start + n, device=self.device)
            start += n
            yield Batch(self._float(xb.to(self.device, non_blocking=True)),
                        yb.to(self.device, dtype=torch.long, non_blocking=True), index.to(self.device), position)

    def fetch(self, index: Tensor) -> Tensor:
        """Un-augmented float images of the given dataset indices, on the device."""
        if self.dataset is None:
            return self._float(self.x.index_select(0, index.to(self.device)))
        items = [torch.as_tensor(self.dataset[int(i)][0]) for i in index.tolist()]
        return self._float(torch.stack(items).to(self.device))

    def state_dict(self) -> dict:
        """The order generator's state at the start of the current epoch and now."""
        if self.generator is None:
            return {}
        return {"epoch_start": self._epoch_start_state.clone(), "current": self.generator.get_state()}

    def load_state_dict(self, state: dict, mid_epoch: bool) -> None:
        """Restore the order generator: to the start of the interrupted epoch (``mid_epoch``) or to its
        state after the last finished epoch."""
        if self.generator is None or not state:
            return
        self._pending_state = (state["epoch_start"] if mid_epoch else state["current"]).cpu()


def augment(batch: Batch, generator: torch.Generator, padding: int) -> Batch:
    """Random crop (``padding`` px of zeros) + horizontal flip of ``batch.x``, drawn from ``generator``; the
    offsets/flips are recorded in ``batch.crop`` and the un-augmented images kept in ``batch.raw``."""
    x = batch.x
    n = x.shape[0]
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=generator.device)
    flips = torch.randint(0, 2, (n,), generator=generator, device=generator.device).bool()
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    return Batch(crop_flip(x, offsets, flips, padding=padding), batch.y, batch.index, batch.position, raw=x,
                 crop=(offsets, flips, padding))


class EvalData:
    """This rank's exact share of a held-out set (each example on exactly one rank), in fixed order."""

    def __init__(self, source, *, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1,
                 limit: int | None = None) -> None:
        tensors = _as_tensors(source)
        if tensors is None:
            if not isinstance(source, Dataset):
                raise TypeError("evaluation data must be an ImageSet, an (x, y) pair of tensors or a torch Dataset, "
                                f"got {type(source).__name__}")
            total = len(source)  # type: ignore[arg-type]
            count = total if limit is None else min(limit, total)
            items = [source[i] for i in range(count)]
            tensors = (torch.stack([torch.as_tensor(it[0]) for it in items]),
                       torch.as_tensor([int(it[1]) for it in items]))
        x, y = tensors
        if limit is not None:
            x, y = x[:limit], y[:limit]
        self.x = x.to(device)
        self.y = y.to(device=device, dtype=torch.long)
        self.num_examples = self.x.shape[0]
        self.loader = TensorLoader(self.x, self.y, batch_size, shuffle=False, rank=rank, world_size=world_size,
                                   equal_shards=False)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for xb, yb in self.loader:
            yield TrainData._float(xb), yb

    def head(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` examples (the same on every rank)."""
        return TrainData._float(self.x[:n]), self.y[:n]


__all__ = ["Batch", "EvalData", "TrainData", "augment"]
