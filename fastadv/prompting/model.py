"""The LM-VP model (prompt → frozen source network → label mapping), source networks by name, and the
threat model of transferred adversarial training.

The source network is *frozen*: its parameters have ``requires_grad=False`` (so they never receive a
``.grad`` and the backward pass computes input gradients only), it stays in eval mode whatever mode the
wrapper is put in (BatchNorm statistics and dropout never change), and it is held by reference — never
copied. Only the prompt and a learned (``linear``) mapping train.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.fold import frozen_eval_view
from ..models.registry import checkpoint_file, load_weights_strict
from .mapping import LabelMapping, make_mapping
from .prompt import VisualPrompt

SOURCE_LIBRARIES = ("timm", "torchvision", "fastadv")


def _fail(owner: str, message: str) -> None:
    raise ValueError(f"fastadv.prompting.{owner}: {message}")


# ---------------------------------------------------------------------------------------------------------
# source networks by name


def _split_name(name: str) -> tuple[str | None, str]:
    library, sep, rest = name.partition(":")
    if sep and library in SOURCE_LIBRARIES:
        return library, rest
    return None, name


def _timm_cached_weights(name: str) -> Path | None:
    """A weights file for timm model ``name`` already in the Hugging Face hub cache or torch's hub cache."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            filenames = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"]
            for filename in filter(None, filenames):
                found = try_to_load_from_cache(hub_id, filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    url = getattr(cfg, "url", None)
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _torchvision_cached_weights(name: str) -> Path | None:
    """The default weights of torchvision model ``name`` when torch's hub cache already holds them."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:
        return None
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return candidate if candidate.is_file() else None


def _load_timm(name: str, num_classes: int, pretrained: bool, checkpoint_path, kwargs: dict) -> nn.Module:
    import timm

    from ..models import TimmModel

    if pretrained:
        path = checkpoint_file(checkpoint_path) if checkpoint_path is not None else _timm_cached_weights(name)
        if path is None:
            _fail("load_source", f"pretrained=True for timm model {name!r}, but no weights file was given "
                                 "(checkpoint_path=...) and none is in the local Hugging Face / torch hub cache; "
                                 "fastadv never downloads weights")
        # timm reads the file as its pretrained weights (classifier adapted to num_classes if they differ).
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                  num_classes=num_classes, **kwargs)
        return TimmModel(model)
    model = TimmModel(timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs))
    if checkpoint_path is not None:
        load_weights_strict(model, checkpoint_file(checkpoint_path))
    return model


def _load_torchvision(name: str, num_classes: int, pretrained: bool, checkpoint_path, kwargs: dict) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    path = checkpoint_file(checkpoint_path) if checkpoint_path is not None else None
    if pretrained and path is None:
        path = _torchvision_cached_weights(name)
        if path is None:
            _fail("load_source", f"pretrained=True for torchvision model {name!r}, but no weights file was given "
                                 "(checkpoint_path=...) and none is in torch's hub cache "
                                 f"({torch.hub.get_dir()}/checkpoints); fastadv never downloads weights")
    if path is not None:
        load_weights_strict(model, path)
    return model


def _known_to(library: str, name: str) -> bool:
    if library == "timm":
        try:
            import timm
        except ImportError:
            return False
        return timm.is_model(name)
    if library == "torchvision":
        try:
            import torchvision
        except ImportError:
            return False
        return name in torchvision.models.list_models()
    from ..models import list_models

    return name in list_models()


def load_source(source: str | nn.Module, *, num_classes: int = 1000, pretrained: bool = False,
                checkpoint_path: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """The source network: an ``nn.Module`` as it is, or a model by name.

    Names are looked up in timm, then torchvision, then fastadv's own models (:func:`fastadv.models.list_models`);
    a prefix forces one library (``"timm:resnet50"``, ``"torchvision:wide_resnet50_2"``, ``"fastadv:small_cnn"``).
    ``pretrained=True`` loads ``checkpoint_path`` or, when it is not given, a weights file already in the local
    hub cache (Hugging Face's for timm, ``torch.hub``'s for torchvision); with neither it raises a ``ValueError``
    — nothing is ever downloaded, so offline runs fail fast instead of hanging. ``checkpoint_path`` without
    ``pretrained`` loads a full state dict of this architecture (strict). ``num_classes`` is the source label
    space (1000 for ImageNet); other keyword arguments go to the model constructor.
    """
    if isinstance(source, nn.Module):
        if pretrained or checkpoint_path is not None:
            _fail("load_source", "`pretrained`/`checkpoint_path` apply to a source given by name, not to an nn.Module")
        return source
    if not isinstance(source, str) or not source:
        _fail("load_source", f"`source` must be a model name or an nn.Module, got {type(source).__name__}")
    library, name = _split_name(source)
    libraries = (library,) if library else SOURCE_LIBRARIES
    for lib in libraries:
        if not _known_to(lib, name):
            continue
        if lib == "timm":
            return _load_timm(name, num_classes, pretrained, checkpoint_path, kwargs)
        if lib == "torchvision":
            return _load_torchvision(name, num_classes, pretrained, checkpoint_path, kwargs)
        from ..models import create_model

        return create_model(name, num_classes=num_classes, pretrained=pretrained, checkpoint_path=checkpoint_path,
                            **kwargs)
    where = f"in {library}" if library else "in timm, torchvision or fastadv.models"
    _fail("load_source", f"unknown `source` network {source!r}: no model of that name {where} "
                         "(prefix a library to choose one, e.g. 'timm:resnet50', 'torchvision:resnet50')")


def load_threat_model(threat_model: str | nn.Module, *, num_classes: int, checkpoint_path=None,
                      **kwargs) -> nn.Module:
    """The threat model of transferred AT: a *trained* network on the target task's images.

    An ``nn.Module`` is used as it is. By name (any :func:`fastadv.models.create_model` name, e.g.
    ``"resnet18"``, ``"wrn34_10"``), ``checkpoint_path`` is required — crafting on an untrained threat model is
    a known defect of the reference code — and is loaded strictly with ``num_classes`` outputs.
    """
    if isinstance(threat_model, nn.Module):
        return threat_model
    if not isinstance(threat_model, str) or not threat_model:
        _fail("load_threat_model", f"`threat_model` must be a model name or an nn.Module, got "
                                   f"{type(threat_model).__name__}")
    if checkpoint_path is None:
        _fail("load_threat_model", f"`threat_model` {threat_model!r} needs checkpoint_path=<its trained weights>: "
                                   "transferred AT crafts on a trained threat model, never an untrained one")
    from ..models import create_model

    return create_model(threat_model, num_classes=num_classes, checkpoint_path=checkpoint_path, **kwargs)


@torch.no_grad()
def check_threat_model(threat_model: nn.Module, n_target: int, sample: Tensor, *, target: nn.Module | None = None
                       ) -> None:
    """``ValueError`` unless ``threat_model`` returns ``(B, n_target)`` logits on ``sample`` (a few target-task
    images) and is a network separate from ``target`` (transferred AT must not query the target)."""
    if not isinstance(threat_model, nn.Module):
        _fail("check_threat_model", f"`threat_model` must be an nn.Module, got {type(threat_model).__name__}")
    if target is not None:
        shared = {id(p) for p in target.parameters()} & {id(p) for p in threat_model.parameters()}
        if threat_model is target or shared:
            _fail("check_threat_model", "`threat_model` shares modules with the LM-VP model; transferred AT needs a "
                                        "separate network (use method='pgd_at' for white-box AT)")
    modes = [(m, m.training) for m in threat_model.modules()]
    try:
        threat_model.eval()
        device = next(iter(threat_model.parameters()), sample).device
        out = threat_model(sample[:1].to(device))
    except ValueError:
        raise
    except Exception as exc:
        _fail("check_threat_model", f"`threat_model` failed on a target-task image of shape "
                                    f"{tuple(sample.shape[1:])}: {type(exc).__name__}: {exc}")
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != n_target:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        _fail("check_threat_model", f"`threat_model` returns {shape} on target-task images, but the task has "
                                    f"{n_target} classes: it must output (B, {n_target}) logits")


# ---------------------------------------------------------------------------------------------------------
# the LM-VP model


def _freeze(source: nn.Module) -> None:
    for p in source.parameters():
        p.requires_grad_(False)
    source.eval()


class LMVPModel(nn.Module):
    """``LMVPModel(source, prompt, mapping)``: ``mapping(source(prompt(x)))`` on pixel-space images ``x``.

    * ``source``: an ``nn.Module`` or a name for :func:`load_source` (then ``source_kwargs`` go to it). It is
      frozen in place (``requires_grad_(False)``, eval mode kept in every mode of the wrapper) and never copied.
    * ``prompt``: a :class:`~fastadv.prompting.VisualPrompt` or a geometry name (``"ilm"``, ``"tarp"``, ``"pad"``;
      then ``prompt_kwargs`` go to it).
    * ``mapping``: a :class:`~fastadv.prompting.LabelMapping` or a name (``"rlm"``, ``"flm"``, ``"ilm"``,
      ``"linear"``); by name it needs ``n_target`` and ``n_source`` (default: ``source_kwargs["num_classes"]``
      or 1000).
    * ``channels_last``: convert the source's parameters (in place) and every canvas to channels-last memory
      format (faster convolutions on most CPUs and GPUs).
    * ``fold_bn``: run the source with each BatchNorm folded into the convolution before it
      (:func:`fastadv.models.fold.frozen_eval_view`). The frozen source is always in eval mode, where the two
      are one affine map, so this changes results only by float rounding and saves the normalisation's forward
      and backward passes at every training step and attack step (1.07–1.13× per step for a ResNet-50 on a
      CPU). It holds a folded copy of the convolution weights, re-read when the source's weights are changed in
      place or replaced (``load_state_dict``, ``.to()``), not when written through ``.data``; the copy is
      updated in place, so a graph captured by ``PGD(cuda_graph=True)`` sees such a change after the model's
      next eager forward.

    :meth:`canvas` gives the prompted input, :meth:`source_logits` the source's logits; ``forward`` returns the
    target logits. :meth:`trainable_parameters` are the prompt's and the mapping's. Training checkpoints leave
    the frozen source out (``frozen_state_prefixes``; it is rebuilt from the config and checked by fingerprint
    on resume) unless ``LMVPConfig.save_source``.
    """

    frozen_state_prefixes = ("source.",)

    def __init__(self, source: str | nn.Module, prompt: str | VisualPrompt, mapping: str | LabelMapping, *,
                 n_target: int | None = None, n_source: int | None = None, channels_last: bool = False,
                 fold_bn: bool = True, source_kwargs: dict | None = None, prompt_kwargs: dict | None = None,
                 mapping_generator: torch.Generator | int | None = None) -> None:
        super().__init__()
        source_kwargs = dict(source_kwargs or {})
        if isinstance(source, str):
            source_name = source
            source = load_source(source, **source_kwargs)
        elif isinstance(source, nn.Module):
            if source_kwargs:
                _fail("LMVPModel", "`source_kwargs` apply to a source given by name, not to an nn.Module")
            source_name = type(source).__name__
        else:
            _fail("LMVPModel", f"`source` must be an nn.Module or a model name, got {type(source).__name__}")
        if isinstance(prompt, str):
            prompt = VisualPrompt(prompt, **(prompt_kwargs or {}))
        elif not isinstance(prompt, VisualPrompt):
            _fail("LMVPModel", f"`prompt` must be a VisualPrompt or a geometry name, got {type(prompt).__name__}")
        elif prompt_kwargs:
            _fail("LMVPModel", "`prompt_kwargs` apply to a prompt given by name")
        if isinstance(mapping, str):
            if n_target is None:
                _fail("LMVPModel", f"mapping {mapping!r} by name needs `n_target` (the number of target classes)")
            if n_source is None:
                n_source = int(source_kwargs.get("num_classes", 1000))
            mapping = make_mapping(mapping, n_source, n_target, generator=mapping_generator)
        elif not isinstance(mapping, LabelMapping):
            _fail("LMVPModel", f"`mapping` must be a LabelMapping or a name, got {type(mapping).__name__}")
        else:
            for name, value, have in (("n_target", n_target, mapping.n_target), ("n_source", n_source,
                                                                                  mapping.n_source)):
                if value is not None and value != have:
                    _fail("LMVPModel", f"`{name}`={value} disagrees with the mapping's {name}={have}")
        if not isinstance(fold_bn, bool):
            _fail("LMVPModel", f"`fold_bn` must be True or False, got {fold_bn!r}")
        _freeze(source)
        self.fold_bn = fold_bn
        self.channels_last = bool(channels_last)
        if self.channels_last:
            source.to(memory_format=torch.channels_last)  # in place: parameters are converted, not copied
        self.source = source
        self.prompt = prompt
        self.mapping = mapping
        self.source_name = source_name

    # ------------------------------------------------------------------ frozen source

    def train(self, mode: bool = True) -> LMVPModel:
        super().train(mode)
        self.source.eval()
        return self

    def _ensure_frozen(self) -> None:
        # Someone may have called model.source.train() directly: a bool check per forward keeps it in eval.
        if self.source.training:
            self.source.eval()

    @property
    def folds_bn_itself(self) -> bool:
        # An attack's own fold (fastadv.models.fold.eval_view) then calls this model as it is.
        return self.fold_bn

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train: the prompt's and the mapping's (those with ``requires_grad``)."""
        return [p for m in (self.prompt, self.mapping) for p in m.parameters() if p.requires_grad]

    @property
    def n_target(self) -> int:
        return self.mapping.n_target

    @property
    def n_source(self) -> int:
        return self.mapping.n_source

    # ------------------------------------------------------------------ forward

    def canvas(self, x: Tensor) -> Tensor:
        """The prompted, normalised source input ``(B, C, out_size, out_size)``."""
        canvas = self.prompt(x)
        if self.channels_last:
            canvas = canvas.contiguous(memory_format=torch.channels_last)
        return canvas

    def source_logits(self, x: Tensor) -> Tensor:
        """The frozen source network's logits on the prompted images."""
        self._ensure_frozen()
        source = frozen_eval_view(self.source) if self.fold_bn else self.source
        return source(self.canvas(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.mapping(self.source_logits(x))

    # ------------------------------------------------------------------ state

    def trainable_state_dict(self) -> dict:
        """Prompt and mapping state (what training changes); the source is not included."""
        return {"prompt": self.prompt.state_dict(), "mapping": self.mapping.state_dict()}

    def load_trainable_state_dict(self, state: dict) -> None:
        self.prompt.load_state_dict(state["prompt"])
        self.mapping.load_state_dict(state["mapping"])

    def config(self) -> dict:
        return {"source": self.source_name, "prompt": self.prompt.config(), "mapping": self.mapping.config(),
                "channels_last": self.channels_last, "fold_bn": self.fold_bn,
                "trainable_parameters": sum(p.numel() for p in self.trainable_parameters())}


__all__ = ["SOURCE_LIBRARIES", "LMVPModel", "check_threat_model", "load_source", "load_threat_model"]
