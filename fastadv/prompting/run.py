"""One LM-VP run from an :class:`~fastadv.prompting.LMVPConfig`: data, source network, prompt, mapping, threat
model → training → evaluation → ``out_dir/result.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD, get_dataset
from ..train.checkpoint import atomic_write_text
from .config import LMVPConfig
from .evaluate import evaluate_lmvp, json_safe
from .model import LMVPModel, load_source, load_threat_model
from .prompt import VisualPrompt
from .train import resolve_device, train_lmvp


def _subset(data, n: int | None):
    return data if n is None else type(data)(data.x[:n], data.y[:n], data.classes, data.name)


def prompt_statistics(config: LMVPConfig, train_set) -> tuple:
    """``(mean, std)`` for the prompt from ``config.normalization``: ``"default"`` = ImageNet for ``ilm``/``pad``
    and the target training set's statistics for ``tarp`` (SPECS §3); ``"none"`` = ``(None, None)``."""
    kind = config.normalization
    if kind == "default":
        kind = "target" if config.geometry == "tarp" else "imagenet"
    if kind == "none":
        return None, None
    if kind == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return train_set.channel_stats()


def build_model(config: LMVPConfig, train_set, *, source: nn.Module | None = None) -> LMVPModel:
    """The LM-VP model for ``config`` (``source``: an already built network instead of ``config.source``)."""
    if source is None:
        source = load_source(config.source, num_classes=config.source_classes, pretrained=config.pretrained,
                             checkpoint_path=config.source_checkpoint, **config.source_kwargs)
        name = config.source
    else:
        name = type(source).__name__
    mean, std = prompt_statistics(config, train_set)
    image_size = config.image_size if config.image_size is not None else int(train_set.x.shape[-1])
    prompt = VisualPrompt(config.geometry, out_size=config.out_size, image_size=image_size, rescale=config.rescale,
                          pad_width=config.pad_width, channels=int(train_set.x.shape[1]),
                          mean=mean, std=std, generator=config.seed)
    model = LMVPModel(source, prompt, config.mapping, n_target=train_set.num_classes,
                      n_source=config.source_classes, channels_last=bool(config.channels_last), fold_bn=config.fold_bn,
                      mapping_generator=config.seed)
    model.source_name = name
    return model


def run_lmvp(config: LMVPConfig, *, source: nn.Module | None = None, threat_model: nn.Module | None = None) -> dict:
    """Train and evaluate one LM-VP model; returns the result dict (also ``out_dir/result.json``).

    ``source`` / ``threat_model`` override ``config.source`` / ``config.threat_model`` with built networks.
    """
    if not isinstance(config, LMVPConfig):
        raise ValueError(f"fastadv.prompting.run_lmvp: `config` must be an LMVPConfig, got {type(config).__name__}")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    train_set = _subset(get_dataset(config.dataset, config.data_dir, "train", **config.dataset_kwargs),
                        config.train_subset)
    test_split = "val" if config.dataset == "tiny_imagenet" else "test"
    test_set = _subset(get_dataset(config.dataset, config.data_dir, test_split, **config.dataset_kwargs),
                       config.test_subset)
    model = build_model(config, train_set, source=source).to(device)
    if threat_model is None and config.threat_model is not None:
        threat_model = load_threat_model(config.threat_model, num_classes=train_set.num_classes,
                                         checkpoint_path=config.threat_checkpoint, **config.threat_kwargs)
    if threat_model is not None:
        threat_model = threat_model.to(device).eval()
    started = time.perf_counter()
    history = train_lmvp(model, train_set, config, threat_model=threat_model)
    train_time = time.perf_counter() - started
    out_path = Path(config.out_dir) / "result.json" if config.out_dir is not None else None
    result = evaluate_lmvp(model, test_set, config, threat_model=threat_model, member_data=train_set,
                           metadata={"dataset": config.dataset, "n_train": len(train_set), "n_test": len(test_set),
                                     "threat_model": config.threat_model or (type(threat_model).__name__
                                                                             if threat_model is not None else None)})
    result["history"] = history
    result["train_time_s"] = train_time
    result = json_safe(result)
    if out_path is not None:
        atomic_write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", out_path)
        result["files"] = {"result": str(out_path), "checkpoint": str(Path(config.out_dir) / "last.pt")}
    return result


__all__ = ["build_model", "prompt_statistics", "run_lmvp"]
