"""Pieces shared by the subcommands: named attack presets, data selection, model loading, options."""

from __future__ import annotations

import argparse
import re

import torch

from .config import ConfigError

# The protocols researchers quote, by name. Iteration counts are the papers' (PGD-20 and CW-20 for evaluation,
# APGD with 100 iterations); `steps` overrides them (e.g. for quick runs).
ATTACK_PRESETS = ("fgsm", "pgd10", "pgd20", "cw20", "apgd-ce", "apgd-dlr", "mma", "autoattack")


def build_attack(name: str, model, *, eps: float, alpha: float, norm: str = "linf", seed: int = 0,
                 steps: int | None = None, aa_queries: int | None = None):
    from fastadv import attacks

    gen = torch.Generator(device=_device_of(model)).manual_seed(seed)
    m = re.fullmatch(r"(pgd|cw)(\d+)", name)
    if m:
        n = steps or int(m.group(2))
        return attacks.PGD(model, eps=eps, alpha=alpha, steps=n, norm=norm, loss="ce" if m.group(1) == "pgd" else "cw",
                           generator=gen)
    if name == "fgsm":
        return attacks.FGSM(model, eps=eps, norm=norm, generator=gen)
    if name in ("apgd-ce", "apgd-dlr"):
        return attacks.APGD(model, eps=eps, steps=steps or 100, norm=norm, loss=name.split("-")[1], generator=gen)
    if name == "mma":
        return attacks.MMA(model, eps=eps, alpha=alpha, steps=steps or 20, norm=norm, generator=gen)
    if name == "autoattack":
        kw = {}
        if steps:
            kw.update(apgd_steps=steps, fab_steps=steps)
        if aa_queries:
            kw["square_queries"] = aa_queries
        return attacks.AutoAttack(model, norm=norm, eps=eps, generator=gen, **kw)
    raise ConfigError(f"unknown attack {name!r}; choose from {', '.join(ATTACK_PRESETS)} (or pgdN / cwN for N steps)")


def _device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None and p.device.type == "cuda" else torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    from fastadv.utils import resolve_device as _resolve

    return _resolve(name, what="--device")


def load_split(dataset: str, data_dir: str | None, split: str, limit: int | None, device: torch.device):
    """(x, y) float images in [0, 1] on ``device``, the first ``limit`` examples."""
    from fastadv.data import get_dataset

    ds = get_dataset(dataset, data_dir, split)
    x, y = ds.x, ds.y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.to(device), y.to(device)


def load_model(checkpoint: str, device: torch.device):
    from fastadv.train import load_trained_model

    return load_trained_model(checkpoint, device=device)


def add_data_options(p: argparse.ArgumentParser, *, default_split: str = "test") -> None:
    p.add_argument("--dataset", default="digits", help="dataset name (digits needs no files; cifar10, cifar100, svhn, "
                                                      "tiny_imagenet, cifar10c read --data-dir)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    p.add_argument("--split", default=default_split, help="which split to use (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")


def add_threat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eps", type=float, default=8 / 255, help="perturbation budget in [0, 1] pixel units "
                                                             "(default 8/255)")
    p.add_argument("--alpha", type=float, default=2 / 255, help="PGD step size (default 2/255)")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf", help="threat model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="override the attacks' iteration counts")


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run folder (default: ./fastadv-runs/<command>-<time>)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' private generators")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
