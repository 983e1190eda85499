"""Per-channel normalisation as a model layer, and the standard dataset statistics.

fastadv keeps every image tensor in pixel space ``[0, 1]``; a network trained on normalised inputs
carries :class:`Normalize` as its first layer so that attacks and masks never see normalised values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# Per-channel mean and population standard deviation of the CIFAR-10 training set.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The values many CIFAR codebases use (they are not the dataset's standard deviation); needed to
# reproduce checkpoints that were trained with them.
CIFAR10_STD_LEGACY = (0.2023, 0.1994, 0.2010)

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_channel_vector(values: Sequence[float] | Tensor, what: str) -> Tensor:
    vec = torch.as_tensor(values, dtype=torch.float32).detach().clone().flatten()
    if vec.numel() == 0:
        raise ValueError(f"Normalize: {what} must hold one value per channel, got an empty sequence")
    if not torch.isfinite(vec).all():
        raise ValueError(f"Normalize: {what} must be finite, got {vec.tolist()}")
    return vec


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel of a ``(B, C, H, W)`` batch.

    ``mean`` and ``std`` are stored once as buffers of shape ``(1, C, 1, 1)`` so they follow the module
    across ``.to(device)`` / ``.half()`` and are never copied again per call. They are not written to
    ``state_dict``: they are construction parameters, so a checkpoint of
    ``with_normalization(model, ...)`` holds exactly the wrapped model's tensors.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        super().__init__()
        mean_vec = _as_channel_vector(mean, "mean")
        std_vec = _as_channel_vector(std, "std")
        if mean_vec.numel() != std_vec.numel():
            raise ValueError(
                f"Normalize: mean has {mean_vec.numel()} channels but std has {std_vec.numel()}"
            )
        if (std_vec <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {std_vec.tolist()}")
        self.register_buffer("mean", mean_vec.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_vec.view(1, -1, 1, 1), persistent=False)

    @property
    def num_channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        channels = self.num_channels
        if x.dim() != 4 or (channels > 1 and x.shape[1] != channels):
            raise ValueError(
                f"Normalize: expected a (B, {channels}, H, W) batch, got shape {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"
