"""``jsd``: generalised Jensen-Shannon divergence (GKD; TRL's ``generalized_jsd_loss`` convention) per position,
tau^2 * [beta KL(p || m) + (1-beta) KL(q || m)], m = beta p + (1-beta) q (p teacher, q student); beta = 0 is the
forward KL(p || q) of ``kd``, beta = 1 the reverse KL(q || p) (see ``divergences.generalized_jsd``)."""

from __future__ import annotations

import torch
from pydantic import Field

from raydistill.objectives import register
from raydistill.objectives.divergences import DivergenceObjective, DivergenceSettings, generalized_jsd


class JSDSettings(DivergenceSettings):
    beta: float = Field(0.5, ge=0, le=1, description="teacher's weight in the mixture m = beta p + (1-beta) q; "
                                                      "0: forward KL(p || q), 1: reverse KL(q || p) (TRL GKD)")


@register
class JSDLoss(DivergenceObjective):
    name = "jsd"
    Settings = JSDSettings

    def divergence(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        return generalized_jsd(teacher_logits, student_logits, self.settings.temperature, self.settings.beta)
