"""PART: pixel-reweighted adversarial training (SPECS §2), over AT (``part``), TRADES (``part_trades``) or MART
(``part_mart``).

For the first ``warmup_epochs`` epochs the base method runs unchanged. Afterwards the base method's inner
maximisation runs with a per-pixel budget: ``eps`` (ε_high) on important pixels and ``eps_low`` elsewhere,
through :func:`fastadv.ops.masked_pgd_step_`; the start and the step size stay those of the base method.

Masks (``fastadv.cam.part_masks``: CAM of the predicted class in eval mode, reference ``jet`` recipe or the
monotone ``cam`` recipe; the CAM pass under ``cam_amp`` autocast, by default the run's ``amp``, with BatchNorm
folded when ``fold_bn``) are computed batched for the *current* batch's examples, on their un-augmented images,
every ``cam_every`` epochs, and cached by dataset index (``uint8``) in between; the cached mask follows the
batch's random crop and flip exactly as its image did. Under DDP the masks computed in a refresh epoch are
gathered from all ranks, so every rank holds the whole cache. ``reproduce_misaligned_masks=True`` reproduces the
reference code instead: masks computed on a differently shuffled pass are looked up by position in the epoch,
so every image is attacked with another image's mask (a per-rank cache, saved for every rank).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ...cam import part_masks
from ..data import Batch
from ..distributed import all_gather_tensors, all_reduce_sum
from ._inner import masked_step
from .base import AdversarialMethod, Method
from .pgd_at import PGDAT

if TYPE_CHECKING:
    from ..trainer import Trainer


def pack_bits(values: Tensor) -> Tensor:
    """``uint8`` bytes holding the truthiness of ``values`` (8 entries a byte, little-endian bit order)."""
    flat = values.reshape(-1).to(torch.uint8).ne(0).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: a ``uint8`` 0/1 tensor of ``shape``."""
    count = 1
    for size in shape:
        count *= size
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts).bitwise_and_(1)
    return bits.reshape(-1)[:count].reshape(shape)


class PART(Method):
    """PART over :attr:`base_class` (``part``: PGD-AT)."""

    name = "part"
    base_class: ClassVar[type[AdversarialMethod]] = PGDAT

    def __init__(self, config) -> None:
        super().__init__(config)
        self.base = self.base_class(config)
        self.cache: Tensor | None = None  # uint8 (N, C', H, W): by dataset index (or position when misaligned)
        self.valid: Tensor | None = None  # bool (N,)
        self._all_valid = False
        self._mask_sum: Tensor | None = None
        self._mask_batches = 0

    # ------------------------------------------------------------------ delegation

    def setup(self, trainer: Trainer) -> None:
        self.base.setup(trainer)
        self.world_size = trainer.world_size
        self.dist_info = trainer.dist
        self.num_examples = trainer.train_data.num_examples
        self._device = trainer.device

    def loss(self, net: nn.Module, batch: Batch, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.base.loss(net, batch, x_adv)

    def reweighting(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) uses the per-pixel budget (after the warm-up)."""
        return epoch >= self.config.warmup_epochs

    def refresh_epoch(self, epoch: int) -> bool:
        """Whether the masks are recomputed during ``epoch``."""
        return self.reweighting(epoch) and (epoch - self.config.warmup_epochs) % self.config.cam_every == 0

    def perturb(self, trainer: Trainer, batch: Batch) -> Tensor:
        if not self.reweighting(trainer.epoch):
            return self.base.perturb(trainer, batch)
        mask = self.masks_for(trainer, batch)
        c = self.config
        self._mask_sum = mask.float().mean() + (self._mask_sum if self._mask_sum is not None else 0.0)
        self._mask_batches += 1
        return self.base.perturb_with(trainer, batch, masked_step(mask, c.eps, c.eps_low, c.alpha))

    # ------------------------------------------------------------------ masks

    def compute_masks(self, trainer: Trainer, images: Tensor) -> Tensor:
        """``uint8`` masks of ``images`` from the current model (one batched CAM pass in eval mode)."""
        c = self.config
        return part_masks(trainer.model, images, c.cam_layer, c.cam_method, c.cam_recipe,
                          amp=trainer.amp if c.cam_amp is None else c.cam_amp, fold_bn=c.fold_bn).to(torch.uint8)

    def _ensure_cache(self, masks: Tensor) -> None:
        if self.cache is None:
            self.cache = torch.zeros((self.num_examples, *masks.shape[1:]), dtype=torch.uint8, device=masks.device)
            self.valid = torch.zeros(self.num_examples, dtype=torch.bool, device=masks.device)

    def _store(self, keys: Tensor, masks: Tensor) -> None:
        self._ensure_cache(masks)
        self.cache[keys] = masks
        self.valid[keys] = True
        self._all_valid = False

    def _fill_missing(self, trainer: Trainer, keys: Tensor, images_of) -> None:
        """Compute the masks of the cache entries ``keys`` that were never filled (first use, resume)."""
        if self.cache is not None and self._all_valid:
            return
        missing = keys if self.valid is None else keys[~self.valid[keys]]
        if missing.numel():
            self._store(missing, self.compute_masks(trainer, images_of(missing)))
        self._all_valid = bool(self.valid.all())

    def masks_for(self, trainer: Trainer, batch: Batch) -> Tensor:
        """Boolean masks ``(B, C', H, W)`` aligned with ``batch.x`` (see the module docstring)."""
        if self.config.reproduce_misaligned_masks:
            return self._misaligned_masks(trainer, batch)
        if batch.index is None:
            raise ValueError("PART needs the dataset index of every example (use the trainer's data pipeline)")
        index = batch.index
        if self.refresh_epoch(trainer.epoch):
            fresh = self.compute_masks(trainer, batch.raw)
            if self.world_size > 1:
                # Every rank sees other indices in later epochs: share the refreshed masks.
                self._store(all_gather_tensors(index, self.dist_info), all_gather_tensors(fresh, self.dist_info))
            else:
                self._store(index, fresh)
        else:
            self._fill_missing(trainer, index, trainer.train_data.fetch)
        return batch.follow_augmentation(self.cache[index]).bool()

    def _misaligned_masks(self, trainer: Trainer, batch: Batch) -> Tensor:
        position = batch.position
        epoch = trainer.epoch
        # The reference's mask pass iterates the same data in another random order; its p-th mask is used for
        # the p-th example of the training pass. The order is a function of the seed and the epoch.
        if getattr(self, "_order_epoch", None) != epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7919 * epoch)
            self._order = torch.randperm(self.num_examples, generator=generator).to(position.device)
            self._order_epoch = epoch
        order = self._order

        def images_of(positions: Tensor) -> Tensor:
            return trainer.train_data.fetch(order[positions % self.num_examples])

        if self.refresh_epoch(epoch):
            self._store(position, self.compute_masks(trainer, images_of(position)))
        else:
            self._fill_missing(trainer, position, images_of)
        return self.cache[position].bool()

    # ------------------------------------------------------------------ logging and state

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.base.on_epoch_start(trainer, epoch)

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        self.base.on_epoch_end(trainer, epoch, record)
        record["part_phase"] = "reweighted" if self.reweighting(epoch) else "warmup"
        if self.reweighting(epoch):
            # Mean fraction of important pixels over the epoch's batches of every rank.
            totals = torch.zeros(2, dtype=torch.float64, device=self._device)
            if self._mask_batches:
                totals[0], totals[1] = self._mask_sum.double(), self._mask_batches
            total, batches = all_reduce_sum(totals, self.dist_info).tolist()
            if batches:
                record["mask_fraction"] = total / batches
        # Reset here, not at the epoch start: a run resumed mid-epoch restores the partial sums.
        self._mask_sum, self._mask_batches = None, 0

    def _cache_state(self) -> dict:
        if self.cache is None:
            return {}
        return {"cache_shape": list(self.cache.shape), "cache": pack_bits(self.cache).cpu(), "valid": self.valid.cpu()}

    def _load_cache_state(self, state: dict) -> None:
        if "cache" not in state:
            return
        shape = tuple(state["cache_shape"])
        if shape[0] != self.num_examples:
            raise ValueError(f"PART: the checkpoint's mask cache covers {shape[0]} examples, the training data "
                             f"has {self.num_examples}")
        self.cache = unpack_bits(state["cache"].to(self._device), shape)
        self.valid = state["valid"].to(self.cache.device)
        self._all_valid = bool(self.valid.all())

    def state_dict(self) -> dict:
        # The index-keyed cache is the same on every rank (refreshed masks are gathered); the position-keyed
        # cache of the misaligned mode is per rank (see rank_state_dict).
        state: dict[str, Any] = {"base": self.base.state_dict()}
        if not self.config.reproduce_misaligned_masks:
            state.update(self._cache_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state.get("base", {}))
        self._load_cache_state(state)

    def rank_state_dict(self) -> dict:
        state: dict[str, Any] = {"base": self.base.rank_state_dict(), "mask_batches": self._mask_batches,
                                 "mask_sum": None if self._mask_sum is None else self._mask_sum.detach().cpu()}
        if self.config.reproduce_misaligned_masks:
            state.update(self._cache_state())
        return state

    def load_rank_state_dict(self, state: dict) -> None:
        self.base.load_rank_state_dict(state.get("base", {}))
        self._mask_batches = int(state.get("mask_batches", 0))
        mask_sum = state.get("mask_sum")
        self._mask_sum = None if mask_sum is None else mask_sum.to(self._device)
        self._load_cache_state(state)


__all__ = ["PART", "pack_bits", "unpack_bits"]
