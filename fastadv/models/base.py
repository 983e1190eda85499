"""The interface every fastadv model exposes, and the normalisation wrapper.

A model is a feature extractor followed by one linear layer:

* ``features(x)`` -> ``(B, feature_dim)``, the penultimate pooled features (what RRM matches);
* ``head``         -> the final ``nn.Linear``; ``forward(x) == head(features(x))``;
* ``feature_dim``  -> ``D``;
* ``cam_layer_name`` (a dotted sub-module name) and ``cam_layer`` (that module): the last convolutional
  block, whose ``(B, C, h, w)`` output :mod:`fastadv.cam` hooks for class activation maps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from torch import Tensor, nn

from ..data.normalize import Normalize


class FeatureModel(nn.Module, ABC):
    """Base class: subclasses set ``self.head``, ``self.feature_dim`` and ``cam_layer_name`` and
    implement :meth:`features`."""

    feature_dim: int
    cam_layer_name: str | None = None

    @abstractmethod
    def features(self, x: Tensor) -> Tensor:
        """Penultimate pooled features, ``(B, feature_dim)``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output is the last convolutional feature map (see ``cam_layer_name``)."""
        if self.cam_layer_name is None:
            raise AttributeError(f"{type(self).__name__} has no spatial layer to use as a CAM target")
        return self.get_submodule(self.cam_layer_name)


class NormalizedModel(nn.Sequential):
    """``nn.Sequential(Normalize(mean, std), model)`` that still exposes the wrapped model's interface:
    ``features(x)`` normalises first, ``head``/``feature_dim`` are the wrapped model's, and
    ``cam_layer_name`` is prefixed with ``"1."`` so that it names the same module from the wrapper."""

    def __init__(self, normalize: Normalize, model: nn.Module) -> None:
        super().__init__(normalize, model)

    @property
    def normalize(self) -> Normalize:
        return self[0]

    @property
    def model(self) -> nn.Module:
        return self[1]

    def features(self, x: Tensor) -> Tensor:
        return self.model.features(self.normalize(x))

    @property
    def head(self) -> nn.Module:
        return self.model.head

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    @property
    def cam_layer_name(self) -> str:
        return f"1.{self.model.cam_layer_name}"

    @property
    def cam_layer(self) -> nn.Module:
        return self.model.cam_layer


def with_normalization(
    model: nn.Module, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> NormalizedModel:
    """Prepend ``Normalize(mean, std)`` so the model takes ``[0, 1]`` pixels (what attacks work on)."""
    return NormalizedModel(Normalize(mean, std), model)
