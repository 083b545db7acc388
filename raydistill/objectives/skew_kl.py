"""``skew_kl`` and ``skew_reverse_kl``: DistiLLM's skew KL divergences per position (p teacher, q student),
tau^2 * KL(p || skew p + (1-skew) q) and tau^2 * KL(q || skew q + (1-skew) p). Skew 0 gives the plain forward
(``kd``) and reverse (``reverse_kl``) KLs; skew 1 gives 0."""

from __future__ import annotations

import torch
from pydantic import Field

from raydistill.objectives import register
from raydistill.objectives.divergences import DivergenceObjective, DivergenceSettings, skew_kl, skew_reverse_kl


class SkewSettings(DivergenceSettings):
    skew: float = Field(0.1, ge=0, le=1, description="weight of the first distribution in the mixture it is "
                                                      "compared with (lambda / alpha; 0.1 in DistiLLM)")


@register
class SkewKLLoss(DivergenceObjective):
    name = "skew_kl"
    Settings = SkewSettings

    def divergence(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        return skew_kl(teacher_logits, student_logits, self.settings.temperature, self.settings.skew)


@register
class SkewReverseKLLoss(DivergenceObjective):
    name = "skew_reverse_kl"
    Settings = SkewSettings

    def divergence(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        return skew_reverse_kl(teacher_logits, student_logits, self.settings.temperature, self.settings.skew)
