"""Reference (shadow) models for LiRA and RMIA, trained with any ``fastadv.train`` recipe.

Model ``i`` trains on the examples where ``in_mask[i]`` is set; :func:`~fastadv.privacy.make_in_mask` makes every
example IN for exactly half of the models. Training is resumable: the membership matrix is saved first, a model
whose checkpoint says it finished is skipped, and an interrupted one resumes from its ``last.pt``, so rerunning
the same call after a crash completes the set without redoing finished work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .lira import make_in_mask
from .signals import model_signals


@dataclass
class ReferenceModels:
    in_mask: torch.Tensor  # (M, N) bool, on the CPU
    checkpoints: list[Path]


def _pair(data) -> tuple[torch.Tensor, torch.Tensor, object]:
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y, data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1], None
    raise ValueError("train_reference_models: `data` must be an ImageSet or an (x, y) tensor pair")


def _select(x, y, source, index):
    if source is not None and hasattr(source, "classes"):
        from ..data.datasets import ImageSet

        return ImageSet(x[index], y[index], source.classes, getattr(source, "name", "data"))
    return x[index], y[index]


def _finished(checkpoint: Path) -> bool:
    from ..train import load_checkpoint

    return checkpoint.is_file() and bool(load_checkpoint(checkpoint).get("finished"))


def train_reference_models(config, data, n_models: int, out_dir: str | Path, *, seed: int = 0,
                           in_mask: torch.Tensor | None = None) -> ReferenceModels:
    """Train ``n_models`` reference models of ``config`` (a ``TrainConfig`` or a dict of its fields) on
    half-splits of ``data`` (an ``ImageSet`` or ``(x, y)``). Model ``i`` is written to ``out_dir/model_<i>/``
    and evaluated (natural accuracy) on the examples it did not see."""
    from ..train import TrainConfig, train

    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 2:
        raise ValueError(f"train_reference_models: `n_models` must be an int >= 2, got {n_models!r}")
    x, y, source = _pair(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_file = out_dir / "in_mask.pt"
    if in_mask is None and mask_file.is_file():
        in_mask = torch.load(mask_file, weights_only=True)
    if in_mask is None:
        in_mask = make_in_mask(n_models, len(y), generator=torch.Generator().manual_seed(seed))
    in_mask = in_mask.to("cpu", torch.bool)
    if tuple(in_mask.shape) != (n_models, len(y)):
        raise ValueError(f"train_reference_models: `in_mask` has shape {tuple(in_mask.shape)}, expected "
                         f"({n_models}, {len(y)}) (a different set of models or data lives in {str(out_dir)!r})")
    if not mask_file.is_file():
        from ..train import atomic_save

        atomic_save(in_mask, mask_file)

    checkpoints = []
    for i in range(n_models):
        model_dir = out_dir / f"model_{i:03d}"
        last = model_dir / "last.pt"
        checkpoints.append(last)
        if _finished(last):
            continue
        run = config.replace(out_dir=str(model_dir), seed=seed + 1 + i, resume="auto" if last.is_file() else None,
                             save_best=False)
        inside, outside = in_mask[i].nonzero().squeeze(1), (~in_mask[i]).nonzero().squeeze(1)
        train(run, train_set=_select(x, y, source, inside), eval_set=_select(x, y, source, outside))
    return ReferenceModels(in_mask=in_mask, checkpoints=checkpoints)


def reference_statistics(checkpoints, data, *, signal: str = "scaled_logit", device=None,
                         batch_size: int = 256, attack_factory=None) -> torch.Tensor:
    """``(M, N)``: ``signal`` of every example under every reference model (LiRA's statistics; use
    ``signal="confidence"`` for RMIA's probabilities). ``attack_factory(model)`` gives per-model adversarial
    inputs (MIA on adversarial examples)."""
    from ..train import load_trained_model

    x, y, _ = _pair(data)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x
    rows = []
    for ckpt in checkpoints:
        model = load_trained_model(ckpt, device=device or "cpu")
        attack = attack_factory(model) if attack_factory is not None else None
        rows.append(model_signals(model, (x, y), (signal,), device=device, batch_size=batch_size,
                                  attack=attack)[signal].cpu())
    return torch.stack(rows)
