"""The reduced action space A(s) of the ``td`` objective, chosen from the teacher's logits.

A set is represented by gathered token ids ``index`` (B x T x K) and a validity mask ``valid`` (same
shape), never by a B x T x V mask: everything downstream gathers K columns of the student's logits, so
its memory grows with K and not with the vocabulary.

Kinds (``ActionSpaceSettings.kind``):

- ``top_k``: the teacher's k most probable tokens (all valid). k >= V means the whole vocabulary.
- ``top_p``: the nucleus, the smallest set of the teacher's most probable tokens whose cumulative
  probability is >= p, under the teacher's own distribution (softmax at temperature 1, the distribution
  the paper's nucleus is taken from; the student's temperature does not change what the teacher ranks
  as likely). It always holds at least one token and at most ``max_k`` (so K = min(max_k, V) columns
  are gathered and memory stays bounded even where the teacher is flat); positions the cap cuts short
  cover less than p.

Sources: the teacher's logits (``action_space``), or its top-K signals (``actions_from_topk``: online from
the same logits, or from the teacher cache). Both give the same sets, exactly: top_k needs the first k of
the teacher's ranked tokens, top_p the first max_k and their probabilities, and ``teacher_topk``'s order
makes the first k of a top-K the top k (``objectives.teacher_signals``). So a cache of K columns serves
top_k with k <= K and top_p with max_k <= K (``TDLoss.needs`` asks for min(k or max_k, V) columns, and a
cache with fewer is refused). One caveat for top_p: the nucleus is cut on the teacher's probabilities,
which a cache stores in fp16 / bf16; a position whose cumulative mass lies within that rounding of p can
cut one token differently than online (float32). top_k uses only the ids and is exact in every case.

Ties: tokens are ranked by logit, then by token id ascending (``teacher_signals.topk_ids``), the same
order whatever k, device or dtype. Without ties this is ``torch.topk(sorted=True)``'s own order.

The expert token a_t (the label) may lie outside A(s); ``add_expert`` appends one column holding it, so
that the student's logit for a_t comes from the same single gather (one B x T x V gradient buffer, not
two). With ``include`` that column is valid exactly where a_t is not already in A(s): the set becomes
A'(s) = A(s) u {a_t}, and each state's set is the same whether the state is seen as the current or as the
next state of a transition. With ``skip`` the column is never part of the set (it only carries Q(s, a_t)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from raydistill.objectives.base import TeacherTopK
from raydistill.objectives.teacher_signals import teacher_topk, topk_ids

IGNORE = -100


class ActionSpaceSettings(BaseModel):
    """How A(s) is chosen from the teacher's distribution at s."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: Literal["top_k", "top_p"] = Field("top_k", description="top_k: the teacher's k most probable tokens; "
                                            "top_p: the teacher's nucleus (smallest set with mass >= p)")
    k: int = Field(64, ge=1, description="set size for kind=top_k (k >= vocabulary: the whole vocabulary)")
    p: float = Field(0.8, gt=0, le=1, description="nucleus mass for kind=top_p (teacher softmax, temperature 1)")
    max_k: int = Field(256, ge=1, description="cap on the nucleus size for kind=top_p (bounds memory where the "
                       "teacher is flat)")


@dataclass
class ActionSet:
    index: torch.Tensor  # [B, T, K] token ids (long)
    valid: torch.Tensor  # [B, T, K] bool; at least one valid column per position


def top_k_actions(teacher_logits: torch.Tensor, k: int) -> ActionSet:
    index = topk_ids(teacher_logits, k)
    return ActionSet(index, torch.ones_like(index, dtype=torch.bool))


def top_p_actions(teacher_logits: torch.Tensor, p: float, max_k: int) -> ActionSet:
    """Token j (in rank order) is in the set when the mass of the tokens before it is < p: the smallest
    prefix reaching p, and always the first token (its preceding mass is 0 < p)."""
    return actions_from_topk(teacher_topk(teacher_logits, max_k), ActionSpaceSettings(kind="top_p", p=p, max_k=max_k))


def columns(settings: ActionSpaceSettings, vocab: int) -> int:
    """How many of the teacher's ranked tokens the set is chosen from: k (top_k) or max_k (top_p), at most V."""
    return min(settings.k if settings.kind == "top_k" else settings.max_k, vocab)


def actions_from_topk(topk: TeacherTopK, settings: ActionSpaceSettings) -> ActionSet:
    """A(s) from the teacher's top-K signals (K >= ``columns``; the first ``columns`` are read)."""
    index = topk.ids[..., :columns(settings, topk.ids.size(-1))]
    if settings.kind == "top_k":
        return ActionSet(index, torch.ones_like(index, dtype=torch.bool))
    with torch.no_grad():
        probs = topk.logprobs[..., :index.size(-1)].float().exp()
        before = probs.cumsum(-1) - probs
    return ActionSet(index, before < settings.p)


def action_space(teacher_logits: torch.Tensor, settings: ActionSpaceSettings,
                 chunk_size: int | None = None) -> ActionSet:
    """A(s) for every position of ``teacher_logits`` (B x T x V), computed ``chunk_size`` positions at a time
    when set, so the teacher-side working memory (softmax over the vocabulary for top_p) is B x chunk x V."""
    def one(logits: torch.Tensor) -> ActionSet:
        if settings.kind == "top_k":
            return top_k_actions(logits, settings.k)
        return top_p_actions(logits, settings.p, settings.max_k)

    if chunk_size is None or chunk_size >= teacher_logits.size(1):
        return one(teacher_logits)
    parts = [one(c) for c in teacher_logits.split(chunk_size, dim=1)]
    return ActionSet(torch.cat([a.index for a in parts], 1), torch.cat([a.valid for a in parts], 1))


def add_expert(actions: ActionSet, labels: torch.Tensor, include: bool) -> tuple[ActionSet, torch.Tensor]:
    """A(s) plus one last column holding the expert token (labels; id 0 where unlabelled), and a B x T mask of
    the labelled positions whose expert is already in A(s). The new column is valid where ``include`` and
    the position is labelled and its expert is not already in A(s)."""
    labelled = labels != IGNORE
    expert = labels.clamp_min(0).unsqueeze(-1)
    in_set = ((actions.index == expert) & actions.valid).any(-1) & labelled
    extra = (labelled & ~in_set) if include else torch.zeros_like(labelled)
    return (ActionSet(torch.cat([actions.index, expert], -1), torch.cat([actions.valid, extra.unsqueeze(-1)], -1)),
            in_set)
