"""Chosen columns of the student's logits, computed from its output head's input:
z[n, j] = h[n] . W[index[n, j]] (+ b[index[n, j]]), without the B x T x V logits or their gradient.

An objective that reads only K columns per position (``td``) would otherwise pay for the whole vocabulary
twice: the model's projection to B x T x V logits and, in backward, their B x T x V gradient. Here the
forward keeps only h and the index; the backward gives h its gradient and accumulates the head's over the
distinct tokens present (U x H, float32) before writing them once into a V x H gradient in the weight's
dtype (so a token chosen at many positions is not summed in bf16). The hidden state's gradient is likewise
summed over a position's K columns in float32 and rounded to its dtype once, so a token present in two
columns of one position (``td``'s expert column duplicating a set column) is not rounded per column. Both
passes work a bounded number of positions at a time, so the gathered head rows (positions x K x H) stay
under ``_CHUNK_ELEMENTS``.

``head_columns_and_argmax`` also finds, per position, the token with the largest logit over the whole
vocabulary (``td``'s shift ``max_a z(s, a)``) and appends it as one more column, so that it gets its
gradient through the same computation. The search runs under no_grad over blocks of positions x vocabulary
rows (at most ``_SEARCH_ELEMENTS`` scores at a time, in the head's dtype), so neither the B x T x V logits
nor any gradient of them ever exists. In float32 (or float64) the search is exact up to the order of
summation; in a half-precision dtype its scores are rounded, so it keeps the best ``_SEARCH_CANDIDATES``
tokens of each position and picks among them with float32 scores computed as the columns are. The
argmax then misses the float32 maximum only if that many tokens are within rounding of it, and even then
differs from it by less than the rounding.

ZeRO-3 partitions the head's weight outside its module's forward, so the computation (search included)
runs as a call of the head module (see ``head_columns``) and DeepSpeed's module hooks gather, release and
reduce the weight.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from raydistill.models.adapters import capture_input
from raydistill.objectives.base import HeadInput, row_chunks

_CHUNK_ELEMENTS = 1 << 24  # gathered head rows per chunk: 64 MiB in float32
_SEARCH_ELEMENTS = 1 << 22  # scores per block of the argmax search: 16 MiB in float32
_SEARCH_ROWS = 1024  # positions per block of the argmax search at most (vocabulary rows fill the rest)
_SEARCH_CANDIDATES = 4  # tokens kept per position by a half-precision search, then scored in float32


def _chunks(rows: int, per_row: int) -> Iterator[slice]:
    return row_chunks(rows, per_row, _CHUNK_ELEMENTS)


@torch.no_grad()
def _columns_fp32(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  index: torch.Tensor) -> torch.Tensor:
    """z[n, j] = h[n] . W[index[n, j]] (+ b[...]) in float32 (N x K), a chunk of positions at a time
    (``_HeadColumns``'s forward, and the search's rescoring of its candidates)."""
    out = torch.empty(index.shape, dtype=torch.float32, device=hidden.device)
    for rows in _chunks(index.size(0), index.size(1) * hidden.size(1)):
        out[rows] = torch.bmm(weight[index[rows]].float(), hidden[rows].float().unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        out += bias[index].float()
    return out


class _HeadColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, index):  # N x H, V x H, V or None, N x K -> N x K float32
        ctx.save_for_backward(hidden, index)
        ctx.weight, ctx.bias = weight, bias  # parameters: ZeRO-3 gathers them again before this backward runs
        return _columns_fp32(hidden, weight, bias, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, index = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = grad_b = None
        if want_w:
            tokens, inverse = torch.unique(index, return_inverse=True)
            acc = torch.zeros(tokens.numel(), hidden.size(1), dtype=torch.float32, device=hidden.device)
        for rows in _chunks(index.size(0), index.size(1) * hidden.size(1)):
            g = grad[rows]  # c x K
            if want_h:
                grad_h[rows] = torch.bmm(g.unsqueeze(1), weight[index[rows]].float()).squeeze(1)
            if want_w:
                contrib = g.unsqueeze(-1) * hidden[rows].float().unsqueeze(1)  # c x K x H
                acc.index_add_(0, inverse[rows].reshape(-1), contrib.reshape(-1, hidden.size(1)))
        if want_w:
            grad_w = weight.new_zeros(weight.shape)
            grad_w[tokens] = acc.to(weight.dtype)
        if want_b:
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=grad.device)
            grad_b = grad_b.index_add_(0, index.reshape(-1), grad.reshape(-1)).to(bias.dtype)
        return grad_h, grad_w, grad_b, None


@torch.no_grad()
def head_argmax(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per row of ``hidden`` (N x H), the token with the largest logit ``h . W[v] (+ b[v])`` over all V rows
    of ``weight`` (N, long), without the N x V logits: blocks of at most ``_SEARCH_ELEMENTS`` scores. Ties
    go to the lowest token id in an exact search."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    exact = dtype in (torch.float32, torch.float64)
    n, vocab = hidden.size(0), weight.size(0)
    m = 1 if exact else min(_SEARCH_CANDIDATES, vocab)
    block = min(vocab, max(m, _SEARCH_ELEMENTS // max(1, min(n, _SEARCH_ROWS))))  # vocabulary rows per block
    rows_per = max(1, min(n, _SEARCH_ROWS, _SEARCH_ELEMENTS // block))
    best_v = torch.empty(n, m, dtype=dtype, device=hidden.device)
    best_i = torch.empty(n, m, dtype=torch.long, device=hidden.device)
    for r0 in range(0, n, rows_per):
        h = hidden[r0:r0 + rows_per].to(dtype)
        run_v = run_i = None
        for v0 in range(0, vocab, block):
            scores = h @ weight[v0:v0 + block].to(dtype).T  # rows x block
            if bias is not None:
                scores += bias[v0:v0 + block].to(dtype)
            if m == 1:
                val, idx = scores.max(-1, keepdim=True)
            else:
                val, idx = scores.topk(min(m, scores.size(1)), -1)
            idx += v0
            if run_v is None:
                run_v, run_i = val, idx
            elif m == 1:
                better = val > run_v  # strictly: an earlier block keeps its token on a tie
                run_v, run_i = torch.where(better, val, run_v), torch.where(better, idx, run_i)
            else:
                run_v, pick = torch.cat([run_v, val], -1).topk(m, -1)
                run_i = torch.cat([run_i, idx], -1).gather(-1, pick)
        best_v[r0:r0 + rows_per], best_i[r0:r0 + rows_per] = run_v, run_i
    if m == 1:
        return best_i[:, 0]
    exact_scores = _columns_fp32(hidden, weight, bias, best_i)  # the candidates, in float32 as the columns are
    return best_i.gather(-1, exact_scores.argmax(-1, keepdim=True)).squeeze(-1)


def _run(head: HeadInput, index: torch.Tensor, argmax: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    module = head.module
    found: dict[str, torch.Tensor] = {}

    def columns(mod, args, output):  # before DeepSpeed's post-forward hook, which releases the parameters
        hidden = captured["hidden"]
        flat_h, flat_index = hidden.reshape(-1, hidden.size(-1)), index.reshape(-1, index.size(-1))
        bias = getattr(mod, "bias", None)
        if argmax:
            found["argmax"] = head_argmax(flat_h.detach(), mod.weight.detach(),
                                          None if bias is None else bias.detach())
            flat_index = torch.cat([flat_index, found["argmax"].unsqueeze(-1)], -1)
        out = _HeadColumns.apply(flat_h, mod.weight, bias, flat_index)
        return out.view(*index.shape[:-1], flat_index.size(-1))

    # The input cut is a pre-hook registered after DeepSpeed's own: parameters are gathered by then.
    handle = module.register_forward_hook(columns, prepend=True)
    try:
        with capture_input(module, keep=False) as captured:
            out = module(head.hidden)
    finally:
        handle.remove()
    return out, (found["argmax"].view(index.shape[:-1]) if argmax else None)


def head_columns(head: HeadInput, index: torch.Tensor) -> torch.Tensor:
    """The logits at ``index`` (B x T x K token ids) in float32, B x T x K: equal to
    ``logits.gather(-1, index)`` for a model whose logits are its output head applied to ``head.hidden``.

    Computed as a call of the head module itself, whose hooks swap its work for the gathered columns: the
    module's input is cut to zero positions (so it computes no logits) and its output replaced by the
    columns. Parameter-sharding hooks on the module (DeepSpeed ZeRO-3) therefore treat the computation as
    the module's own: the weight is gathered for its forward, gathered again before its backward, and its
    gradient is reduced like any module's."""
    return _run(head, index, argmax=False)[0]


def head_columns_and_argmax(head: HeadInput, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``head_columns`` of ``index`` plus one last column: the logit of each position's vocabulary argmax
    (B x T x (K + 1), float32, differentiable like the others), and that argmax (B x T token ids). The
    search (``head_argmax``) runs inside the same call of the head module, while ZeRO-3 has its weight
    gathered."""
    out, argmax = _run(head, index, argmax=True)
    return out, argmax
