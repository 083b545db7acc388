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

``teacher_tail`` adds S tokens per position drawn from the teacher's tempered distribution outside its top K
(its tail, p_j^(1/tau) / W with W the tail's tempered mass, also returned), for the unbiased sampled sparse KD
(``objectives.kd``, ``tail_samples``). The draw is systematic: one uniform u per position and the points
(u + s) / S, s = 0..S-1, through the tail's inverse CDF (tokens in id order, float64), so that every token of
the tail is drawn floor or ceil of S p_j^(1/tau) / W times. u is a counter-based hash of (seed, the row's
token ids, the position) in integer arithmetic (``tail_uniforms``): the training step and the teacher cache's
fill, given the same batch and seed, draw the same tokens on the same device, with no random-generator state.
"""

from __future__ import annotations

import torch

from raydistill.errors import ConfigError
from raydistill.objectives.base import TeacherTail, TeacherTopK, row_chunks

__all__ = ["TeacherTopK", "TeacherTail", "teacher_topk", "topk_ids", "teacher_tail", "tail_uniforms", "sample_tail",
           "from_batch", "tail_from_batch", "check_cache_columns"]

# Elements of the float32 logits worked at once by ``teacher_topk``.
_CHUNK_ELEMENTS = 1 << 26
# Elements of the float64 tail distribution (and its CDF) worked at once by ``sample_tail``.
_TAIL_ELEMENTS = 1 << 22
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


def _ordered_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``topk_ids`` before its tie fix: (ids in the canonical order wherever no tie crosses the k-th place, the B x T
    bool of positions where one does, or None when k covers the vocabulary). Reads nothing on the host."""
    vocab = logits.size(-1)
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
        return ids.gather(-1, values.sort(dim=-1, descending=True, stable=True).indices), crossing


@torch.no_grad()
def _fix_crossing_rows(flat_ids: torch.Tensor, logits: torch.Tensor, crossing: torch.Tensor | None) -> None:
    """Redo, in place, the rows of ``flat_ids`` (N x k) whose tie crosses the k-th place, from ``logits`` (N
    positions of V; reshaped only then, which copies non-contiguous logits). Its host read (are there any?) is a
    top-k's only one; on a GPU each read waits for the device, so callers working in chunks gather the chunks'
    flags and call this once."""
    if crossing is not None and bool(crossing.any()):
        rows = crossing.view(-1).nonzero().squeeze(-1)
        flat_ids[rows] = _canonical_rows(logits.reshape(-1, logits.size(-1))[rows], flat_ids.size(-1))


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ids (B x T x min(k, V), int64) of the k largest logits per position, in the canonical order (module
    doc). Works on ``logits`` in their own dtype; no vocabulary-sized tensor unless a tie crosses the k-th place."""
    vocab = logits.size(-1)
    k = min(k, vocab)
    ids, crossing = _ordered_topk(logits, k)
    _fix_crossing_rows(ids.view(-1, k), logits, crossing)
    return ids


def teacher_topk(logits: torch.Tensor, k: int) -> TeacherTopK:
    """The teacher's top-``k`` signals from its B x T x V logits (module doc); k is capped at the vocabulary.
    Worked a bounded number of positions at a time (the float32 log-normaliser is vocabulary-sized), each
    position's values independent of the others'; the ties across the k-th place are fixed after the last
    chunk, with one host read in all."""
    vocab = logits.size(-1)
    k = min(k, vocab)
    flat = logits.reshape(-1, vocab)
    parts = []
    with torch.no_grad():
        for rows in row_chunks(flat.size(0), vocab, _CHUNK_ELEMENTS):
            chunk = flat[rows]
            ids, crossing = _ordered_topk(chunk, k)
            log_z = torch.logsumexp(chunk.float(), dim=-1, keepdim=True)
            parts.append((log_z, ids, crossing))
        ids = torch.cat([p[1] for p in parts])
        crossing = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        _fix_crossing_rows(ids, flat, crossing)
        logprobs = flat.gather(-1, ids).float() - torch.cat([p[0] for p in parts])
    shape = (*logits.shape[:-1], k)
    return TeacherTopK(logprobs.view(shape), ids.view(shape))


# ----------------------------------------------------------------------------------------------- tail samples
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (Wellons' lowbias32): every input bit flips every output bit with probability
    about 1/2. Integer ops only, so CPU and GPU give the same bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def tail_uniforms(input_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """One uniform in [0, 1) per position (B x T float64, 53 bits) from ``seed`` (the training step's seed), the
    row's token ids and the position: a counter-based hash, so the same batch and seed give the same values
    anywhere. Each position's value depends on its whole row (a sum of position-keyed token hashes), so equal
    tokens at equal positions of different rows differ."""
    ids = input_ids.long() & _MASK32
    pos = torch.arange(ids.size(-1), device=ids.device)
    seed_h = _mix32(torch.full((), seed & _MASK32, dtype=torch.long, device=ids.device))  # a fill, no copy
    pos_h = _mix32((pos + seed_h) & _MASK32)
    tok = _mix32(ids ^ pos_h)
    row = tok.sum(-1, keepdim=True) & _MASK32  # < T * 2^32: no overflow
    hi = _mix32(_mix32(row ^ pos_h) ^ tok)
    lo = _mix32(hi ^ seed_h ^ 0x5BD1E995) >> 11
    return (hi * (1 << 21) + lo).double() / float(1 << 53)


def sample_tail(logits: torch.Tensor, top_ids: torch.Tensor, s: int, uniforms: torch.Tensor,
                temperature: float = 1.0) -> TeacherTail:
    """S tokens per position from the teacher's tempered distribution outside ``top_ids`` (B x T x K),
    p_j^(1/tau) / W with W = sum_tail p_j^(1/tau), systematically: the points (u + i) / S (i < S, u = ``uniforms``,
    B x T in [0, 1)) through the inverse CDF of the tempered tail (id order, float64); their log-probabilities at
    temperature 1 as ``teacher_topk`` computes its values, and log W. Each draw has probability p_j^(1/tau) / W,
    so (1/S) sum_s f(j_s) is an unbiased estimate of the tempered tail's mean of f for any f. A position whose
    tail has no mass (K = V) gets log W = -inf and arbitrary tokens. Worked a bounded number of positions at a
    time."""
    vocab = logits.size(-1)
    flat, ids_flat, u_flat = logits.reshape(-1, vocab), top_ids.reshape(-1, top_ids.size(-1)), uniforms.reshape(-1)
    offsets = torch.arange(s, device=logits.device, dtype=torch.float64)
    columns = torch.arange(vocab, device=logits.device)
    parts = []
    with torch.no_grad():
        for rows in row_chunks(flat.size(0), vocab, _TAIL_ELEMENTS):
            chunk = flat[rows]
            log_z = torch.logsumexp(chunk.float(), dim=-1, keepdim=True)
            tempered = ((chunk.double() - log_z.double()) / temperature).scatter(-1, ids_flat[rows], float("-inf"))
            shift = tempered.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).min)  # a stable exp
            p = (tempered - shift).exp()
            cdf = p.cumsum(-1)
            points = (u_flat[rows, None].to(torch.float64) + offsets) / s * cdf[:, -1:]
            # First index whose CDF exceeds the point: a token of positive tail probability (the CDF rises there);
            # rounding can put a point at the very top, which then goes to the last such token.
            last = torch.where(p > 0, columns, 0).amax(-1, keepdim=True)
            ids = torch.minimum(torch.searchsorted(cdf, points, right=True), last)
            parts.append((chunk.gather(-1, ids).float() - log_z, ids, (cdf[:, -1].log() + shift[:, 0]).float()))
    shape = (*logits.shape[:-1], s)
    return TeacherTail(torch.cat([x[0] for x in parts]).view(shape), torch.cat([x[1] for x in parts]).view(shape),
                       torch.cat([x[2] for x in parts]).view(shape[:-1]))


def teacher_tail(logits: torch.Tensor, top_ids: torch.Tensor, s: int, input_ids: torch.Tensor,
                 seed: int, temperature: float = 1.0) -> TeacherTail:
    """The teacher's S tail samples outside ``top_ids`` at ``temperature`` for a batch (``input_ids``) at a step
    (``seed``): the one definition used online and by the teacher cache's fill (module doc)."""
    return sample_tail(logits, top_ids, s, tail_uniforms(input_ids.to(logits.device), seed), temperature)


# The settings that set an objective's ``Needs.teacher_topk``, named where a cache holds too few columns.
_SETTINGS = ("objectives.kd.top_k, objectives.td.action_space.k (kind top_k) or objectives.td.action_space.max_k "
             "(kind top_p)")


def too_few_columns(cached: int, needed: int, who: str = "the active objectives") -> str:
    """The message refusing a teacher cache of ``cached`` columns where ``needed`` are read."""
    return (f"the teacher cache holds the top {cached} tokens per position, but {who} need the top {needed} "
            f"({_SETTINGS}): raise teacher_cache.top_k to at least {needed}, or lower those settings")


def check_cache_columns(cached: int, objectives: dict, tail_samples: int = 0, tail_temperature: float = 1.0) -> None:
    """Refuse (ConfigError, on the driver) a cache of ``cached`` columns (and ``tail_samples`` tail samples drawn
    outside them at ``tail_temperature``) for ``objectives`` (name -> Objective) when one of them reads more
    columns, or other tail samples; the message names each such objective and the settings involved."""
    short = {name: obj.needs().teacher_topk for name, obj in objectives.items() if obj.needs().teacher_topk > cached}
    if short:
        who = ", ".join(f"objectives.{name} ({k})" for name, k in sorted(short.items()))
        raise ConfigError(too_few_columns(cached, max(short.values()), who))
    for name, obj in sorted(objectives.items()):
        tail = obj.needs().teacher_tail
        if tail[1] and tail != (cached, tail_samples, tail_temperature):
            raise ConfigError(too_few_samples((cached, tail_samples, tail_temperature), tail, f"objectives.{name}"))


def too_few_samples(cached: tuple[int, int, float], needed: tuple[int, int, float],
                    who: str = "the active objectives") -> str:
    """The message refusing a teacher cache whose tail samples (top_k, tail_samples, temperature) = ``cached`` are
    not the ``needed`` ones."""
    (ck, cs, ct), (k, s, t) = cached, needed
    fix = (f"set teacher_cache.tail_samples to {s}, teacher_cache.top_k to {k} and teacher_cache.tail_temperature "
           f"to {t:g}")
    if cs < s:
        return (f"the teacher cache holds {cs} tail samples per position, but {who} read {s} "
                f"(objectives.kd.tail_samples): {fix}")
    return (f"the teacher cache holds {cs} tail samples per position drawn outside its top {ck} at temperature "
            f"{ct:g}, but {who} read {s} drawn outside the top {k} at temperature {t:g} (objectives.kd.top_k, "
            f"tail_samples, temperature); a stratified draw serves one (top_k, tail_samples, temperature) only: {fix}")


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


def tail_from_batch(batch: dict[str, torch.Tensor], s: int) -> TeacherTail | None:
    """The cached tail samples a batch carries (``teacher_tail_logprobs``, ``teacher_tail_ids``,
    ``teacher_tail_log_mass``) as float32 / int64; None when it carries none. Another number of samples than
    ``s`` is refused."""
    if "teacher_tail_logprobs" not in batch:
        return None
    logprobs, ids = batch["teacher_tail_logprobs"], batch["teacher_tail_ids"]
    if logprobs.size(-1) != s:
        raise ValueError(f"the teacher cache holds {logprobs.size(-1)} tail samples per position, the objectives "
                         f"read {s}: set teacher_cache.tail_samples to {s}")
    return TeacherTail(logprobs.float(), ids.long(), batch["teacher_tail_log_mass"].float())
