"""Divergences between the teacher's and the student's softened next-token distributions, per position, fused
and worked in row chunks like ``soft_kl`` (whose helpers they share): forward walks the rows a chunk at a time
and keeps only the inputs and the per-row values; backward recomputes a chunk's log-softmaxes and writes the
logits' gradients directly, so no temporary is vocabulary-sized over the whole batch. Math runs in float32
(float64 for float64 logits, for gradcheck) whatever the logits' dtype; gradients come back in the logits'
dtype, and only for the inputs that need them (the teacher's logits usually come from a no_grad forward).

With a = z_T/tau, b = z_S/tau, p = softmax(a) (teacher), q = softmax(b) (student), and per position:
  forward KL  tau^2 KL(p || q)                                   ``soft_kl`` (objective ``kd``)
  reverse KL  tau^2 KL(q || p)                                   ``reverse_kl``: ``soft_kl`` with the roles swapped
  JSD_beta    tau^2 [beta KL(p || m) + (1-beta) KL(q || m)],  m = beta p + (1-beta) q;
              beta = 0: tau^2 KL(p || q), beta = 1: tau^2 KL(q || p)  (TRL's GKD convention; see ``generalized_jsd``)
  SKL_lam     tau^2 KL(p || lam p + (1-lam) q)                   (DistiLLM's skew KL)
  SRKL_lam    tau^2 KL(q || lam q + (1-lam) p)                   (DistiLLM's skew reverse KL)
  TVD         1/2 sum |p - q|                                    (no tau^2: a distance in [0, 1])
The KL family carries kd's tau^2 (Hinton et al.): each is locally quadratic in the logit gap / tau, so tau^2 keeps
the gradients' scale independent of tau, and the endpoints (JSD beta 0 / 1, skew 0) equal kd / reverse_kl exactly
at any tau. TRL's and DistiLLM's losses have no tau^2; at the default tau = 1 they agree. TVD is locally linear,
not quadratic, so tau^2 would not fit it; it gets no factor and stays in [0, 1].

Gradients, with the softmax Jacobian d/da_i f(p) = p_i (g_i - sum_j p_j g_j) for g = df/dp, and d/dz = 1/tau d/da:
  JSD_beta:  dJ/db = (1-beta) q (log q - log m - KL(q || m)),  dJ/da = beta p (log p - log m - KL(p || m)).
  KL(x || m), m = lam x + (1-lam) y, x = softmax(a), y = softmax(b); with the responsibilities
  r_x = lam x / m and r_y = (1-lam) y / m (r_x + r_y = 1):
             dS/db = -(x r_y - y sum x r_y),  dS/da = x (h - sum x h),  h = log x - log m - r_x.
  TVD, s = sign(p - q):  dT/da = 1/2 p (s - sum p s),  dT/db = -1/2 q (s - sum q s).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from pydantic import Field
from torch.autograd.function import once_differentiable

from raydistill.objectives.base import Needs, Objective, ObjectiveSettings, Step
from raydistill.objectives.soft_kl import _chunks, _log_probs, _math_dtype, soft_kl


def _centered(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weights * (values - sum(weights * values))`` per row: the softmax Jacobian applied to ``values``."""
    return weights * (values - (weights * values).sum(-1, keepdim=True))


class _JSD(torch.autograd.Function):
    """tau^2 [beta KL(p || m) + (1-beta) KL(q || m)], m = beta p + (1-beta) q, for 0 < beta < 1."""

    @staticmethod
    def forward(ctx, teacher, student, temperature, beta):  # N x V, N x V -> N
        dtype = _math_dtype(teacher, student)
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        out = torch.empty(teacher.size(0), dtype=dtype, device=teacher.device)
        for rows in _chunks(teacher):
            log_p = _log_probs(teacher, rows, temperature, dtype)
            log_q = _log_probs(student, rows, temperature, dtype)
            log_m = torch.logaddexp(log_p + log_b, log_q + log_1mb)
            kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
            kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
            out[rows] = beta * kl_pm + (1 - beta) * kl_qm
        ctx.save_for_backward(teacher, student)
        ctx.temperature, ctx.beta, ctx.dtype = temperature, beta, dtype
        return out * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        teacher, student = ctx.saved_tensors
        tau, beta = ctx.temperature, ctx.beta
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        want_t, want_s = ctx.needs_input_grad[:2]
        grad_t = torch.empty_like(teacher) if want_t else None
        grad_s = torch.empty_like(student) if want_s else None
        for rows in _chunks(teacher):
            scale = tau * grad[rows, None]
            log_p = _log_probs(teacher, rows, tau, ctx.dtype)
            log_q = _log_probs(student, rows, tau, ctx.dtype)
            log_m = torch.logaddexp(log_p + log_b, log_q + log_1mb)
            if want_t:
                grad_t[rows] = (beta * scale) * _centered(log_p.exp(), log_p - log_m)
            if want_s:
                grad_s[rows] = ((1 - beta) * scale) * _centered(log_q.exp(), log_q - log_m)
        return grad_t, grad_s, None, None


class _SkewKL(torch.autograd.Function):
    """tau^2 KL(x || lam x + (1-lam) y) for 0 < lam < 1, x = softmax(first / tau), y = softmax(second / tau)."""

    @staticmethod
    def forward(ctx, first, second, temperature, lam):  # N x V, N x V -> N
        dtype = _math_dtype(first, second)
        log_l, log_1ml = math.log(lam), math.log1p(-lam)
        out = torch.empty(first.size(0), dtype=dtype, device=first.device)
        for rows in _chunks(first):
            log_x = _log_probs(first, rows, temperature, dtype)
            log_y = _log_probs(second, rows, temperature, dtype)
            log_m = torch.logaddexp(log_x + log_l, log_y + log_1ml)
            out[rows] = (log_x.exp() * (log_x - log_m)).sum(-1)
        ctx.save_for_backward(first, second)
        ctx.temperature, ctx.lam, ctx.dtype = temperature, lam, dtype
        return out * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        first, second = ctx.saved_tensors
        tau, lam = ctx.temperature, ctx.lam
        log_l, log_1ml = math.log(lam), math.log1p(-lam)
        want_x, want_y = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(first) if want_x else None
        grad_y = torch.empty_like(second) if want_y else None
        for rows in _chunks(first):
            scale = tau * grad[rows, None]
            log_x = _log_probs(first, rows, tau, ctx.dtype)
            log_y = _log_probs(second, rows, tau, ctx.dtype)
            log_m = torch.logaddexp(log_x + log_l, log_y + log_1ml)
            x = log_x.exp()
            if want_x:  # h = log x - log m - r_x
                h = log_x - log_m - (log_x - log_m + log_l).exp()
                grad_x[rows] = scale * _centered(x, h)
            if want_y:  # -(x r_y - y sum x r_y)
                x_ry = x * (log_y - log_m + log_1ml).exp()
                grad_y[rows] = scale * (log_y.exp() * x_ry.sum(-1, keepdim=True) - x_ry)
        return grad_x, grad_y, None, None


class _TVD(torch.autograd.Function):
    """1/2 sum |p - q| (no temperature factor)."""

    @staticmethod
    def forward(ctx, teacher, student, temperature):  # N x V, N x V -> N
        dtype = _math_dtype(teacher, student)
        out = torch.empty(teacher.size(0), dtype=dtype, device=teacher.device)
        for rows in _chunks(teacher):
            p = _log_probs(teacher, rows, temperature, dtype).exp()
            q = _log_probs(student, rows, temperature, dtype).exp()
            out[rows] = 0.5 * (p - q).abs().sum(-1)
        ctx.save_for_backward(teacher, student)
        ctx.temperature, ctx.dtype = temperature, dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        teacher, student = ctx.saved_tensors
        tau = ctx.temperature
        want_t, want_s = ctx.needs_input_grad[:2]
        grad_t = torch.empty_like(teacher) if want_t else None
        grad_s = torch.empty_like(student) if want_s else None
        for rows in _chunks(teacher):
            scale = (0.5 / tau) * grad[rows, None]
            p = _log_probs(teacher, rows, tau, ctx.dtype).exp()
            q = _log_probs(student, rows, tau, ctx.dtype).exp()
            sign = torch.sign(p - q)
            if want_t:
                grad_t[rows] = scale * _centered(p, sign)
            if want_s:
                grad_s[rows] = -scale * _centered(q, sign)
        return grad_t, grad_s, None


class _Zero(torch.autograd.Function):
    """Zero per row, zero gradients: a divergence from a distribution to itself (skew 1)."""

    @staticmethod
    def forward(ctx, first, second):  # N x V, N x V -> N
        ctx.shapes, ctx.dtypes = (first.shape, second.shape), (first.dtype, second.dtype)
        return torch.zeros(first.size(0), dtype=_math_dtype(first, second), device=first.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        want = ctx.needs_input_grad[:2]
        return tuple(torch.zeros(shape, dtype=dtype, device=grad.device) if w else None
                     for shape, dtype, w in zip(ctx.shapes, ctx.dtypes, want))


def _apply(name: str, fn, teacher: torch.Tensor, student: torch.Tensor, *args) -> torch.Tensor:
    """``fn(teacher rows, student rows, *args)`` over logits ``[..., V]`` flattened to rows, viewed as ``[...]``."""
    if teacher.shape != student.shape:
        raise ValueError(f"{name}: teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} "
                         f"differ in shape")
    vocab = teacher.size(-1)
    out = fn(teacher.reshape(-1, vocab), student.reshape(-1, vocab), *args)
    return out.view(teacher.shape[:-1])


def _check_unit(name: str, setting: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {setting} {value} is outside [0, 1]")
    return value


def reverse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position tau^2 * KL(q || p), q = softmax(z_S/tau), p = softmax(z_T/tau): ``soft_kl``'s kernel with the
    two distributions' roles swapped."""
    return _apply("reverse_kl", lambda t, s: soft_kl(s, t, temperature), teacher_logits, student_logits)


def generalized_jsd(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
                    beta: float) -> torch.Tensor:
    """Per-position tau^2 * JSD_beta(p, q) in TRL's GKD convention (``GKDTrainer.generalized_jsd_loss``): for
    0 < beta < 1, beta KL(p || m) + (1-beta) KL(q || m) with m = beta p + (1-beta) q; at the endpoints, where that
    formula is 0, the KLs it approaches once divided by beta (resp. 1-beta): beta = 0 is the forward KL(p || q),
    beta = 1 the reverse KL(q || p). The value is therefore discontinuous at both ends (JSD_beta ~ beta KL(p || q)
    as beta -> 0 and ~ (1-beta) KL(q || p) as beta -> 1), as in TRL."""
    beta = _check_unit("jsd", "beta", beta)
    if beta == 0.0:
        return _apply("jsd", lambda t, s: soft_kl(t, s, temperature), teacher_logits, student_logits)
    if beta == 1.0:
        return _apply("jsd", lambda t, s: soft_kl(s, t, temperature), teacher_logits, student_logits)
    return _apply("jsd", _JSD.apply, teacher_logits, student_logits, float(temperature), beta)


def _skew(first: torch.Tensor, second: torch.Tensor, temperature: float, lam: float) -> torch.Tensor:
    """tau^2 KL(x || lam x + (1-lam) y) with x, y the softened distributions of ``first``, ``second`` (rows)."""
    if lam == 0.0:
        return soft_kl(first, second, temperature)
    if lam == 1.0:
        return _Zero.apply(first, second)
    return _SkewKL.apply(first, second, float(temperature), lam)


def skew_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
            skew: float) -> torch.Tensor:
    """Per-position tau^2 * KL(p || skew p + (1-skew) q) (DistiLLM's SKL); skew 0 is ``soft_kl``, skew 1 is 0."""
    skew = _check_unit("skew_kl", "skew", skew)
    return _apply("skew_kl", lambda t, s: _skew(t, s, temperature, skew), teacher_logits, student_logits)


def skew_reverse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
                    skew: float) -> torch.Tensor:
    """Per-position tau^2 * KL(q || skew q + (1-skew) p) (DistiLLM's SRKL); skew 0 is ``reverse_kl``, skew 1 is 0."""
    skew = _check_unit("skew_reverse_kl", "skew", skew)
    return _apply("skew_reverse_kl", lambda t, s: _skew(s, t, temperature, skew), teacher_logits,
                  student_logits)


def total_variation(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position total variation distance 1/2 sum |p - q| (in [0, 1]; no tau^2 factor)."""
    return _apply("tvd", _TVD.apply, teacher_logits, student_logits, float(temperature))


# ------------------------------------------------------------------------------------------------- objectives
class DivergenceSettings(ObjectiveSettings):
    temperature: float = Field(1.0, gt=0, description="softening temperature tau of both distributions")
    masked_only: bool = Field(False, description="only positions with a task label (MLM-masked tokens, responses)")


class DivergenceObjective(Objective):
    """A per-position divergence between the teacher's and the student's softened distributions, averaged over
    the non-padding positions (the labelled ones with ``masked_only``). Subclasses set ``name``, ``Settings`` and
    implement ``divergence``."""

    Settings = DivergenceSettings

    def needs(self) -> Needs:
        return Needs(teacher_logits=True, student_logits=True)

    def positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].bool()
        if self.settings.masked_only:
            mask = mask & (batch["labels"] != -100)
        return mask

    @abstractmethod
    def divergence(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """B x T values from B x T x V logits."""

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        return {self.name: self.mean(step, self.divergence(step.teacher.logits, step.student.logits))}
