"""The objective protocol: each objective is a small ``nn.Module`` that declares what it needs and
returns its loss term. The training step provides what the active objectives ask for and never looks
at which objective it is running."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raydistill.errors import ConfigError


class ObjectiveSettings(BaseModel):
    """Settings every objective has; subclasses add their own fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    weight: float = Field(1.0, ge=0, description="coefficient in the total loss; 0 disables the term")


@dataclass(frozen=True)
class Needs:
    """What an objective asks the step to provide."""

    teacher_logits: bool = False
    # The student's full B x T x V logits. Without them the step skips the student's vocabulary projection.
    student_logits: bool = False
    # The input of the student's output head (its final hidden state) and the head itself, for objectives that
    # compute only a few columns of the logits (``objectives.head_columns``).
    student_head: bool = False
    # Block outputs (residual stream after block l, 0-indexed) to capture on each model.
    student_layers: frozenset[int] = frozenset()
    teacher_layers: frozenset[int] = frozenset()
    # K: the teacher's K most probable tokens per position and their log-probabilities (``Step.teacher_topk``),
    # computed online from its logits or read from the teacher cache; 0 = not needed.
    teacher_topk: int = 0
    # (K, S, tau): S tokens per position sampled from the teacher's tempered distribution p^(1/tau) outside its
    # top K, with their log-probabilities and the tail's tempered mass (``Step.teacher_tail``; online or from
    # the teacher cache); S = 0: not needed. K is also asked of ``teacher_topk``.
    teacher_tail: tuple[int, int, float] = (0, 0, 1.0)
    # With ``student_head``: the objective also searches the whole vocabulary for each position's largest logit
    # (forward only, V x H per position; ``td``'s vocabulary shift). Only the FLOP estimate reads it.
    student_vocab_search: bool = False

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.teacher_logits or other.teacher_logits, self.student_logits or other.student_logits,
                     self.student_head or other.student_head, self.student_layers | other.student_layers,
                     self.teacher_layers | other.teacher_layers, max(self.teacher_topk, other.teacher_topk),
                     _one_tail(self.teacher_tail, other.teacher_tail),
                     self.student_vocab_search or other.student_vocab_search)

    @property
    def teacher(self) -> bool:
        """The teacher must run whatever the batch carries: for its logits or its block outputs."""
        return self.teacher_logits or bool(self.teacher_layers)

    def teacher_runs(self, cached_topk: bool = False) -> bool:
        """Whether the teacher runs in a step: for ``teacher`` needs, or for the top-K signals when the batch
        does not carry them from the cache (``cached_topk``)."""
        return self.teacher or (self.teacher_topk > 0 and not cached_topk)


def _one_tail(a: tuple[int, int, float], b: tuple[int, int, float]) -> tuple[int, int, float]:
    """The tail samples two needs share: one draw serves one (K, S, tau) only (a subset of a stratified draw, or
    a draw outside another K or at another temperature, is not a draw of the same kind)."""
    if a[1] == 0 or a == b:
        return b
    if b[1] == 0:
        return a
    raise ConfigError(f"objectives ask for teacher tail samples (top_k, tail_samples, temperature) {a} and {b} in "
                      "one step; allowed: one such triple per step (set the same objectives.*.top_k, tail_samples "
                      "and temperature)")


@dataclass(frozen=True)
class ModelInfo:
    """Shapes of the models, known on the driver from their configs (no weights needed)."""

    is_encoder: bool
    vocab_size: int
    student_layers: int
    student_hidden: int
    teacher_layers: int | None = None
    teacher_hidden: int | None = None
    # The student config's field that transforms logits after the output head (a softcap, a scale), if any:
    # logits computed from the head's input alone would then be wrong.
    student_logit_transform: str | None = None


@dataclass
class TeacherTopK:
    """The teacher's K most probable tokens per position (``objectives.teacher_signals.teacher_topk``)."""

    logprobs: torch.Tensor  # B x T x K float32: log-softmax at temperature 1 over the FULL vocabulary, descending
    ids: torch.Tensor  # B x T x K int64

    def first(self, k: int) -> "TeacherTopK":
        """The first ``k`` columns: the teacher's top k (``teacher_topk``'s order makes them exactly that)."""
        return TeacherTopK(self.logprobs[..., :k], self.ids[..., :k])


@dataclass
class TeacherTail:
    """S tokens per position drawn from the teacher's tempered distribution outside its top K
    (``objectives.teacher_signals.teacher_tail``), with their log-probabilities and the tail's tempered mass."""

    logprobs: torch.Tensor  # B x T x S float32: log-softmax at temperature 1 over the FULL vocabulary
    ids: torch.Tensor  # B x T x S int64
    log_mass: torch.Tensor  # B x T float32: log sum_{j outside the top K} p_j^(1/tau), p at temperature 1


@dataclass
class HeadInput:
    """The student's output head (the module mapping the final hidden state to the logits, weight V x H) and
    its input for the step, so that an objective can compute chosen logit columns without all of them."""

    hidden: torch.Tensor  # B x T x H
    module: nn.Module


@dataclass
class ForwardResult:
    logits: torch.Tensor | None  # None where no active objective needs them (Needs.student_logits)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> block output
    head: HeadInput | None = None


@dataclass
class Step:
    """Everything an objective may read. ``batch['labels']`` is aligned with the logits: the target of
    position t (the masked token for encoders, token t+1 for decoders), -100 where nothing is predicted."""

    batch: dict[str, torch.Tensor]
    student: ForwardResult
    teacher: ForwardResult | None
    student_model: nn.Module
    teacher_model: nn.Module | None
    info: ModelInfo
    extras: dict[str, Any] = field(default_factory=dict)
    # Normalisation over the optimiser step, set by the training loop (``raydistill.train.step``): for each
    # objective name, how many positions its term averages over in all micro-batches on all workers of the
    # step (``Objective.positions`` summed); ``share``: this micro-batch's fraction of the step, 1 / (micro-
    # batches x workers). Without them (tests, benchmarks, evaluation helpers) a step is its own batch.
    counts: dict[str, torch.Tensor] | None = None
    share: float = 1.0
    # The teacher's top-K signals (``Needs.teacher_topk`` columns), online or from the teacher cache.
    teacher_topk: TeacherTopK | None = None
    # The teacher's tail samples (``Needs.teacher_tail``), online or from the teacher cache.
    teacher_tail: TeacherTail | None = None
    # ``batch`` as the training loop built it on the host (CPU tensors; the same dict on a CPU run), when it has
    # it: what a step decides from the data (IIT's plans) is read here, not from the device, where each read
    # would wait for the device's queued work.
    host_batch: dict[str, torch.Tensor] | None = None

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.batch["attention_mask"]

    def topk(self, k: int) -> TeacherTopK:
        """The teacher's top-``k`` signals: the first k columns of ``teacher_topk`` (which holds the largest K any
        active objective needs), or, on a step that carries only the teacher's logits (built by hand in tests
        and benchmarks), computed from them."""
        if self.teacher_topk is not None:
            return self.teacher_topk.first(k)
        from raydistill.objectives.teacher_signals import teacher_topk

        return teacher_topk(self.teacher.logits, k)

    def tail(self, k: int, s: int, temperature: float) -> TeacherTail:
        """S tail samples outside the teacher's top ``k`` at ``temperature``: ``teacher_tail`` (drawn for
        ``Needs.teacher_tail``), or, on a step that carries only the teacher's logits, drawn from them (seeded by
        ``extras['step_seed']``)."""
        from raydistill.objectives.teacher_signals import teacher_tail

        if self.teacher_tail is not None:
            if self.teacher_tail.ids.size(-1) != s:
                raise ValueError(f"the step carries {self.teacher_tail.ids.size(-1)} tail samples per position, "
                                 f"an objective reads {s}")
            return self.teacher_tail
        return teacher_tail(self.teacher.logits, self.topk(k).ids, s, self.batch["input_ids"],
                            self.extras.get("step_seed", 0), temperature)


class Objective(nn.Module, ABC):
    """Subclasses set ``name`` and ``Settings`` and implement ``needs`` and ``forward``.

    ``forward`` returns a dict whose entry ``self.name`` is the scalar loss term (unweighted); other
    entries (``f"{name}/..."``) are logged as they are. Parameters an objective owns (a projection) are
    trained with the student."""

    name: ClassVar[str]
    Settings: ClassVar[type[ObjectiveSettings]] = ObjectiveSettings
    # Examples a micro-batch must hold (IIT pairs examples within a batch).
    min_batch_size: ClassVar[int] = 1

    @classmethod
    def reconcile(cls, objectives) -> None:
        """Adjust this objective's settings given the whole ``objectives`` config section (before the
        config's checks run); by default nothing."""

    def __init__(self, settings: ObjectiveSettings, info: ModelInfo):
        super().__init__()
        self.settings = settings
        self.info = info

    def needs(self) -> Needs:
        return Needs()

    def positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The B x T positions this objective's term averages over (default: the non-padding tokens). The
        training loop counts them over every micro-batch and worker of an optimiser step before running it,
        so that the term is one mean over the step whatever the split (see ``mean``); it must therefore be
        a function of the batch alone."""
        return batch["attention_mask"].bool()

    def mean(self, step: Step, values: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """This micro-batch's share of the step's per-token mean: the sum of ``values`` (B x T) over ``where``
        (default ``positions(step.batch)``; a subset of them, which then count as zero elsewhere) divided by
        the objective's count for the whole optimiser step (``step.counts``), or for this batch when the step
        has none. Summed over the step's micro-batches and workers, these shares are the mean over all the
        step's positions, identical for any split of the same sequences (the transformers / TRL
        ``num_items_in_batch`` rule)."""
        if where is None:
            where = self.positions(step.batch)
        total = torch.where(where, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
        count = step.counts.get(self.name) if step.counts is not None else None
        if count is None:
            count = self.positions(step.batch).sum()
        return total / count.to(total.dtype).clamp_min(1.0)

    @abstractmethod
    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        """The loss terms of this step (see the class doc).

        Every returned value is this micro-batch's share of the step's value, so that the training loop sums
        them over micro-batches and workers: token averages come from ``mean``; a value that is not a token
        average (a per-example statistic) is scaled by ``step.share``."""


def width_projection(info: ModelInfo) -> nn.Linear | None:
    """A learned map from the student's residual width to the teacher's, or None when they agree."""
    if info.student_hidden == info.teacher_hidden:
        return None
    return nn.Linear(info.student_hidden, info.teacher_hidden, bias=False)


def row_chunks(rows: int, per_row: int, budget: int) -> Iterator[slice]:
    """Consecutive slices of ``range(rows)`` with at most ``budget`` elements each (at least one row), for
    fused objective kernels that work a bounded amount of memory at a time."""
    step = max(1, budget // max(1, per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true; 0 (with a graph) when none count."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
