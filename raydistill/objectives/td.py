"""``td``: temporal-difference distillation over a reduced action space (inverse soft-Q learning with the
student's logits as Q), following the paper's equations (docs/objectives.md), not its released code.

Decoders only. The MDP: state s_t = the tokens up to position t, action = the next token, deterministic
transitions. Expert transitions come from the labels (aligned with the logits): a labelled position t
(labels[t] != -100) is a state s_t with expert action a_t = labels[t]; its next state s_{t+1} is position
t+1 when that is labelled too, else terminal (V = 0). So the last labelled token of every sequence or
response is terminal (also where a block of corpus text merely ends), and prompt and padding positions
contribute nothing.

With z the student's logits, A(s) the action set (``action_space``: the teacher's top-k or nucleus) and
A'(s) = A(s) u {a_t} under ``expert: include``, A(s) under ``expert: skip``:

    Q(s, a)  = clip(z(s, a)/tau - max_{a' in V} z(s, a')/tau, q_min)   for a in A'(s), -inf outside
    V(s)     = logsumexp_{a in A'(s)} Q(s, a)          (the soft value of the projected policy softmax_A'(Q))
    x_t      = Q(s_t, a_t) - gamma V(s_{t+1})          (V(s_{t+1}) = 0 when s_{t+1} is terminal)
    L        = [ sum_{t kept} -phi(x_t) + V(s_t) - gamma V(s_{t+1}) ] / N,   phi(x) = x - x^2 / (4 alpha)

(phi(x) = x when alpha is null). The maximum in Q runs over the whole vocabulary V and is taken before
the restriction to A'(s) (``shift: vocab``, the default, as in the paper); it is part of Q, not detached,
so the student's largest logit gets a gradient too, wherever it is. N is the number of labelled positions
(``positions``), counted over the whole optimiser step (``Objective.mean``); the kept transitions are all
labelled positions under ``include`` and those whose expert lies in A(s) under ``skip``. The sanity
property holds: with gamma = 0, no alpha, no clipping and A(s) = V, L is the student's cross-entropy on the
expert tokens.

Settings and choices the equations leave open:

- ``shift: action_set`` subtracts max_{a' in A'(s)} z(s, a')/tau instead: a deviation from the paper. The
  softmax over A'(s) and V - Q do not depend on the shift, so without clipping and without the chi^2 term
  the loss is the same; with either active, loss and gradient differ (Q(s_t, a_t) is measured from the
  set's best token rather than the vocabulary's, which moves both phi's argument and where the floor q_min
  cuts). It never pushes down a student token outside A(s): with ``shift: vocab`` the vocabulary argmax,
  when outside A'(s), gets the negated sum of the set's Q gradients, which lowers it whenever the loss
  wants the set's Q values up. That is the paper's mechanism against tokens the teacher never proposes.
- ``expert: include`` (default): A'(s) = A(s) u {a_t}, so every state's expert is in its own set and V(s)
  is the same whether s is the current or the next state. ``expert: skip``: A'(s) = A(s); a labelled
  position whose expert lies outside A(s) has Q(s_t, a_t) = -inf, so its whole transition is dropped:
  it contributes nothing to either term (neither phi(x_t) nor V(s_t) - gamma V(s_{t+1})). It still counts
  in N (a skipped transition counts as zero), since which transitions are kept is known only after the
  teacher's forward while N has to be known before the step (split invariance). Its state s_t still
  exists, though: it remains the (non-terminal) next state of the previous transition, whose target keeps
  gamma V(s_t) with V(s_t) over A(s_t). Only the expert's action left the set, not the state; treating
  it as terminal would instead tell the previous transition that the episode ended there.
- Memory: the teacher's top-k ids are found under no_grad, and the student's columns (the set, the
  expert, and with ``shift: vocab`` the vocabulary argmax found under no_grad) are computed once, in
  float32; everything after is B x T x K. With ``fused_head`` (the default) they come straight from the
  student's final hidden state and output head (``objectives.head_columns``; the argmax by a blocked
  search over the head's weight inside the same hooked call of the head module, so ZeRO-3 has it
  gathered): the student never computes its B x T x V logits, and no vocabulary-sized tensor exists but
  the head's own V x H gradient. With ``fused_head: false`` they are gathered from the full logits (the
  argmax being theirs), whose B x T x V gradient (in their dtype: the gather's backward is
  ``_GatherColumns``, see there) is then the one vocabulary-sized tensor the objective adds. Either way
  a token present in several columns of a position (the expert column duplicates a set column under
  ``include`` wherever the expert is in A(s); the argmax column usually duplicates one) gets the sum of
  their gradients in float32, rounded to the logits' or hidden state's dtype once. The action
  sets come from the teacher's top-K signals (``Step.teacher_topk``, ``needs`` asks for k or max_k
  columns): computed online by the training step from the teacher's logits a bounded number of
  positions at a time (``objectives.teacher_signals``), or read from the teacher cache, with the same
  sets (``objectives.action_space``). On a step that carries only the teacher's logits (built by hand),
  td chooses them itself, ``chunk_size`` positions at a time, with an identical result.
- Logs: every value is a share of the optimiser step's mean over the N labelled positions (``mean``):
  ``q_expert``, ``value`` and ``chi2`` sum over the kept transitions (skipped ones count as zero, as in
  the loss); ``action_set_size`` (|A(s)|), ``expert_in_set`` and, with ``shift: vocab``,
  ``argmax_in_set`` (the student's vocabulary argmax lies in A'(s), so the shift is one of the set's own
  columns) over all labelled positions.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from raydistill.errors import ConfigError
from raydistill.objectives import register
from raydistill.objectives.action_space import (IGNORE, ActionSpaceSettings, action_space, actions_from_topk,
                                                add_expert, columns)
from raydistill.objectives.base import ModelInfo, Needs, Objective, ObjectiveSettings, Step
from raydistill.objectives.head_columns import head_columns, head_columns_and_argmax


class _GatherColumns(torch.autograd.Function):
    """``logits.gather(-1, index).float()``, whose backward writes the B x T x V gradient (in the logits'
    dtype) with ``index_put_``. Autograd's own gather backward uses ``scatter_add_``, which on CPU works
    through a float32 copy of the whole B x T x V gradient when the logits are bf16/fp16 (3x the gradient's
    memory); ``index_put_`` writes into the gradient alone (and is deterministic on CUDA, where scatter_add_
    uses atomics). Columns of one position that hold the same token are summed first, in float32 (B x T x K
    work), so that each written value is rounded to the logits' dtype once."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.logits_shape = logits.shape
        ctx.logits_dtype = logits.dtype
        return logits.gather(-1, index).float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        k = index.size(-1)
        index, grad = index.reshape(-1, k), grad.reshape(-1, k).float()
        tokens, order = index.sort(-1)
        grad = grad.gather(-1, order)
        first = torch.ones_like(tokens, dtype=torch.bool)
        first[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
        # Flat id of each column's run of equal tokens; each run's sum lands on its first column, in float32.
        run = (first.cumsum(-1) - 1) + torch.arange(0, tokens.numel(), k, device=index.device).unsqueeze(-1)
        total = torch.zeros_like(grad).view(-1).index_put_((run.view(-1),), grad.view(-1), accumulate=True)
        values = torch.where(first, total[run], 0.0).to(ctx.logits_dtype)  # one rounding per distinct token
        out = torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=grad.device)
        rows = torch.arange(tokens.size(0), device=index.device).unsqueeze(-1).expand_as(tokens)
        out.view(-1, out.size(-1)).index_put_((rows, tokens), values, accumulate=True)  # + exact zeros
        return out, None


class TDSettings(ObjectiveSettings):
    action_space: ActionSpaceSettings = Field(default_factory=ActionSpaceSettings,
                                              description="the reduced action set A(s) from the teacher's distribution")
    gamma: float = Field(0.99, ge=0, le=1, description="discount of the next state's value")
    alpha: float | None = Field(0.1, gt=0, description="chi^2 regulariser phi(x) = x - x^2/(4 alpha); null: off")
    temperature: float = Field(1.0, gt=0, description="tau in Q = z_S/tau (shifted and clipped)")
    q_min: float | None = Field(-10.0, lt=0, description="lower clip of Q (Q <= 0 after the shift); null: no clip")
    shift: Literal["vocab", "action_set"] = Field(
        "vocab", description="what Q subtracts from z_S/tau: vocab, the maximum over the whole vocabulary (the "
        "paper); action_set, the maximum over A(s) (a deviation: differs where clip or chi^2 is active, and never "
        "pushes down tokens outside A(s))")
    expert: Literal["include", "skip"] = Field(
        "include", description="expert token outside A(s): include adds it to the set (A(s) u {a_t}); skip drops "
        "that whole transition from both terms of the loss (it still counts in the normalisation)")
    fused_head: bool = Field(True, description="compute only the K gathered logits from the student's final "
                             "hidden state and output head, so no B x T x V logits or gradient exist; false: gather "
                             "from the full logits (needed where the model transforms logits after its head)")
    chunk_size: int | None = Field(None, ge=1, description="positions per chunk when td chooses the action sets "
                                   "from the teacher's logits itself (steps built by hand, bench td; the training step "
                                   "computes the teacher's top-K in bounded chunks of its own); null: all")


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
        return Needs(teacher_topk=columns(self.settings.action_space, self.info.vocab_size),
                     student_logits=not fused, student_head=fused,
                     student_vocab_search=fused and self.settings.shift == "vocab")

    def positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The labelled positions: every expert transition, kept or (``expert: skip``) not."""
        return batch["labels"] != IGNORE

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        s = self.settings
        labels = step.batch["labels"]
        labelled = self.positions(step.batch)
        # The teacher's ranked tokens from the step (online or from the teacher cache); on a step that carries
        # only the teacher's logits (built by hand), from those, ``chunk_size`` positions at a time.
        chosen = (actions_from_topk(step.teacher_topk, s.action_space) if step.teacher_topk is not None
                  else action_space(step.teacher.logits, s.action_space, s.chunk_size))
        actions, in_set = add_expert(chosen, labels, include=s.expert == "include")
        vocab_shift = s.shift == "vocab"
        # Columns: A(s) (K), the expert, and with the vocabulary shift the student's vocabulary argmax.
        if s.fused_head and vocab_shift:
            z, argmax = head_columns_and_argmax(step.student.head, actions.index)
        elif s.fused_head:
            z = head_columns(step.student.head, actions.index)
        else:
            index = actions.index
            if vocab_shift:
                with torch.no_grad():
                    argmax = step.student.logits.argmax(-1)
                index = torch.cat([index, argmax.unsqueeze(-1)], -1)
            z = _GatherColumns.apply(step.student.logits, index)
        z = z / s.temperature
        if vocab_shift:
            z, top = z[..., :-1], z[..., -1:]  # max over the vocabulary, differentiable through its column
        else:
            top = z.masked_fill(~actions.valid, float("-inf")).amax(-1, keepdim=True)
        q = z - top
        if s.q_min is not None:
            q = q.clamp_min(s.q_min)
        value = q.masked_fill(~actions.valid, float("-inf")).logsumexp(-1)  # V(s_t), B x T
        q_expert = q[..., -1]  # the expert column: Q(s_t, a_t), whether or not it is a duplicate of A(s)

        has_next = torch.zeros_like(labelled)
        has_next[:, :-1] = labelled[:, 1:]  # skipped or not: the next state exists (module doc)
        next_value = torch.cat([value[:, 1:], value.new_zeros(value.size(0), 1)], 1)
        target = s.gamma * torch.where(has_next, next_value, 0.0)  # gamma V(s_{t+1}); 0 when terminal

        kept = labelled if s.expert == "include" else labelled & in_set
        x = q_expert - target
        chi2 = x.square() / (4 * s.alpha) if s.alpha is not None else torch.zeros_like(x)
        loss = -self.mean(step, x - chi2, kept) + self.mean(step, value - target, kept)
        logs = {self.name: loss,
                f"{self.name}/q_expert": self.mean(step, q_expert, kept).detach(),
                f"{self.name}/value": self.mean(step, value, kept).detach(),
                f"{self.name}/chi2": self.mean(step, chi2, kept).detach(),
                f"{self.name}/action_set_size": self.mean(step, actions.valid[..., :-1].sum(-1).float(), labelled),
                f"{self.name}/expert_in_set": self.mean(step, in_set.float(), labelled)}
        if vocab_shift:
            found = ((actions.index == argmax.unsqueeze(-1)) & actions.valid).any(-1)
            logs[f"{self.name}/argmax_in_set"] = self.mean(step, found.float(), labelled)
        return logs
