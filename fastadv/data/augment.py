"""Batched, on-device crop + flip augmentation (the standard CIFAR recipe) without per-image loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, padding: int = 4, fill: float = 0) -> Tensor:
    """Deterministic core of :func:`random_crop_flip`.

    Pads ``x`` (``(B, C, H, W)``, any dtype) by ``padding`` pixels of value ``fill`` on every side, cuts
    from padded image ``b`` the ``H×W`` window whose top-left corner is ``offsets[b] = (row, col)``
    (each in ``[0, 2·padding]``), and mirrors it left–right where ``flips[b]`` is true. One gather for the
    whole batch.
    """
    if x.dim() != 4:
        raise ValueError(f"crop_flip: x must be a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"crop_flip: padding must be >= 0, got {padding}")
    batch, channels, height, width = x.shape
    if offsets.shape != (batch, 2):
        raise ValueError(f"crop_flip: offsets must have shape ({batch}, 2), got {tuple(offsets.shape)}")
    if flips.shape != (batch,):
        raise ValueError(f"crop_flip: flips must have shape ({batch},), got {tuple(flips.shape)}")
    if batch == 0:
        return x.clone()
    offsets = offsets.to(device=x.device, dtype=torch.long)
    if offsets.min() < 0 or offsets.max() > 2 * padding:
        raise ValueError(f"crop_flip: offsets must lie in [0, {2 * padding}]")
    return _crop_flip(x, offsets, flips.to(device=x.device, dtype=torch.bool), padding, fill)


def _crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, padding: int, fill: float) -> Tensor:
    # No checks that read device values here: the random path must not synchronise with the host.
    batch, channels, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), value=fill) if padding else x
    padded_width = width + 2 * padding
    rows = offsets[:, :1] + torch.arange(height, device=x.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(width, device=x.device)  # (B, W)
    # Mirroring the crop reverses its column order.
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, height * width)
    out = padded.reshape(batch, channels, -1).gather(2, index.expand(batch, channels, height * width))
    return out.view(batch, channels, height, width)


def random_crop_flip(
    x: Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    fill: float = 0,
) -> Tensor:
    """Random crop after zero padding (``padding`` pixels) and random horizontal flip (p = ½), per image.

    Draws all random numbers at once from ``generator`` (on the generator's device; the global RNG when
    ``None``) and returns a new tensor of the same shape, dtype and device as ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip: x must be a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"random_crop_flip: padding must be >= 0, got {padding}")
    batch = x.shape[0]
    if batch == 0:
        return x.clone()
    device = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator, device=device)
    if flip:
        flips = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()
    else:
        flips = torch.zeros(batch, dtype=torch.bool, device=device)
    return _crop_flip(x, offsets.to(x.device), flips.to(x.device), padding, fill)


class RandomCropFlip(nn.Module):
    """Module form of :func:`random_crop_flip`; holds an optional private ``torch.Generator``."""

    def __init__(
        self,
        padding: int = 4,
        flip: bool = True,
        generator: torch.Generator | None = None,
        fill: float = 0,
    ) -> None:
        super().__init__()
        if padding < 0:
            raise ValueError(f"RandomCropFlip: padding must be >= 0, got {padding}")
        self.padding = padding
        self.flip = flip
        self.generator = generator
        self.fill = fill

    def forward(self, x: Tensor) -> Tensor:
        return random_crop_flip(x, self.padding, self.flip, self.generator, self.fill)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, flip={self.flip}"
