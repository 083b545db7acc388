"""``tvd``: total variation distance 1/2 sum |p - q| per position between the teacher's and the student's
softened distributions (in [0, 1]; no tau^2 factor)."""

from __future__ import annotations

import torch

from raydistill.objectives import register
from raydistill.objectives.divergences import DivergenceObjective, DivergenceSettings, total_variation


@register
class TVDLoss(DivergenceObjective):
    name = "tvd"
    Settings = DivergenceSettings

    def divergence(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        return total_variation(teacher_logits, student_logits, self.settings.temperature)
