"""RRM (robust representation matching): a student trained on natural images only, with
``loss = λ · CE(S(x), y) − mean_i cos(g_S(x_i), g_T(x_i))``, λ = 0.005, where ``T`` is an adversarially trained
teacher loaded from ``rrm_teacher`` (frozen: eval mode, no gradients) and ``g`` the penultimate pooled features
(``model.features``). When the widths differ the student's features go through a learned
``Linear(student_dim, teacher_dim)`` (trained with the student, saved in the method state). The teacher gets
the student's input normalisation (``normalize``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...attacks import attack_mode
from ...utils import autocast_context
from ..data import Batch
from .base import Method

if TYPE_CHECKING:
    from ..trainer import Trainer


class StudentWithProjection(nn.Module):
    """``forward(x) -> (logits, projected penultimate features)`` in one pass of the student."""

    def __init__(self, model: nn.Module, projection: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.projection = projection if projection is not None else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.features(x)
        return self.model.head(features), self.projection(features)


def rrm_loss(logits: Tensor, student_features: Tensor, teacher_features: Tensor, y: Tensor, lam: float) -> Tensor:
    """``λ · CE(logits, y) − mean cos(student_features, teacher_features)``."""
    cos = F.cosine_similarity(student_features.float(), teacher_features.float(), dim=1)
    return lam * F.cross_entropy(logits.float(), y) - cos.mean()


class RRM(Method):
    name = "rrm"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.teacher: nn.Module | None = None
        self.projection: nn.Linear | None = None

    def setup(self, trainer: Trainer) -> None:
        from ...models import create_model

        c = self.config
        path = Path(c.rrm_teacher).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"TrainConfig.rrm_teacher: teacher checkpoint {str(path)!r} does not exist")
        teacher = create_model(c.rrm_teacher_model, num_classes=trainer.num_classes, checkpoint_path=path,
                               **c.rrm_teacher_kwargs)
        teacher = trainer.prepare_model(teacher)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = trainer.model
        for who, net in (("student", student), ("teacher", teacher)):
            if not callable(getattr(net, "features", None)):
                raise ValueError(f"RRM: the {who} model {type(net).__name__} has no features(x) method giving its "
                                 "penultimate features; use a fastadv.models model")
        probe = torch.zeros((2, *trainer.train_data.sample_shape), device=trainer.device)
        dims = {}
        for who, net in (("student", student), ("teacher", teacher)):
            try:
                with attack_mode(net), torch.no_grad():
                    out = net.features(probe)
            except Exception as exc:
                raise ValueError(f"RRM: the {who} ({c.model if who == 'student' else c.rrm_teacher_model}) cannot "
                                 f"process the training images of shape {tuple(probe.shape[1:])}: {exc}") from exc
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"RRM: the {who}'s features(x) must return (B, D) pooled features, got {shape}")
            dims[who] = out.shape[1]
        self.student_dim, self.teacher_dim = dims["student"], dims["teacher"]
        if self.student_dim != self.teacher_dim:
            if not c.rrm_projection:
                raise ValueError(f"RRM: the student's features have width {self.student_dim} but the teacher's have "
                                 f"{self.teacher_dim}; set rrm_projection=True to learn a projection between them")
            self.projection = nn.Linear(self.student_dim, self.teacher_dim).to(trainer.device)
        self.teacher = teacher
        self._amp = trainer.amp

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return StudentWithProjection(model, self.projection)

    def loss(self, net: nn.Module, batch: Batch, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        logits, student_features = net(batch.x)
        with torch.no_grad(), autocast_context(batch.x.device, getattr(self, "_amp", None)):
            teacher_features = self.teacher.features(batch.x)
        return rrm_loss(logits, student_features, teacher_features, batch.y, self.config.rrm_lambda), logits

    def state_dict(self) -> dict:
        return {"projection": None if self.projection is None else self.projection.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("projection")
        if (saved is None) != (self.projection is None):
            raise ValueError("RRM: the checkpoint's feature projection does not match this student/teacher pair")
        if saved is not None:
            self.projection.load_state_dict(saved)
