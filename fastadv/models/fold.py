"""Eval-mode views of a network with BatchNorm folded into the convolution before it.

In eval mode ``BatchNorm2d(Conv2d(x))`` is one affine map of the convolution's output: the same function as a
single convolution with weight ``w · s`` and bias ``(b − μ) · s + β``, where ``s = γ / sqrt(σ² + ε)``. Folding
saves the normalisation's forward and backward passes wherever a network runs in eval mode: at every attack
step (about a fifth of a CIFAR ResNet-18's attack time on a CPU), in a CAM pass (:mod:`fastadv.cam`), and at
every training step of an LM-VP prompt over a frozen source (:mod:`fastadv.prompting`). The result equals the
unfolded model's up to float rounding.

:func:`eval_view` gives, for a model, a ``torch.fx`` trace of it (made once per model, in eval mode) in which
every foldable convolution–BatchNorm pair is one :class:`FoldedConv2d`, refreshed from the model's current
parameters and running statistics on each call: training may change them between attacks. The folded weights
are updated in place, so their addresses stay fixed. Everything else in the view is the model's own
sub-modules. A pair is folded only when the convolution's output feeds nothing but the BatchNorm, the
convolution pads with zeros, and the BatchNorm uses running statistics. A model that ``torch.fx`` cannot trace
(data-dependent control flow), has no BatchNorm to fold, or carries module hooks (which the view would not
run) is used as it is.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FoldedConv2d(nn.Module):
    """``bn(conv(x))`` in eval mode as one convolution; :meth:`refresh` re-reads ``conv`` and ``bn``."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        # Plain references, not sub-modules: the view must not own (or re-register) the model's modules.
        self.__dict__["conv"], self.__dict__["bn"] = conv, bn
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self._stamp: tuple | None = None

    def _source_stamp(self) -> tuple:
        """Where the six source tensors live and how often they were modified in place (autograd's version
        counter): it changes on ``copy_``/``load_state_dict``, optimiser steps, running-statistics updates,
        ``.to()`` and re-assignment — not on writes through ``.data``, which bypass the counter."""
        conv, bn = self.conv, self.bn
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if any(t is not None and t.is_inference() for t in tensors):
            return (object(),)  # inference tensors have no version counter: never equal, so always re-read
        return (bn.eps, *((t.data_ptr(), t._version, t.dtype, t.stride()) if t is not None else None
                          for t in tensors))

    @torch.no_grad()
    def refresh(self, only_if_changed: bool = False) -> None:
        """Re-read the folded weight and bias from ``conv`` and ``bn``; with ``only_if_changed``, skip the work
        when none of their tensors was replaced or modified in place since the last refresh."""
        stamp = self._source_stamp()
        if only_if_changed and stamp == self._stamp:
            return
        self._stamp = stamp
        # Normal tensors even when called under torch.inference_mode() (an LM-VP model evaluated there first):
        # inference tensors could neither be updated in place nor saved for backward by later training steps.
        with torch.inference_mode(False), torch.no_grad():
            self._recompute()

    def _recompute(self) -> None:
        conv, bn = self.conv, self.bn
        dtype = conv.weight.dtype
        math = torch.promote_types(dtype, torch.float32)  # a half-precision model folds in float32, then rounds once
        scale = torch.rsqrt(bn.running_var.to(math) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(math)
        shift = -bn.running_mean.to(math) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(math)
        if conv.bias is not None:
            shift = shift + conv.bias.to(math) * scale
        weight = (conv.weight.to(math) * scale.reshape(-1, 1, 1, 1)).to(dtype)
        shift = shift.to(dtype)
        if self.weight is None or not _same_layout(self.weight, weight) or not _same_layout(self.bias, shift):
            self.weight, self.bias = weight, shift
        else:  # in place: a captured CUDA graph keeps reading the right tensors
            self.weight.copy_(weight)
            self.bias.copy_(shift)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        return F.conv2d(x, self.weight, self.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and bn.track_running_stats and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


class _View:
    def __init__(self, module: nn.Module | None, folded: list[FoldedConv2d], structure: tuple) -> None:
        self.module, self.folded, self.structure = module, folded, structure


# model -> {id of the tapped module (None: no tap): its view}
_VIEWS: weakref.WeakKeyDictionary[nn.Module, dict[int | None, _View]] = weakref.WeakKeyDictionary()

TAP_NAME = "_fastadv_tap"


class _Tap(nn.Module):
    """Stands in the view for a module whose output a caller hooks (a CAM's target layer): it calls that module's
    own folded view, so the hook sees the module's output while the convolutions inside it stay folded too."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _structure(modules: list[nn.Module]) -> tuple:
    """Which modules the model is made of, and which fold themselves: a view is rebuilt when a module is
    replaced (e.g. SyncBatchNorm conversion) or an LM-VP model's ``fold_bn`` is switched."""
    return tuple((id(m), _folds_itself(m)) for m in modules)


class _Tracer(torch.fx.Tracer):
    """Traces only through the containers that hold a convolution and a BatchNorm: every other module (a
    convolution or BatchNorm itself, an input normalisation or a label mapping that validates shapes, a head)
    is called as it is, never traced into."""

    def __init__(self, model: nn.Module, keep: nn.Module | None = None) -> None:
        super().__init__()
        self.containers = {id(m) for m in model.modules() if next(m.children(), None) is not None
                           and m is not keep and not _folds_itself(m) and _holds_conv_and_bn(m)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self.containers


def _folds_itself(model: nn.Module) -> bool:
    """A module that folds its own BatchNorms (``folds_bn_itself``, e.g. an LM-VP model over its frozen source)
    is called as it is: a second folded copy of its weights would only cost memory."""
    # Looked up on the class first: nn.Module.__getattr__ raises (slowly) for a missing attribute, and this runs
    # for every module at every call.
    return getattr(type(model), "folds_bn_itself", None) is not None and bool(model.folds_bn_itself)


def _holds_conv_and_bn(model: nn.Module) -> bool:
    kinds = set()
    stack = [model]
    while stack:
        module = stack.pop()
        kinds.add(type(module))
        if module is model or not _folds_itself(module):
            stack.extend(module.children())
    return nn.Conv2d in kinds and nn.BatchNorm2d in kinds


def _build_view(model: nn.Module, tap: nn.Module | None = None) -> _View:
    structure = _structure(list(model.modules()))
    if _folds_itself(model) or not _holds_conv_and_bn(model):  # nothing to fold here: do not even trace
        return _View(None, [], structure)
    if tap is not None and (tap is model or not any(m is tap for m in model.modules())):
        return _View(None, [], structure)
    was_training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # branches on self.training are traced as the attack runs them
        graph_module = torch.fx.GraphModule(model, _Tracer(model, keep=tap).trace(model))
    except Exception:  # noqa: BLE001 — untraceable models (data-dependent control flow) are used unfolded
        return _View(None, [], structure)
    finally:
        for m, training in was_training:
            m.training = training
    modules = dict(graph_module.named_modules())
    folded: list[FoldedConv2d] = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv, bn = modules.get(source.target), modules.get(node.target)
        if conv is None or bn is None or conv is tap or not _foldable(conv, bn) or len(node.args) != 1 \
                or node.kwargs:
            continue
        name = f"_fastadv_folded_{len(folded)}"
        fused = FoldedConv2d(conv, bn)
        graph_module.add_submodule(name, fused)
        with graph_module.graph.inserting_after(source):
            replacement = graph_module.graph.call_module(name, source.args, source.kwargs)
        node.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(node)
        graph_module.graph.erase_node(source)
        folded.append(fused)
    if tap is not None:
        calls = [node for node in graph_module.graph.nodes
                 if node.op == "call_module" and modules.get(node.target) is tap]
        if not calls:  # the tapped module is not called as a module: a hook on it would not run in the view
            return _View(None, [], structure)
        inner = _build_view(tap)
        graph_module.add_submodule(TAP_NAME, _Tap(inner.module if inner.module is not None else tap))
        for node in calls:
            node.target = TAP_NAME
        folded.extend(inner.folded)
    if not folded:
        return _View(None, [], structure)
    graph_module.graph.lint()
    graph_module.recompile()
    return _View(graph_module, folded, structure)


def _has_hooks(modules: list[nn.Module]) -> bool:
    """Module hooks would not all run in the view (its graph replaces the containers' and the folded pairs'
    forward calls), so a hooked model (a query counter, a feature extractor) is called as it is."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def eval_view(model: nn.Module, *, refresh: str = "always", tap: nn.Module | None = None) -> nn.Module:
    """``model`` in eval mode with its convolution–BatchNorm pairs folded, refreshed from the current weights;
    ``model`` itself when nothing can be folded or the model has hooks. Call it in eval mode, once per attack
    (not per step).

    ``tap``: a sub-module whose output the caller needs (a CAM's target layer). The view then calls, in its
    place, the sub-module ``view.get_submodule(TAP_NAME)``, which returns ``tap``'s output (computed with
    ``tap``'s own pairs folded): register the forward hook there. When the view is ``model`` itself, hook
    ``tap``. Each tap has its own view, with its own folded copy of the weights.

    ``refresh``: ``"always"`` recomputes every folded weight (a pass over the convolution weights: cheap next to
    an attack); ``"on_change"`` only those whose convolution or BatchNorm tensors were replaced or modified in
    place since (see :meth:`FoldedConv2d._source_stamp`): for a frozen network called at every training step.
    """
    if refresh not in ("always", "on_change"):
        raise ValueError(f"eval_view: `refresh` must be 'always' or 'on_change', got {refresh!r}")
    modules = list(model.modules())  # one walk of the module tree per call: this runs at every LM-VP step
    if _has_hooks(modules):
        return model
    views = _VIEWS.setdefault(model, {})
    key = None if tap is None else id(tap)
    view = views.get(key)
    if view is None or view.structure != _structure(modules):
        view = views[key] = _build_view(model, tap)
    if view.module is None:
        return model
    for fused in view.folded:
        fused.refresh(only_if_changed=refresh == "on_change")
    return view.module


def _tracing() -> bool:
    symbolic = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)
    return bool(symbolic() if symbolic is not None else torch.fx._symbolic_trace.is_fx_tracing()) or \
        torch.compiler.is_compiling()


def frozen_eval_view(model: nn.Module) -> nn.Module:
    """The folded view of a frozen network that stays in eval mode (an LM-VP source), for use inside another
    module's ``forward`` at every step: refreshed only when its weights change (``refresh="on_change"``), and
    ``model`` itself while ``torch.fx`` or ``torch.compile`` traces the caller, so that a trace of the caller
    (an attack's own :func:`eval_view`, say) sees the network's modules and folds them itself, and for the
    per-call replicas of ``nn.DataParallel``."""
    if _tracing() or getattr(model, "_is_replica", False):
        # nn.DataParallel makes new replicas at every forward: a view of each would be traced and thrown away
        return model
    return eval_view(model, refresh="on_change")


__all__ = ["TAP_NAME", "FoldedConv2d", "eval_view", "frozen_eval_view"]
