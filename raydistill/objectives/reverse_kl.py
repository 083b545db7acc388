"""``reverse_kl``: mode-seeking distillation (MiniLLM-style), tau^2 * KL(student_tau || teacher_tau) per position."""

from __future__ import annotations

import torch

from raydistill.objectives import register
from raydistill.objectives.divergences import DivergenceObjective, DivergenceSettings, reverse_kl


@register
class ReverseKLLoss(DivergenceObjective):
    name = "reverse_kl"
    Settings = DivergenceSettings

    def divergence(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        return reverse_kl(teacher_logits, student_logits, self.settings.temperature)
