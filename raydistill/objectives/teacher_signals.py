"""The teacher's top-K signals: its K most probable tokens per position and their log-probabilities.

``teacher_topk`` is the one definition of these signals: the training step computes them online from the
teacher's logits with it, and the teacher cache (which stores them once per sweep) fills itself with it, so a
cached value and an online value of the same logits are identical.

- ``logprobs`` (B x T x K, float32): the teacher's log-softmax at temperature 1 over the FULL vocabulary,
  at its K most probable tokens, sorted descending: ``logit - logsumexp(logits)`` in float32.
- ``ids`` (B x T x K, int64): those tokens.

Ties are broken canonically: by logit descending, then token id ascending. ``torch.topk`` alone orders
equal values differently for different k (and devices): with bf16 logits, where ties are common, the first
64 of its top 256 are often not its top 64. The canonical order makes ``teacher_topk(x, K)`` truncated to
k columns equal ``teacher_topk(x, k)`` for every k <= K, which is what lets a cache of K columns serve every
objective that needs k <= K of them exactly. Where no tie crosses the K-th place (float32 logits, in
practice always) it is ``torch.topk(sorted=True)``'s own order and costs one extra column; rows with a tie
across the K-th place are redone with a composite (logit, id) integer key, a few rows at a time.
"""

from __future__ import annotations

import torch

from raydistill.errors import ConfigError
from raydistill.objectives.base import TeacherTopK, row_chunks

__all__ = ["TeacherTopK", "teacher_topk", "topk_ids", "from_batch", "check_cache_columns"]

# Elements of the float32 logits worked at once by ``teacher_topk``.
_CHUNK_ELEMENTS = 1 << 26
# Elements of the B x T x V composite key worked at once for rows with a tie across the K-th place.
_KEY_ELEMENTS = 1 << 24


def _sortable(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float32 values of ``x`` (-0 counts as +0, as in float comparison)."""
    bits = (x.float() + 0.0).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()


def _canonical_rows(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k ids of N x V rows by (logit descending, id ascending), via a unique int64 key per element."""
    vocab = logits.size(-1)
    out = []
    step = max(1, _KEY_ELEMENTS // vocab)
    low = vocab - 1 - torch.arange(vocab, device=logits.device)  # larger for smaller ids
    for start in range(0, logits.size(0), step):
        key = (_sortable(logits[start:start + step]) << 32) | low
        out.append(vocab - 1 - (key.topk(k, dim=-1, sorted=True).values & 0xFFFFFFFF))
    return torch.cat(out) if out else logits.new_zeros((0, k), dtype=torch.long)


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ids (B x T x min(k, V), int64) of the k largest logits per position, in the canonical order (module
    doc). Works on ``logits`` in their own dtype; no vocabulary-sized tensor unless a tie crosses the k-th place."""
    vocab = logits.size(-1)
    k = min(k, vocab)
    with torch.no_grad():
        values, ids = logits.topk(min(k + 1, vocab), dim=-1, sorted=True)
        if k < vocab:
            crossing = values[..., k - 1] == values[..., k]
            values, ids = values[..., :k], ids[..., :k]
        else:
            crossing = None
        # Ties inside the set: order them by id (a stable sort by value after sorting by id).
        by_id = ids.sort(-1).indices
        ids, values = ids.gather(-1, by_id), values.gather(-1, by_id)
        ids = ids.gather(-1, values.sort(dim=-1, descending=True, stable=True).indices)
        if crossing is not None and bool(crossing.any()):
            flat = ids.view(-1, k)
            rows = crossing.view(-1).nonzero().squeeze(-1)
            flat[rows] = _canonical_rows(logits.reshape(-1, vocab)[rows], k)
    return ids


def teacher_topk(logits: torch.Tensor, k: int) -> TeacherTopK:
    """The teacher's top-``k`` signals from its B x T x V logits (module doc); k is capped at the vocabulary.
    Worked a bounded number of positions at a time (the float32 log-normaliser is vocabulary-sized), each
    position's values independent of the others'."""
    vocab = logits.size(-1)
    flat = logits.reshape(-1, vocab)
    parts = []
    with torch.no_grad():
        for rows in row_chunks(flat.size(0), vocab, _CHUNK_ELEMENTS):
            chunk = flat[rows]
            ids = topk_ids(chunk, k)
            log_z = torch.logsumexp(chunk.float(), dim=-1, keepdim=True)
            parts.append((chunk.gather(-1, ids).float() - log_z, ids))
    shape = (*logits.shape[:-1], min(k, vocab))
    return TeacherTopK(torch.cat([p[0] for p in parts]).view(shape), torch.cat([p[1] for p in parts]).view(shape))


# The settings that set an objective's ``Needs.teacher_topk``, named where a cache holds too few columns.
_SETTINGS = ("objectives.kd.top_k, objectives.td.action_space.k (kind top_k) or objectives.td.action_space.max_k "
             "(kind top_p)")


def too_few_columns(cached: int, needed: int, who: str = "the active objectives") -> str:
    """The message refusing a teacher cache of ``cached`` columns where ``needed`` are read."""
    return (f"the teacher cache holds the top {cached} tokens per position, but {who} need the top {needed} "
            f"({_SETTINGS}): raise teacher_cache.top_k to at least {needed}, or lower those settings")


def check_cache_columns(cached: int, objectives: dict) -> None:
    """Refuse (ConfigError, on the driver) a cache of ``cached`` columns for ``objectives`` (name -> Objective)
    when one of them reads more; the message names each such objective and the settings involved."""
    short = {name: obj.needs().teacher_topk for name, obj in objectives.items() if obj.needs().teacher_topk > cached}
    if short:
        who = ", ".join(f"objectives.{name} ({k})" for name, k in sorted(short.items()))
        raise ConfigError(too_few_columns(cached, max(short.values()), who))


def from_batch(batch: dict[str, torch.Tensor], k: int) -> TeacherTopK | None:
    """The cached signals a batch carries (``teacher_topk_logprobs``, stored fp16/bf16/float32, and
    ``teacher_topk_ids``, int32), as float32 / int64 and cut to their first ``k`` columns; None when the batch
    carries none. A cache holding fewer than ``k`` columns is refused."""
    if "teacher_topk_logprobs" not in batch:
        return None
    logprobs, ids = batch["teacher_topk_logprobs"], batch["teacher_topk_ids"]
    if logprobs.size(-1) < k:
        raise ValueError(too_few_columns(logprobs.size(-1), k))
    return TeacherTopK(logprobs[..., :k].float(), ids[..., :k].long())
