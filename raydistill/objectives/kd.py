"""``kd``: soft-target distillation, tau^2 * KL(teacher_tau || student_tau) per position.

``top_k: null`` (the default) compares the full-vocabulary distributions online (``soft_kl``). ``top_k: K`` is
sparse KD: it reads only the teacher's K most probable tokens and their log-probabilities at temperature 1
(``Step.teacher_topk``, computed online or read from the teacher cache) and compares K + 1 buckets, the top-K
tokens and one "rest" bucket holding every other token (``sparse_kl``; equations and measured error against
full KD in docs/objectives.md). The rest bucket hides the shape of the teacher's tail from the student, so
top-K KD is biased; ``tail_samples: S`` replaces the bucket by S tokens drawn from the teacher's tail
(``Step.tail``, drawn at the kd temperature), an unbiased estimate of full KD (``sampled_kl``)."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from raydistill.errors import ConfigError
from raydistill.objectives import register
from raydistill.objectives.base import ModelInfo, Needs, Objective, ObjectiveSettings, Step, TeacherTail, TeacherTopK
from raydistill.objectives.soft_kl import soft_kl


def sparse_kl(topk: TeacherTopK, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position tau^2 KL(P || Q) over K + 1 buckets (B x T, float32; float64 for float64 logits).

    With l_i the teacher's log-probabilities at temperature 1 of its top-K tokens, r = 1 - sum_i exp(l_i) the mass
    of the other V - K tokens (clamped at 0), the teacher's buckets are

        P = softmax([l_1/tau, ..., l_K/tau, log(r)/tau + (1 - 1/tau) log(V - K)]):

    the top-K tokens tempered exactly, and the rest tempered as if its mass were spread evenly over its V - K
    tokens, (V - K) (r / (V - K))^(1/tau) (the maximum-entropy guess given r alone; exact for a flat tail, an
    upper bound on the true tempered weight sum_rest p_j^(1/tau) for tau > 1). The student's buckets Q are exact
    sums of its full softmax(z_S/tau): its probabilities at the teacher's ids and the sum over all other tokens
    (a logsumexp outside the ids, no cancellation). At tau = 1 both bucketings are exact coarse-grainings, so the
    value is <= the full KL (data-processing inequality) and rises to it as K grows; at tau != 1 the teacher's
    rest bucket is an estimate. Where the ids cover the whole vocabulary there is no rest bucket and the value
    is full KD's."""
    tau = temperature
    dtype = torch.promote_types(torch.float32, student_logits.dtype)  # float64 stays float64 (gradcheck)
    log_q = torch.log_softmax(student_logits.to(dtype) / tau, dim=-1)
    q_top = log_q.gather(-1, topk.ids)
    teacher = topk.logprobs.to(dtype) / tau
    if topk.ids.size(-1) < student_logits.size(-1):
        q_rest = log_q.scatter(-1, topk.ids, float("-inf")).logsumexp(-1, keepdim=True)
        rest = (1.0 - topk.logprobs.to(dtype).exp().sum(-1, keepdim=True)).clamp_min(0.0)
        others = student_logits.size(-1) - topk.ids.size(-1)
        log_rest = rest.log() / tau + math.log(others) * (1 - 1 / tau)
        teacher, log_qb = torch.cat([teacher, log_rest], -1), torch.cat([q_top, q_rest], -1)
    else:
        log_qb = q_top
    log_p = torch.log_softmax(teacher, dim=-1)
    p = log_p.exp()
    # Buckets the teacher gives no mass (an empty rest) contribute 0, not 0 * -inf.
    kl = torch.where(p > 0, p * (log_p - log_qb), 0.0).sum(-1)
    return kl * tau**2


def sampled_kl(topk: TeacherTopK, tail: TeacherTail, student_logits: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """Per-position tau^2 KL(P || Q) estimated from the teacher's top K exactly and S samples j_1..j_S of its tail
    drawn at ``temperature`` (B x T; float32, float64 for float64 logits).

    With l the teacher's log-probabilities (temperature 1), W = sum_tail p_j^(1/tau) the tail's tempered mass
    (``tail.log_mass``) and the samples drawn with probability p_j^(1/tau) / W (``teacher_signals.sample_tail``),
    the tempered teacher is exact on the top K, P_i = p_i^(1/tau) / Z with Z = sum_top p_i^(1/tau) + W, and
    its tail is represented by the draws, each of weight (W / Z) / S:

        kd = tau^2 [ sum_top P_i (l_i/tau - log Z - log q_i) + (W / Z) / S sum_s (l_{j_s}/tau - log Z - log q_{j_s}) ]

    with q = softmax(z / tau) the student's full tempered distribution. E over the draws of the sample sum is the
    tail's part of full KD, so the value and its gradient w.r.t. the student's logits (tau (q - P_hat), P_hat
    exact on the top K plus (W / Z) / S per draw) are unbiased estimates of full KD's, at any temperature. Where
    the top K is the whole vocabulary the samples are ignored and the value is full KD's."""
    tau = temperature
    vocab = student_logits.size(-1)
    if topk.ids.size(-1) >= vocab or tail.ids.size(-1) == 0:
        return sparse_kl(topk, student_logits, tau)
    dtype = torch.promote_types(torch.float32, student_logits.dtype)  # float64 stays float64 (gradcheck)
    log_q = torch.log_softmax(student_logits.to(dtype) / tau, dim=-1)
    top, sampled = topk.logprobs.to(dtype) / tau, tail.logprobs.to(dtype) / tau
    log_mass = tail.log_mass.to(dtype).unsqueeze(-1)
    log_z = torch.cat([top, log_mass], -1).logsumexp(-1, keepdim=True)
    w = torch.cat([top, (log_mass - math.log(tail.ids.size(-1))).expand_as(sampled)], -1) - log_z
    w = w.exp()
    log_p = torch.cat([top, sampled], -1) - log_z
    log_qa = log_q.gather(-1, torch.cat([topk.ids, tail.ids], -1))
    # Atoms of weight 0 (an empty tail) contribute 0, not 0 * -inf.
    return torch.where(w > 0, w * (log_p - log_qa), 0.0).sum(-1) * tau**2


class KDSettings(ObjectiveSettings):
    temperature: float = Field(2.0, gt=0, description="softening temperature tau (2 in DistilBERT)")
    masked_only: bool = Field(False, description="only positions with a task label (MLM-masked tokens)")
    top_k: int | None = Field(None, ge=1, description="sparse KD over the teacher's top-K tokens plus one bucket "
                              "for the rest (readable from the teacher cache); null: full-vocabulary KD online")
    tail_samples: int = Field(0, ge=0, le=4096, description="with top_k: S tokens per position drawn from the "
                              "teacher's tempered distribution outside its top K replace the rest bucket (an "
                              "unbiased estimate of full KD); 0: the rest bucket")

    @model_validator(mode="after")
    def _tail_needs_top_k(self):
        if self.tail_samples and self.top_k is None:
            raise ValueError(f"objectives.kd.tail_samples: {self.tail_samples} samples the teacher's tail outside its "
                             "top K, but top_k is null (full-vocabulary KD); allowed: 0, or set objectives.kd.top_k")
        return self


@register
class KDLoss(Objective):
    name = "kd"
    Settings = KDSettings

    def __init__(self, settings: KDSettings, info: ModelInfo):
        super().__init__(settings, info)
        if settings.top_k is not None and settings.top_k > info.vocab_size:
            raise ConfigError(f"objectives.kd.top_k: {settings.top_k} exceeds the vocabulary ({info.vocab_size} "
                              f"tokens); allowed: 1 to {info.vocab_size}, or null for full-vocabulary KD")

    def needs(self) -> Needs:
        s = self.settings
        if s.top_k is not None:
            tail = (s.top_k, s.tail_samples, s.temperature) if s.tail_samples else Needs().teacher_tail
            return Needs(teacher_topk=s.top_k, teacher_tail=tail, student_logits=True)
        return Needs(teacher_logits=True, student_logits=True)

    def positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].bool()
        return mask & (batch["labels"] != -100) if self.settings.masked_only else mask

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        s = self.settings
        if s.top_k is not None and s.tail_samples:
            tail = step.tail(s.top_k, s.tail_samples, s.temperature)
            kl = sampled_kl(step.topk(s.top_k), tail, step.student.logits, s.temperature)
        elif s.top_k is not None:
            kl = sparse_kl(step.topk(s.top_k), step.student.logits, s.temperature)
        else:
            kl = soft_kl(step.teacher.logits, step.student.logits, s.temperature)
        return {self.name: self.mean(step, kl)}
