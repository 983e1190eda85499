"""An on-device batch iterator over in-memory tensors, with DDP sharding.

For data that fits in (GPU) memory a ``DataLoader`` only adds worker processes, collation and a
host-to-device copy per batch; :class:`TensorLoader` keeps the tensors on the device and slices them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


class TensorLoader:
    """Iterate ``(x_batch, y_batch)`` over tensors that live on ``device``.

    * ``x``: ``(N, ...)`` images; ``uint8`` images are stored as ``uint8`` (4× less memory) and each batch
      is converted to ``float32`` in ``[0, 1]`` (set ``to_float=False`` to keep ``uint8``).
    * ``shuffle``: a new permutation every epoch. It comes from ``generator`` when one is given
      (a ``torch.Generator``; under DDP every rank must seed it identically), otherwise from a private
      generator seeded with ``seed + epoch``, so all ranks agree without coordination. The epoch
      advances by one at each ``iter()``; :meth:`set_epoch` sets it explicitly (e.g. on resume).
    * ``rank`` / ``world_size``: this process sees only its shard, every ``world_size``-th example of
      the epoch's order starting at ``rank``. With ``equal_shards=True`` (the default, as
      ``DistributedSampler``) the order is padded by wrapping around so every rank gets
      ``ceil(N / world_size)`` examples and the same number of batches (DDP needs that); with
      ``equal_shards=False`` the shards partition the data exactly (each example on exactly one
      rank), as sharded evaluation needs.
    * ``transform``: an optional callable applied to each (converted) image batch, e.g.
      :class:`fastadv.data.RandomCropFlip`.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        equal_shards: bool = True,
        transform: Callable[[Tensor], Tensor] | None = None,
        to_float: bool = True,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"TensorLoader: x has {x.shape[0]} examples but y has {y.shape[0]}")
        if batch_size <= 0:
            raise ValueError(f"TensorLoader: batch_size must be positive, got {batch_size}")
        if world_size <= 0:
            raise ValueError(f"TensorLoader: world_size must be positive, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TensorLoader: rank must be in [0, {world_size}), got {rank}")
        target = torch.device(device) if device is not None else x.device
        self.x = x.to(target)
        self.y = y.to(target)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.equal_shards = equal_shards
        self.transform = transform
        self.to_float = to_float
        self.epoch = 0

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def num_examples(self) -> int:
        """Examples this rank visits per epoch (before ``drop_last``)."""
        total = self.x.shape[0]
        if self.world_size == 1:
            return total
        if self.equal_shards:
            return -(-total // self.world_size)
        return len(range(self.rank, total, self.world_size))

    def __len__(self) -> int:
        count = self.num_examples
        if self.drop_last:
            return count // self.batch_size
        return -(-count // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch``'s order."""
        self.epoch = epoch

    def _epoch_order(self, epoch: int) -> Tensor | None:
        """Global example order for ``epoch`` (``None`` = the natural order), before sharding."""
        total = self.x.shape[0]
        if not self.shuffle:
            return None
        if self.generator is not None:
            perm = torch.randperm(total, generator=self.generator, device=self.generator.device)
        else:
            private = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(total, generator=private)
        return perm.to(self.device)

    def _shard(self, order: Tensor | None) -> Tensor | None:
        total = self.x.shape[0]
        if self.world_size == 1:
            return order
        if order is None:
            order = torch.arange(total, device=self.device)
        if self.equal_shards and total > 0:
            padded_total = -(-total // self.world_size) * self.world_size
            repeats = -(-padded_total // total)
            order = order.repeat(repeats)[:padded_total]
        return order[self.rank :: self.world_size]

    def _convert(self, xb: Tensor) -> Tensor:
        if self.to_float and xb.dtype == torch.uint8:
            xb = xb.to(torch.float32).div_(255)
        if self.transform is not None:
            xb = self.transform(xb)
        return xb

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Fix the epoch (and draw the permutation) now, not lazily at the first next().
        epoch = self.epoch
        self.epoch += 1
        return self._batches(self._shard(self._epoch_order(epoch)))

    def _batches(self, indices: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
        count = self.num_examples
        limit = count - count % self.batch_size if self.drop_last else count
        for start in range(0, limit, self.batch_size):
            stop = min(start + self.batch_size, limit)
            if indices is None:
                # Natural order on one rank: a slice is a view, no copy.
                xb, yb = self.x[start:stop], self.y[start:stop]
            else:
                idx = indices[start:stop]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            yield self._convert(xb), yb
