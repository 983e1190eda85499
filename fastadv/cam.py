"""Batched class activation maps and PART's pixel-importance masks.

CAMs (one forward and one backward per batch, gradients w.r.t. the target layer's activations only):

* ``gradcam``  (Selvaraju et al. 2017): ``w_k = mean_ij ∂y_c/∂A_k[i,j]``, ``cam = ReLU(Σ_k w_k A_k)``;
* ``xgradcam`` (Fu et al. 2020): ``w_k = Σ_ij (A_k[i,j] / (Σ_ij A_k[i,j] + 1e-7)) ∂y_c/∂A_k[i,j]``,
  ``cam = ReLU(Σ_k w_k A_k)``;
* ``layercam`` (Jiang et al. 2021): ``cam = ReLU(Σ_k ReLU(∂y_c/∂A_k) ⊙ A_k)``;

where ``y_c`` is the logit of the target class (the predicted class unless labels are given) and ``A``
the ``(B, C, h, w)`` output of the target layer. The model runs in eval mode, so every sample's
gradient is its own and a batch gives the same maps as one sample at a time.

PART masks (SPECS §2 reference recipe, ``recipe="jet"``): min–max normalise each CAM → upsample to the
image size with PIL's bicubic resampling → square → matplotlib's 256-entry ``jet`` colour table →
standardise the ``3×H×W`` colour image (population std) → ``mask = z > 1`` per colour channel; a
constant CAM gives an all-False mask. ``recipe="cam"`` is the monotone variant: standardise the
upsampled CAM itself, threshold, one mask shared by all channels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .models.fold import TAP_NAME, eval_view
from .utils import AMP_DTYPES, auto_channels_last, autocast_context, has_conv2d

CAM_METHODS = ("gradcam", "xgradcam", "layercam")
MASK_RECIPES = ("jet", "cam")

# Guards XGradCAM's normalisation by the spatial sum of a channel that is zero everywhere.
XGRADCAM_EPS = 1e-7


# --------------------------------------------------------------------------------------------------
# class activation maps


def resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    """The target module: ``layer`` itself, the sub-module named by a dotted string, or, for ``None``,
    the model's ``cam_layer`` (every :mod:`fastadv.models` model has one)."""
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer)
        except AttributeError as exc:
            raise ValueError(f"CAM target layer {layer!r} is not a sub-module of {type(model).__name__}") from exc
    if layer is None:
        module = getattr(model, "cam_layer", None)
        if isinstance(module, nn.Module):
            return module
        raise ValueError(
            f"{type(model).__name__} has no cam_layer: pass layer=<module or dotted sub-module name>"
        )
    raise TypeError(f"layer must be an nn.Module, a dotted name or None, got {type(layer).__name__}")


def compute_cam(
    model: nn.Module,
    x: Tensor,
    layer: nn.Module | str | None = None,
    *,
    method: str = "gradcam",
    target: Tensor | Sequence[int] | None = None,
    amp: str | None = None,
    channels_last: bool | None = None,
    fold_bn: bool = True,
) -> Tensor:
    """Class activation maps ``(B, h, w)`` (float32, after ReLU) of ``model`` on the batch ``x``.

    ``layer``: the target module, a dotted sub-module name, or ``None`` for ``model.cam_layer``; its
    output must be a ``(B, C, h, w)`` tensor and it must run once per forward. ``target``: class per
    sample (default: the predicted class). The model is put in eval mode and its parameters are frozen
    for the pass; both are restored exactly, and no parameter ``.grad`` is written.

    ``amp`` (``"bf16"`` / ``"fp16"``) runs the forward pass under autocast; the map itself is formed in
    float32. On a CPU with AVX-512 BF16 this halves the time, and a PART mask then differs from the float32
    one in a fraction of a percent of its pixels (the maps are close, the ``> 1`` threshold flips near-ties).
    ``channels_last`` (``None``: automatic, the attack engine's rule: on for a network with a ``Conv2d`` on
    the CPU or with ``amp``) runs the pass on a channels-last copy of ``x``: the same maps up to float
    rounding, faster with oneDNN.

    ``fold_bn`` runs the pass on the model's eval view with each BatchNorm folded into the convolution before it
    (:func:`fastadv.models.fold.eval_view`, with the target layer as its tap): the same maps up to float
    rounding, without the normalisation passes. Models with hooks, or that ``torch.fx`` cannot trace, run as
    they are.
    """
    if not isinstance(fold_bn, bool):
        raise ValueError(f"compute_cam: `fold_bn` must be True or False, got {fold_bn!r}")
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; valid: {', '.join(CAM_METHODS)}")
    if amp not in (None, "none") and amp not in AMP_DTYPES:
        raise ValueError(f"compute_cam: `amp` must be None, 'bf16' or 'fp16', got {amp!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("compute_cam needs autograd: call it outside torch.inference_mode()")
    module = resolve_layer(model, layer)
    x = x.detach()
    if channels_last is None:
        channels_last = auto_channels_last(has_conv2d(model), x.device, amp)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)

    captured: list[Tensor] = []

    def capture(_module: nn.Module, _inputs: object, output: object) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"CAM target layer must output a (B, C, h, w) tensor, got {shape}")
        if captured:
            raise ValueError("CAM target layer ran more than once in one forward pass; pick another layer")
        # A leaf cut from the graph: the backward pass stops here, and only the layers after the
        # target are differentiated. The clone lets later in-place ops run without touching the leaf.
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()

    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handle = None
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        net, hooked = model, module
        if fold_bn:
            net = eval_view(model, tap=module)
            if net is not model:
                hooked = net.get_submodule(TAP_NAME)
        handle = hooked.register_forward_hook(capture)
        with torch.enable_grad():
            with autocast_context(x.device, amp):
                logits = net(x)
            logits = logits.float()
            if not captured:
                raise ValueError("CAM target layer did not run during the forward pass")
            if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"model must return (B, num_classes) logits, got {tuple(logits.shape)}")
            if target is None:
                labels = logits.argmax(dim=1)
            else:
                labels = torch.as_tensor(target, device=logits.device).long().reshape(-1)
                if labels.shape[0] != logits.shape[0]:
                    raise ValueError(f"target has {labels.shape[0]} labels for a batch of {logits.shape[0]}")
                if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
                    raise ValueError(f"target labels must lie in [0, {logits.shape[1]})")
            activations = captured[0]
            # In eval mode samples do not interact, so one backward of the summed scores gives each
            # sample's own gradient.
            score = logits.gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(score, activations)
    finally:
        if handle is not None:
            handle.remove()
        for m, training in modes:
            m.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)

    acts = activations.detach().float()
    grad = grad.float()
    if method == "gradcam":
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = (weights * acts).sum(dim=1)
    elif method == "xgradcam":
        weights = (grad * acts).sum(dim=(2, 3), keepdim=True) / (acts.sum(dim=(2, 3), keepdim=True) + XGRADCAM_EPS)
        cam = (weights * acts).sum(dim=1)
    else:
        cam = (grad.clamp(min=0) * acts).sum(dim=1)
    return cam.clamp(min=0)


# --------------------------------------------------------------------------------------------------
# PIL-style bicubic resampling


def _keys_cubic(t: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel with parameter ``a`` (PIL's bicubic uses a = -0.5)."""
    t = t.abs()
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def pil_bicubic_weights(
    in_size: int, out_size: int, *, a: float = -0.5, device: torch.device | str | None = None
) -> Tensor:
    """``(out_size, in_size)`` float64 matrix of PIL's bicubic resampling along one axis.

    Output sample ``i`` sits at input coordinate ``(i + ½)·s`` (``s = in/out``). The kernel is stretched
    by ``max(s, 1)`` (so it also anti-aliases when shrinking; support 2 when enlarging); the taps are the
    input samples from ``round(centre − support)`` up to ``round(centre + support)``, those outside the
    image are dropped, and the remaining weights are renormalised to sum to one.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    f64 = torch.float64
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    centres = (torch.arange(out_size, dtype=f64, device=device) + 0.5) * scale
    first = torch.floor(centres - support + 0.5).clamp(min=0)
    stop = torch.floor(centres + support + 0.5).clamp(max=in_size)
    taps = torch.arange(in_size, dtype=f64, device=device)
    weights = _keys_cubic((taps[None, :] - centres[:, None] + 0.5) * (1.0 / stretch), a)
    inside = (taps[None, :] >= first[:, None]) & (taps[None, :] < stop[:, None])
    weights = torch.where(inside, weights, torch.zeros_like(weights))
    total = weights.sum(dim=1, keepdim=True)
    return torch.where(total != 0, weights / total, weights)


def resize_bicubic_pil(img: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Resize ``(..., h, w)`` float maps to ``size = (H, W)`` as PIL's ``Image.resize(..., BICUBIC)`` does
    for mode ``'F'`` images: separable, horizontal pass first, each pass accumulated in float64 and
    stored in the input's dtype (float32 for ``'F'``); an axis whose size does not change is not
    resampled. Batched over all leading dimensions."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if img.dim() < 2:
        raise ValueError(f"resize_bicubic_pil: expected (..., h, w), got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        img = img.float()
    *lead, in_h, in_w = img.shape
    store = img.dtype
    out = img.reshape(-1, in_h, in_w)
    if out_w != in_w:
        cols = pil_bicubic_weights(in_w, out_w, device=img.device)
        out = (out.double() @ cols.T).to(store)
    if out_h != in_h:
        rows = pil_bicubic_weights(in_h, out_h, device=img.device)
        out = (rows @ out.double()).to(store)
    return out.reshape(*lead, out_h, out_w)


# --------------------------------------------------------------------------------------------------
# matplotlib's jet colour table

# The published definition of matplotlib's ``jet``: per channel, (position, value) breakpoints of a
# piecewise-linear ramp.
_JET_BREAKPOINTS = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),  # red
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),  # green
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),  # blue
)
JET_SIZE = 256


@functools.lru_cache(maxsize=1)
def _jet_table_cpu() -> Tensor:
    # Work in table-index units (positions and breakpoints scaled by 255), sampling at
    # 255·(i·(1/255)), so that the float64 rounding is that of matplotlib's own table: bit-identical.
    last = JET_SIZE - 1
    pos = last * (torch.arange(JET_SIZE, dtype=torch.float64) * (1.0 / last))
    pos[-1] = last
    channels = []
    for breakpoints in _JET_BREAKPOINTS:
        xs = torch.tensor([p[0] for p in breakpoints], dtype=torch.float64) * last
        ys = torch.tensor([p[1] for p in breakpoints], dtype=torch.float64)
        inner = pos[1:-1]
        right = torch.searchsorted(xs, inner)  # first breakpoint >= position
        frac = (inner - xs[right - 1]) / (xs[right] - xs[right - 1])
        values = frac * (ys[right] - ys[right - 1]) + ys[right - 1]
        channels.append(torch.cat([ys[:1], values, ys[-1:]]).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def jet_table(device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """matplotlib's 256-entry ``jet`` lookup table, ``(256, 3)`` RGB."""
    return _jet_table_cpu().to(device=device, dtype=dtype)


def apply_jet(values: Tensor) -> Tensor:
    """RGB colours ``(..., 3)`` (float64) of ``values`` through the ``jet`` table, indexing exactly as
    matplotlib's ``Colormap.__call__`` does for floats: ``floor(v·256)``, ``v = 1`` → the last entry,
    below 0 → the first, above 1 → the last, NaN → black (matplotlib's transparent "bad" colour)."""
    scaled = values * JET_SIZE
    index = torch.floor(scaled).clamp(0, JET_SIZE - 1)
    index = torch.where(torch.isnan(scaled), torch.full_like(index, JET_SIZE), index).long()
    table = torch.cat([jet_table(values.device), torch.zeros(1, 3, dtype=torch.float64, device=values.device)])
    return table[index]


# --------------------------------------------------------------------------------------------------
# PART masks


def masks_from_cams(
    cams: Tensor, size: int | tuple[int, int], *, recipe: str = "jet", threshold: float = 1.0
) -> Tensor:
    """Boolean importance masks from CAMs ``(B, h, w)`` for images of ``size = (H, W)``.

    ``recipe="jet"``: ``(B, 3, H, W)``, the SPECS §2 reference recipe. ``recipe="cam"``: ``(B, 1, H, W)``
    (broadcastable to the images), the standardised upsampled CAM ``> threshold``. CAMs with
    ``max == min`` (and any image whose standardised values would divide by zero) give all-False masks.
    """
    if recipe not in MASK_RECIPES:
        raise ValueError(f"unknown mask recipe {recipe!r}; valid: {', '.join(MASK_RECIPES)}")
    if cams.dim() != 3:
        raise ValueError(f"cams must have shape (B, h, w), got {tuple(cams.shape)}")
    cams = cams.detach().float()
    flat = cams.flatten(1)
    low = flat.amin(dim=1) if flat.shape[1] else torch.zeros(flat.shape[0], device=cams.device)
    span = (flat.amax(dim=1) if flat.shape[1] else low) - low
    constant = ~(span > 0)
    span = torch.where(constant, torch.ones_like(span), span)
    normalised = (cams - low[:, None, None]) / span[:, None, None]

    upsampled = resize_bicubic_pil(normalised, size)
    if recipe == "jet":
        values = apply_jet(upsampled * upsampled).permute(0, 3, 1, 2)
    else:
        values = upsampled.double().unsqueeze(1)
    per_image = values.flatten(1)
    mean = per_image.mean(dim=1)
    std = per_image.std(dim=1, correction=0)
    degenerate = constant | ~(std > 0)
    std = torch.where(degenerate, torch.ones_like(std), std)
    z = (values - mean[:, None, None, None]) / std[:, None, None, None]
    return (z > threshold) & ~degenerate[:, None, None, None]


def part_masks(
    model: nn.Module,
    x: Tensor,
    layer: nn.Module | str | None = None,
    method: str = "gradcam",
    recipe: str = "jet",
    *,
    target: Tensor | Sequence[int] | None = None,
    threshold: float = 1.0,
    amp: str | None = None,
    fold_bn: bool = True,
) -> Tensor:
    """PART pixel-importance masks of the batch ``x`` (``(B, C, H, W)`` in pixel space): one CAM pass
    (:func:`compute_cam`) then :func:`masks_from_cams`. Returns ``bool`` ``(B, 3, H, W)`` for
    ``recipe="jet"`` and ``(B, 1, H, W)`` for ``recipe="cam"``; ``True`` marks important pixels (ε_high).
    ``amp``, ``fold_bn``: see :func:`compute_cam`."""
    if recipe not in MASK_RECIPES:
        raise ValueError(f"unknown mask recipe {recipe!r}; valid: {', '.join(MASK_RECIPES)}")
    cams = compute_cam(model, x, layer, method=method, target=target, amp=amp, fold_bn=fold_bn)
    return masks_from_cams(cams, (x.shape[-2], x.shape[-1]), recipe=recipe, threshold=threshold)


__all__ = [
    "CAM_METHODS",
    "MASK_RECIPES",
    "XGRADCAM_EPS",
    "apply_jet",
    "compute_cam",
    "jet_table",
    "masks_from_cams",
    "part_masks",
    "pil_bicubic_weights",
    "resize_bicubic_pil",
    "resolve_layer",
]
