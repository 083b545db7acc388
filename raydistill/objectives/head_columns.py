"""Chosen columns of the student's logits, computed from its output head's input:
z[n, j] = h[n] . W[index[n, j]] (+ b[index[n, j]]), without the B x T x V logits or their gradient.

An objective that reads only K columns per position (``td``) would otherwise pay for the whole vocabulary
twice: the model's projection to B x T x V logits and, in backward, their B x T x V gradient. Here the
forward keeps only h and the index; the backward gives h its gradient and accumulates the head's over the
distinct tokens present (U x H, float32) before writing them once into a V x H gradient in the weight's
dtype (so a token chosen at many positions is not summed in bf16). Both passes work a bounded number of
positions at a time, so the gathered head rows (positions x K x H) stay under ``_CHUNK_ELEMENTS``.

ZeRO-3 partitions the head's weight outside its module's forward, so the computation runs as a call of the
head module (see ``head_columns``) and DeepSpeed's module hooks gather, release and reduce the weight.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from raydistill.models.adapters import capture_input
from raydistill.objectives.base import HeadInput, row_chunks

_CHUNK_ELEMENTS = 1 << 24  # gathered head rows per chunk: 64 MiB in float32


def _chunks(rows: int, per_row: int) -> Iterator[slice]:
    return row_chunks(rows, per_row, _CHUNK_ELEMENTS)


class _HeadColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, index):  # N x H, V x H, V or None, N x K -> N x K float32
        ctx.save_for_backward(hidden, index)
        ctx.weight, ctx.bias = weight, bias  # parameters: ZeRO-3 gathers them again before this backward runs
        out = torch.empty(index.shape, dtype=torch.float32, device=hidden.device)
        for rows in _chunks(index.size(0), index.size(1) * hidden.size(1)):
            rows_w = weight[index[rows]].float()  # c x K x H
            out[rows] = torch.bmm(rows_w, hidden[rows].float().unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            out += bias[index].float()
        return out

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


def head_columns(head: HeadInput, index: torch.Tensor) -> torch.Tensor:
    """The logits at ``index`` (B x T x K token ids) in float32, B x T x K: equal to
    ``logits.gather(-1, index)`` for a model whose logits are its output head applied to ``head.hidden``.

    Computed as a call of the head module itself, whose hooks swap its work for the gathered columns: the
    module's input is cut to zero positions (so it computes no logits) and its output replaced by the
    columns. Parameter-sharding hooks on the module (DeepSpeed ZeRO-3) therefore treat the computation as
    the module's own: the weight is gathered for its forward, gathered again before its backward, and its
    gradient is reduced like any module's."""
    module = head.module

    def columns(mod, args, output):  # before DeepSpeed's post-forward hook, which releases the parameters
        hidden = captured["hidden"]
        out = _HeadColumns.apply(hidden.reshape(-1, hidden.size(-1)), mod.weight, getattr(mod, "bias", None),
                                 index.reshape(-1, index.size(-1)))
        return out.view(index.shape)

    # The input cut is a pre-hook registered after DeepSpeed's own: parameters are gathered by then.
    handle = module.register_forward_hook(columns, prepend=True)
    try:
        with capture_input(module, keep=False) as captured:
            return module(head.hidden)
    finally:
        handle.remove()
