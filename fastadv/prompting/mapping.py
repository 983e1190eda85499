"""Label mappings: from the source network's logits ``(B, n_source)`` to the target task's ``(B, n_target)``.

================  =====================================================================================
``rlm``           a random, fixed, injective map target class → source class (drawn once)
``flm``           frequency label mapping: computed once before training with the initial prompt
``ilm``           iterative label mapping: recomputed at the start of every epoch with the current prompt
``linear``        a learned ``Linear(n_source, n_target)`` on the source logits (TARP-VP's code)
================  =====================================================================================

``flm`` and ``ilm`` count ``(argmax source class, target label)`` pairs over the training set on the device
(:func:`label_counts`: one ``bincount``), then assign greedily (:func:`greedy_assignment`): take the largest
remaining count, give its target class that source class, remove the source row and the target column, and
repeat until every target class has a source class. The one-to-one mappings select logits
(``logits[:, index]``); they have no parameters.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from . import _data

MAPPINGS = ("rlm", "flm", "ilm", "linear")


def _fail(owner: str, message: str) -> None:
    raise ValueError(f"fastadv.prompting.{owner}: {message}")


def _check_sizes(owner: str, n_source, n_target, one_to_one: bool) -> tuple[int, int]:
    for name, value in (("n_source", n_source), ("n_target", n_target)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            _fail(owner, f"`{name}` must be an integer >= 1, got {value!r}")
    if one_to_one and n_target > n_source:
        _fail(owner, f"`n_target`={n_target} target classes exceed the `n_source`={n_source} source classes: a "
                     "one-to-one label mapping needs n_target <= n_source (use the 'linear' mapping instead)")
    return int(n_source), int(n_target)


# ---------------------------------------------------------------------------------------------------------
# counting and the greedy assignment


def label_counts(source_pred: Tensor, target: Tensor, n_source: int, n_target: int) -> Tensor:
    """``counts[s, t]`` = number of examples with predicted source class ``s`` and target label ``t``
    (``int64``, on the inputs' device; one ``bincount``)."""
    if source_pred.shape != target.shape or source_pred.dim() != 1:
        _fail("label_counts", f"`source_pred` and `target` must be 1-D of equal length, got "
                              f"{tuple(source_pred.shape)} and {tuple(target.shape)}")
    flat = source_pred.long() * n_target + target.long()
    return torch.bincount(flat, minlength=n_source * n_target).view(n_source, n_target)


def greedy_assignment(counts: Tensor) -> Tensor:
    """Greedy one-to-one assignment on a ``(n_source, n_target)`` count matrix.

    Returns ``index`` ``(n_target,)`` (``int64``, on ``counts``' device): target class ``t`` is read from source
    logit ``index[t]``. Each round takes the largest remaining count, assigns its column (target) to its row
    (source) and removes both, until every target has a source (``n_target`` rounds, no host synchronisation).

    Ties go to the first maximum in row-major order, i.e. the lowest source index, then the lowest target
    index (``torch.argmax`` returns the first maximal element). Rows and columns are removed by setting them
    to -1, below every count, so a removed pair is never chosen while any remains.
    """
    if not isinstance(counts, Tensor) or counts.dim() != 2:
        _fail("greedy_assignment", "`counts` must be a (n_source, n_target) tensor")
    n_source, n_target = counts.shape
    _check_sizes("greedy_assignment", n_source, n_target, one_to_one=True)
    if counts.is_floating_point():
        work = counts.to(torch.float64).clone()
        if bool((work < 0).any()) or not bool(torch.isfinite(work).all()):
            _fail("greedy_assignment", "`counts` must be finite and non-negative")
    else:
        work = counts.to(torch.int64).clone()
        if bool((work < 0).any()):
            _fail("greedy_assignment", "`counts` must be non-negative")
    index = torch.empty(n_target, dtype=torch.int64, device=counts.device)
    for _ in range(n_target):
        flat = work.view(-1).argmax()
        row = torch.div(flat, n_target, rounding_mode="floor").view(1)
        col = (flat % n_target).view(1)
        index.index_copy_(0, col, row)
        work.index_fill_(0, row, -1)
        work.index_fill_(1, col, -1)
    return index


# ---------------------------------------------------------------------------------------------------------
# mappings


class LabelMapping(nn.Module):
    """Base class: ``forward(source_logits) -> target_logits``."""

    kind: str = ""
    #: recompute the mapping (``fit``) at the start of every epoch
    refit_every_epoch: bool = False

    def __init__(self, n_source: int, n_target: int) -> None:
        super().__init__()
        self.n_source = n_source
        self.n_target = n_target

    @property
    def needs_fit(self) -> bool:
        """Whether the trainer must call :meth:`fit` before the first epoch."""
        return False

    def fit(self, model: nn.Module, data, *, batch_size: int = 256, amp: str | None = None) -> Tensor | None:
        """Compute a data-dependent mapping (no-op for mappings that have none)."""
        return None

    def check_logits(self, logits: Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.n_source:
            _fail(type(self).__name__, f"the source network returned logits of shape {tuple(logits.shape)}, but the "
                                       f"mapping expects (B, n_source={self.n_source})")

    def config(self) -> dict:
        return {"mapping": self.kind, "n_source": self.n_source, "n_target": self.n_target}

    def extra_repr(self) -> str:
        return f"n_source={self.n_source}, n_target={self.n_target}"


class OneToOneMapping(LabelMapping):
    """Target class ``t`` takes source logit ``index[t]``; ``index`` is an injective ``int64`` buffer."""

    def __init__(self, n_source: int, n_target: int, index: Tensor | None = None) -> None:
        n_source, n_target = _check_sizes(type(self).__name__, n_source, n_target, one_to_one=True)
        super().__init__(n_source, n_target)
        if index is None:
            index = torch.arange(n_target)
        self.register_buffer("index", torch.empty(n_target, dtype=torch.int64))
        self.set_index(index)

    def set_index(self, index: Tensor) -> None:
        """Replace the mapping (checked: ``n_target`` distinct source classes in range)."""
        index = torch.as_tensor(index)
        owner = type(self).__name__
        if index.shape != (self.n_target,) or index.is_floating_point():
            _fail(owner, f"`index` must be {self.n_target} integer source classes, got {tuple(index.shape)}")
        cpu = index.detach().cpu()
        if int(cpu.min()) < 0 or int(cpu.max()) >= self.n_source or cpu.unique().numel() != self.n_target:
            _fail(owner, f"`index` must hold distinct source classes in [0, {self.n_source}), got {cpu.tolist()}")
        self.index.copy_(index.to(self.index.device))

    def forward(self, logits: Tensor) -> Tensor:
        self.check_logits(logits)
        return logits.index_select(1, self.index)

    def config(self) -> dict:
        return {**super().config(), "index": self.index.tolist()}


class RandomMapping(OneToOneMapping):
    """``rlm``: ``n_target`` distinct source classes drawn at random once (``generator``: a ``torch.Generator`` or
    an int seed)."""

    kind = "rlm"

    def __init__(self, n_source: int, n_target: int, *, generator: torch.Generator | int | None = None) -> None:
        _check_sizes(type(self).__name__, n_source, n_target, one_to_one=True)
        if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(int(generator))
        super().__init__(n_source, n_target, torch.randperm(n_source, generator=generator)[:n_target])


class FrequencyMapping(OneToOneMapping):
    """``flm``: the greedy assignment on the counts of the source network's predictions (with the prompt as it
    is when :meth:`fit` runs) against the target labels; fitted once, before training."""

    kind = "flm"

    def __init__(self, n_source: int, n_target: int) -> None:
        super().__init__(n_source, n_target)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.fits = 0  # how many times fit() ran in this process

    @property
    def needs_fit(self) -> bool:
        return not bool(self.fitted)

    @torch.no_grad()
    def fit(self, model: nn.Module, data, *, batch_size: int = 256, amp: str | None = None) -> Tensor:
        """Count ``(argmax source class, target label)`` over ``data`` with ``model.source_logits`` (an
        :class:`~fastadv.prompting.LMVPModel`), assign greedily; returns the count matrix."""
        counts = source_label_counts(model, data, self.n_source, self.n_target, batch_size=batch_size, amp=amp)
        self.index.copy_(greedy_assignment(counts))
        self.fitted.fill_(True)
        self.fits += 1
        return counts


class IterativeMapping(FrequencyMapping):
    """``ilm``: :class:`FrequencyMapping` recomputed at the start of every epoch with the current prompt."""

    kind = "ilm"
    refit_every_epoch = True


class LinearMapping(LabelMapping):
    """``linear``: a learned ``Linear(n_source, n_target)`` on the source logits (trained with the prompt)."""

    kind = "linear"

    def __init__(self, n_source: int, n_target: int, *, bias: bool = True) -> None:
        n_source, n_target = _check_sizes(type(self).__name__, n_source, n_target, one_to_one=False)
        super().__init__(n_source, n_target)
        self.linear = nn.Linear(n_source, n_target, bias=bias)

    def forward(self, logits: Tensor) -> Tensor:
        self.check_logits(logits)
        return self.linear(logits)


def make_mapping(kind: str | LabelMapping, n_source: int, n_target: int, *,
                 generator: torch.Generator | int | None = None) -> LabelMapping:
    """A mapping by name (``rlm``, ``flm``, ``ilm``, ``linear``); a :class:`LabelMapping` is returned as it is
    (after checking its sizes)."""
    if isinstance(kind, LabelMapping):
        if (kind.n_source, kind.n_target) != (n_source, n_target):
            _fail("make_mapping", f"`mapping` maps {kind.n_source} -> {kind.n_target} classes, the model needs "
                                  f"{n_source} -> {n_target}")
        return kind
    if kind == "rlm":
        return RandomMapping(n_source, n_target, generator=generator)
    if kind == "flm":
        return FrequencyMapping(n_source, n_target)
    if kind == "ilm":
        return IterativeMapping(n_source, n_target)
    if kind == "linear":
        return LinearMapping(n_source, n_target)
    _fail("make_mapping", f"unknown `mapping` {kind!r}; valid: {', '.join(MAPPINGS)}")


@torch.no_grad()
def source_label_counts(model: nn.Module, data, n_source: int, n_target: int, *, batch_size: int = 256,
                        amp: str | None = None) -> Tensor:
    """The ``(n_source, n_target)`` count matrix of ``(argmax model.source_logits(x), y)`` over ``data``,
    accumulated on the model's device (the model runs in eval mode; its modes are restored)."""
    from ..utils import autocast_context

    device = next(iter(model.parameters())).device
    counts = torch.zeros(n_source, n_target, dtype=torch.int64, device=device)
    bad_labels = torch.zeros((), dtype=torch.bool, device=device)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for x, y in _data.batches(data, batch_size, device, "data"):
            with autocast_context(device, amp):
                logits = model.source_logits(x)
            if logits.shape[1] != n_source:
                _fail("source_label_counts", f"the source network returned {logits.shape[1]} logits, the mapping "
                                             f"expects n_source={n_source}")
            # An out-of-range label would land in another cell of the flat bincount: clamp it here and
            # report it once after the loop (one host synchronisation per pass, not per batch).
            bad_labels |= ((y < 0) | (y >= n_target)).any()
            counts += label_counts(logits.argmax(dim=1), y.clamp(0, n_target - 1), n_source, n_target)
    finally:
        for m, training in modes:
            m.training = training
    if bool(bad_labels):
        _fail("source_label_counts", f"target labels must lie in [0, n_target={n_target})")
    return counts


__all__ = ["MAPPINGS", "FrequencyMapping", "IterativeMapping", "LabelMapping", "LinearMapping", "OneToOneMapping",
           "RandomMapping", "greedy_assignment", "label_counts", "make_mapping", "source_label_counts"]
