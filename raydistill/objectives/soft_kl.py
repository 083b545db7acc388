"""tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau)) per position, fused and worked in row chunks.

``kd`` and ``iit`` compare two B x T x V logit tensors. Written as plain tensor operations, the KL makes
about ten full-size float32 temporaries in forward and backward (the scaled logits, both log-softmaxes, the
teacher's probabilities, their difference, the product, and the gradients of each), each a pass over memory
and, on the CPU, a fresh allocation whose pages are faulted in one by one. Here forward and backward each
walk the rows a chunk at a time, so temporaries are small and reused: forward keeps only the two inputs
(already alive) and the per-row KL; backward recomputes a chunk's log-softmaxes (cheap in cache) and writes
the logits' gradients directly.

Math, with a = z_T/tau, b = z_S/tau, p = softmax(a), q = softmax(b), kl = sum p (log p - log q):
  loss = tau^2 * kl;  d loss / d z_S = tau * (q - p);  d loss / d z_T = tau * p * (log p - log q - kl).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from raydistill.objectives.base import row_chunks

# Elements of one chunk's float32 temporaries. Small on the CPU so they stay in cache and come from the
# allocator's free lists instead of fresh pages; on accelerators larger, to keep kernels few and long.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_CHUNK_ELEMENTS = 1 << 26


def _chunks(logits: torch.Tensor) -> Iterator[slice]:
    budget = _CHUNK_ELEMENTS.get(logits.device.type, _DEFAULT_CHUNK_ELEMENTS)
    return row_chunks(logits.size(0), logits.size(1), budget)


def _math_dtype(*logits: torch.Tensor) -> torch.dtype:
    dtype = torch.float32  # or float64 when an input is
    for x in logits:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _log_probs(logits: torch.Tensor, rows: slice, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.log_softmax(logits[rows].to(dtype) / temperature, dim=-1)


class _SoftKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, teacher, student, temperature):  # N x V, N x V -> N
        dtype = _math_dtype(teacher, student)
        kl = torch.empty(teacher.size(0), dtype=dtype, device=teacher.device)
        for rows in _chunks(teacher):
            log_p = _log_probs(teacher, rows, temperature, dtype)
            log_q = _log_probs(student, rows, temperature, dtype)
            kl[rows] = (log_p.exp() * (log_p - log_q)).sum(-1)
        ctx.save_for_backward(teacher, student, kl)
        ctx.temperature = temperature
        return kl * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        teacher, student, kl = ctx.saved_tensors
        tau = ctx.temperature
        want_t, want_s = ctx.needs_input_grad[:2]
        grad_t = torch.empty_like(teacher) if want_t else None
        grad_s = torch.empty_like(student) if want_s else None
        for rows in _chunks(teacher):
            scale = tau * grad[rows, None]
            log_p = _log_probs(teacher, rows, tau, kl.dtype)
            log_q = _log_probs(student, rows, tau, kl.dtype)
            p = log_p.exp()
            if want_s:
                grad_s[rows] = scale * (log_q.exp() - p)
            if want_t:
                grad_t[rows] = scale * p * (log_p - log_q - kl[rows, None])
        return grad_t, grad_s, None


def soft_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau)), shape ``[...]`` for logits
    ``[..., V]``, in float32 (float64 for float64 logits) whatever the logits' dtype."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"soft_kl: teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ in shape")
    vocab = teacher_logits.size(-1)
    kl = _SoftKL.apply(teacher_logits.reshape(-1, vocab), student_logits.reshape(-1, vocab), float(temperature))
    return kl.view(teacher_logits.shape[:-1])
