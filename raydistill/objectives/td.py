"""``td``: temporal-difference distillation over a reduced action space (inverse soft-Q learning with the
student's logits as Q), following the equations of docs/ALGORITHMS.md section 3, not the released code.

Decoders only. The MDP: state s_t = the tokens up to position t, action = the next token, deterministic
transitions. Expert transitions come from the labels (aligned with the logits): a labelled position t
(labels[t] != -100) is a state s_t with expert action a_t = labels[t]; its next state s_{t+1} is position
t+1 when that is labelled too, else terminal (V = 0). So the last labelled token of every sequence or
response is terminal (also where a block of corpus text merely ends), and prompt and padding positions
contribute nothing.

With A'(s) the action set (``action_space``: the teacher's top-k or nucleus, plus the expert token under
``expert: include``):

    Q(s, a)  = clip(z_S(s, a)/tau - max_{a' in A'(s)} z_S(s, a')/tau, q_min)   for a in A'(s), -inf outside
    V(s)     = logsumexp_{a in A'(s)} Q(s, a)          (the soft value of the projected policy softmax_A'(Q))
    x_t      = Q(s_t, a_t) - gamma V(s_{t+1})
    L        = -mean_t phi(x_t) + mean_t [V(s_t) - gamma V(s_{t+1})],   phi(x) = x - x^2 / (4 alpha)

(phi(x) = x when alpha is null), means over labelled positions. The sanity property holds: with gamma = 0,
no alpha, no clipping and A(s) = V, L is the student's cross-entropy on the expert tokens.

Choices the equations leave open:

- The shift subtracts the maximum over A'(s), not over the vocabulary: softmax and logsumexp do not
  depend on it, and the objective never reads B x T x V beyond one gather of K columns. The shift is part
  of Q (not detached), as written. With clipping, a token's Q differs from the vocabulary-max version only
  in where the floor q_min sits relative to the set's best token.
- ``expert: include`` (default): A'(s) = A(s) u {a_t}, so every state's expert is in its own set and V(s)
  is the same whether s is the current or the next state. ``expert: skip``: A'(s) = A(s); positions whose
  expert lies outside A(s) have no finite Q(s_t, a_t), so their phi term is dropped (the phi mean runs over
  the positions kept) while their V(s_t) - gamma V(s_{t+1}) term stays (it does not involve the action),
  and they stay a non-terminal next state for the previous position: the state exists, only its expert
  action is outside the set.
- Memory: the teacher's top-k ids are found under no_grad, and the student's K + 1 columns (the set plus
  the expert column) are computed once, in fp32; everything after is B x T x K. With ``fused_head`` (the
  default) they come straight from the student's final hidden state and output head
  (``objectives.head_columns``): the student never computes its B x T x V logits, and no vocabulary-sized
  tensor exists but the head's own V x H gradient. With ``fused_head: false`` they are gathered from the
  full logits, whose B x T x V gradient (in their dtype: the gather's backward is ``_GatherColumns``, see
  there) is then the one vocabulary-sized tensor the objective adds. ``chunk_size``
  computes the action sets that many positions at a time (the teacher-side topk / nucleus softmax), with
  an identical result.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from raydistill.errors import ConfigError
from raydistill.objectives import register
from raydistill.objectives.action_space import ActionSpaceSettings, action_space, add_expert
from raydistill.objectives.base import ModelInfo, Needs, Objective, ObjectiveSettings, Step, masked_mean
from raydistill.objectives.head_columns import head_columns


class _GatherColumns(torch.autograd.Function):
    """``logits.gather(-1, index)`` whose backward accumulates with ``index_put_``. Autograd's own gather
    backward uses ``scatter_add_``, which on CPU works through a float32 copy of the whole B x T x V gradient
    when the logits are bf16/fp16 (3x the gradient's memory); ``index_put_`` writes into the gradient alone
    (and is deterministic on CUDA, where scatter_add_ uses atomics)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.logits_shape = logits.shape
        return logits.gather(-1, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.logits_shape)
        rows = torch.arange(index[..., 0].numel(), device=index.device).unsqueeze(-1).expand(-1, index.size(-1))
        out.view(-1, out.size(-1)).index_put_((rows, index.reshape(rows.shape)), grad.reshape(rows.shape),
                                               accumulate=True)
        return out, None


class TDSettings(ObjectiveSettings):
    action_space: ActionSpaceSettings = Field(default_factory=ActionSpaceSettings,
                                              description="the reduced action set A(s) from the teacher's distribution")
    gamma: float = Field(0.99, ge=0, le=1, description="discount of the next state's value")
    alpha: float | None = Field(0.1, gt=0, description="chi^2 regulariser phi(x) = x - x^2/(4 alpha); null: off")
    temperature: float = Field(1.0, gt=0, description="tau in Q = z_S/tau (shifted and clipped)")
    q_min: float | None = Field(-10.0, lt=0, description="lower clip of Q (Q <= 0 after the shift); null: no clip")
    expert: Literal["include", "skip"] = Field(
        "include", description="expert token outside A(s): include adds it to the set (A(s) u {a_t}); skip drops "
        "that position's Q(s_t, a_t) term and keeps V over A(s)")
    fused_head: bool = Field(True, description="compute only the K gathered logits from the student's final "
                             "hidden state and output head, so no B x T x V logits or gradient exist; false: gather "
                             "from the full logits (needed where the model transforms logits after its head)")
    chunk_size: int | None = Field(None, ge=1, description="positions per chunk when choosing the action sets "
                                   "(bounds the teacher-side B x chunk x V work on long sequences); null: all")


@register
class TDLoss(Objective):
    name = "td"
    Settings = TDSettings

    def __init__(self, settings: TDSettings, info: ModelInfo):
        super().__init__(settings, info)
        if info.is_encoder:
            raise ConfigError("objectives.td: temporal-difference distillation needs a decoder (next-token "
                              "transitions); the models are encoders. Use kd or cosine, or a decoder teacher")
        if settings.fused_head and info.student_logit_transform:
            raise ConfigError(f"objectives.td.fused_head: the student transforms its logits after the output head "
                              f"(config field {info.student_logit_transform}), so they cannot be computed from the "
                              "head's input; set objectives.td.fused_head=false")

    def needs(self) -> Needs:
        fused = self.settings.fused_head
        return Needs(teacher_logits=True, student_logits=not fused, student_head=fused)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        s = self.settings
        labels = step.batch["labels"]
        actions, in_set = add_expert(action_space(step.teacher.logits, s.action_space, s.chunk_size), labels,
                                     include=s.expert == "include")
        if s.fused_head:
            z = head_columns(step.student.head, actions.index) / s.temperature
        else:
            z = _GatherColumns.apply(step.student.logits, actions.index).float() / s.temperature
        q = z - z.masked_fill(~actions.valid, float("-inf")).amax(-1, keepdim=True)
        if s.q_min is not None:
            q = q.clamp_min(s.q_min)
        value = q.masked_fill(~actions.valid, float("-inf")).logsumexp(-1)  # V(s_t), B x T
        q_expert = q[..., -1]  # the expert column: Q(s_t, a_t), whether or not it is a duplicate of A(s)

        labelled = labels != -100
        has_next = torch.zeros_like(labelled)
        has_next[:, :-1] = labelled[:, 1:]
        next_value = torch.cat([value[:, 1:], value.new_zeros(value.size(0), 1)], 1)
        target = s.gamma * torch.where(has_next, next_value, 0.0)  # gamma V(s_{t+1}); 0 when terminal

        kept = labelled if s.expert == "include" else labelled & in_set
        x = q_expert - target
        chi2 = x.square() / (4 * s.alpha) if s.alpha is not None else torch.zeros_like(x)
        loss = -masked_mean(x - chi2, kept) + masked_mean(value - target, labelled)
        return {self.name: loss,
                f"{self.name}/q_expert": masked_mean(q_expert, kept).detach(),
                f"{self.name}/value": masked_mean(value, labelled).detach(),
                f"{self.name}/chi2": masked_mean(chi2, kept).detach(),
                f"{self.name}/action_set_size": masked_mean(actions.valid[..., :-1].sum(-1).float(), labelled),
                f"{self.name}/expert_in_set": masked_mean(in_set.float(), labelled)}
