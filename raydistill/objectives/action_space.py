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

Ties: tokens are ranked by ``torch.topk`` (sorted), and a set that must cut through tokens of equal
logit keeps the ones that come first in topk's order. That order is deterministic for a given backend
and device but is not guaranteed to be "lowest id first".

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
    k = min(k, teacher_logits.size(-1))
    with torch.no_grad():
        index = teacher_logits.topk(k, dim=-1, sorted=True).indices
    return ActionSet(index, torch.ones_like(index, dtype=torch.bool))


def top_p_actions(teacher_logits: torch.Tensor, p: float, max_k: int) -> ActionSet:
    """Token j (in topk order) is in the set when the mass of the tokens before it is < p: the smallest
    prefix reaching p, and always the first token (its preceding mass is 0 < p)."""
    with torch.no_grad():
        values, index = teacher_logits.topk(min(max_k, teacher_logits.size(-1)), dim=-1, sorted=True)
        log_z = torch.logsumexp(teacher_logits.float(), dim=-1, keepdim=True)
        probs = (values.float() - log_z).exp()
        before = probs.cumsum(-1) - probs
        return ActionSet(index, before < p)


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
