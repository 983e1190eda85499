"""Visual prompts: a learnable canvas around (or over) the target image, built in one pass by
:func:`fastadv.ops.prompt_pad`.

Three geometries (SPECS §3), all with a prompt parameter of shape ``(C, out_size, out_size)``:

=========  =======================================  =====================================  =========================
geometry   image placement                          prompt                                 normalisation (mean/std)
=========  =======================================  =====================================  =========================
``ilm``    native size (``image_size``) centred     ``sigmoid(θ)`` on the whole border,    whole canvas, after
           in ``out_size`` (ILM-VP)                 θ = 0 init                             prompting (ImageNet)
``tarp``   bilinear resize to ``rescale`` (192, or  ``tanh(W)`` on the border              image only, before
           224 = no prompt) centred (TARP-VP)       (16 px at 192/224), W = 0 init         placement (target data)
``pad``    bilinear resize to fill ``out_size``     ``θ`` added on a frame of width        image only, before adding
           (Bahng et al.)                           ``pad_width`` (30), ``randn`` init     (ImageNet)
=========  =======================================  =====================================  =========================

The image is placed at offset ``(out_size - inner_size + 1) // 2``. Inputs are pixel-space images in
``[0, 1]``; everything an attack perturbs is the image *before* placement, so no attack can touch the prompt.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..data.normalize import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

GEOMETRIES = ("ilm", "tarp", "pad")
INITS = ("zeros", "randn")

# activation, combination mode, where mean/std apply, default statistics, default initialisation
_GEOMETRY = {
    "ilm": ("sigmoid", "replace", "canvas", (IMAGENET_MEAN, IMAGENET_STD), "zeros"),
    "tarp": ("tanh", "replace", "image", (CIFAR10_MEAN, CIFAR10_STD), "zeros"),
    "pad": ("none", "add", "image", (IMAGENET_MEAN, IMAGENET_STD), "randn"),
}
_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "none": lambda t: t}

#: pass as ``mean``/``std`` to use the geometry's default statistics
DEFAULT = "default"


def _fail(message: str) -> None:
    raise ValueError(f"fastadv.prompting.VisualPrompt: {message}")


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _fail(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _stats(name: str, value, channels: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.detach().flatten().tolist()
    if not isinstance(value, Sequence) or isinstance(value, str):
        _fail(f"`{name}` must be None, {DEFAULT!r} or one number per channel, got {value!r}")
    values = tuple(float(v) for v in value)
    if len(values) != channels:
        _fail(f"`{name}` needs one value per channel ({channels}), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        _fail(f"`{name}` must be finite, got {values}")
    if name == "std" and not all(v > 0 for v in values):
        _fail(f"`std` must be positive, got {values}")
    return values


class VisualPrompt(nn.Module):
    """A learnable visual prompt: ``VisualPrompt("tarp")(x)`` is the ``(B, C, out_size, out_size)`` canvas.

    Arguments: ``geometry`` (``"ilm"``, ``"tarp"`` or ``"pad"``, see the module docstring); ``out_size`` (the
    source network's input size, 224); ``image_size`` (``ilm``: the native size of the target images, which
    must match exactly); ``rescale`` (``tarp``: the size the image is resized to, 192; 224 leaves no border);
    ``pad_width`` (``pad``: width of the additive frame, 30); ``channels``; ``mean``/``std`` (``"default"``: the
    geometry's statistics, ImageNet for ``ilm``/``pad`` and CIFAR-10 for ``tarp`` — pass the target training
    set's ``channel_stats()`` for other data; ``None``: no normalisation); ``init`` (``"zeros"`` or ``"randn"``;
    default per geometry); ``generator`` (a ``torch.Generator`` or an int seed for the ``randn`` init).

    The parameter is :attr:`prompt` (``θ`` / ``W``), shape ``(C, out_size, out_size)``; :meth:`activated` is
    ``act(θ)``, the values the border shows (before canvas normalisation), and :meth:`border_mask` the pixels
    where it shows.
    """

    def __init__(self, geometry: str = "ilm", *, out_size: int = 224, image_size: int = 32, rescale: int = 192,
                 pad_width: int = 30, channels: int = 3, mean=DEFAULT, std=DEFAULT, init: str | None = None,
                 generator: torch.Generator | int | None = None) -> None:
        super().__init__()
        if geometry not in _GEOMETRY:
            _fail(f"unknown `geometry` {geometry!r}; valid: {', '.join(GEOMETRIES)}")
        activation, mode, normalize, (default_mean, default_std), default_init = _GEOMETRY[geometry]
        out_size = _positive_int("out_size", out_size)
        channels = _positive_int("channels", channels)
        if geometry == "ilm":
            inner = _positive_int("image_size", image_size)
            if inner > out_size:
                _fail(f"`image_size` {inner} is larger than the canvas `out_size` {out_size}")
        elif geometry == "tarp":
            inner = _positive_int("rescale", rescale)
            if inner > out_size:
                _fail(f"`rescale` {inner} is larger than the canvas `out_size` {out_size}")
        else:
            width = _positive_int("pad_width", pad_width, minimum=0)
            if 2 * width >= out_size:
                _fail(f"`pad_width` {width} leaves no image window on a canvas of `out_size` {out_size}")
            inner = out_size - 2 * width
        for name, value in (("mean", mean), ("std", std)):
            if isinstance(value, str) and value != DEFAULT:
                _fail(f"`{name}` must be numbers per channel, None or {DEFAULT!r}, got {value!r}")
        if (mean is None) != (std is None) or isinstance(mean, str) != isinstance(std, str):
            _fail("give both `mean` and `std` (numbers per channel), both None (no normalisation) or neither "
                  "(the geometry's default statistics)")
        if isinstance(mean, str):
            if channels != len(default_mean):
                _fail(f"the default statistics of {geometry!r} have 3 channels; pass `mean`/`std` for {channels}")
            mean, std = default_mean, default_std
        init = default_init if init is None else init
        if init not in INITS:
            _fail(f"unknown `init` {init!r}; valid: {', '.join(INITS)}")

        self.geometry = geometry
        self.out_size = out_size
        self.inner_size = inner
        self.channels = channels
        self.activation = activation
        self.mode = mode
        self.normalize = normalize
        self.mean = _stats("mean", mean, channels)
        self.std = _stats("std", std, channels)
        self.init = init
        shape = (channels, out_size, out_size)
        if init == "zeros":
            value = torch.zeros(shape)
        else:
            if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
                generator = torch.Generator().manual_seed(int(generator))
            elif generator is not None and not isinstance(generator, torch.Generator):
                _fail(f"`generator` must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
            value = torch.randn(shape, generator=generator)
        self.prompt = nn.Parameter(value)

    # ------------------------------------------------------------------ geometry

    @property
    def offset(self) -> int:
        """Top (= left) offset of the image window on the canvas."""
        return (self.out_size - self.inner_size + 1) // 2

    @property
    def image_box(self) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the window the image occupies (``replace``) or that is free of
        prompt (``add``)."""
        return (self.offset, self.offset, self.inner_size, self.inner_size)

    def border_mask(self, device: torch.device | str | None = None) -> Tensor:
        """``(out_size, out_size)`` bool mask of the pixels where the prompt shows."""
        mask = torch.ones(self.out_size, self.out_size, dtype=torch.bool, device=device)
        top, left, h, w = self.image_box
        mask[top:top + h, left:left + w] = False
        return mask

    def activated(self) -> Tensor:
        """``act(prompt)``: the prompt values on the canvas (before any canvas normalisation)."""
        return _ACTIVATIONS[self.activation](self.prompt)

    # ------------------------------------------------------------------ forward

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` when ``x`` cannot be prompted (shape metadata only: no device sync)."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            _fail(f"`x` must be a (B, C, H, W) image tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[1] != self.channels:
            _fail(f"`x` has {x.shape[1]} channels, the prompt {self.channels}")
        if self.geometry == "ilm":
            h, w = x.shape[-2:]
            size = self.inner_size
            if h > size or w > size:
                _fail(f"`x` is {h}x{w}, larger than the inner size `image_size`={size} of the 'ilm' geometry "
                      "(which places images at their native size); build the prompt with image_size="
                      f"{max(h, w)} or use the 'tarp' geometry, which resizes")
            if (h, w) != (size, size):
                _fail(f"`x` is {h}x{w} but the 'ilm' geometry places images of `image_size`={size} at their "
                      "native size; build the prompt with the images' size or use the 'tarp' geometry")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        prompt = self.prompt if self.prompt.dtype == x.dtype else self.prompt.to(x.dtype)
        return ops.prompt_pad(x, prompt, out_size=self.out_size, inner_size=self.inner_size,
                              activation=self.activation, mode=self.mode, mean=self.mean, std=self.std,
                              normalize=self.normalize)

    def config(self) -> dict:
        """JSON-friendly description."""
        return {"geometry": self.geometry, "out_size": self.out_size, "inner_size": self.inner_size,
                "activation": self.activation, "mode": self.mode, "normalize": self.normalize,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "init": self.init, "channels": self.channels}

    def extra_repr(self) -> str:
        normalize = self.normalize if self.mean else None
        return (f"geometry={self.geometry!r}, out_size={self.out_size}, inner_size={self.inner_size}, "
                f"activation={self.activation!r}, mode={self.mode!r}, normalize={normalize!r}")


__all__ = ["DEFAULT", "GEOMETRIES", "INITS", "VisualPrompt"]
