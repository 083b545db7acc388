"""``kd``: soft-target distillation, tau^2 * KL(teacher_tau || student_tau) per position."""

from __future__ import annotations

import torch
from pydantic import Field

from raydistill.objectives import register
from raydistill.objectives.base import Needs, Objective, ObjectiveSettings, Step
from raydistill.objectives.soft_kl import soft_kl


class KDSettings(ObjectiveSettings):
    temperature: float = Field(2.0, gt=0, description="softening temperature tau (2 in DistilBERT)")
    masked_only: bool = Field(False, description="only positions with a task label (MLM-masked tokens)")


@register
class KDLoss(Objective):
    name = "kd"
    Settings = KDSettings

    def needs(self) -> Needs:
        return Needs(teacher_logits=True, student_logits=True)

    def positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].bool()
        return mask & (batch["labels"] != -100) if self.settings.masked_only else mask

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        kl = soft_kl(step.teacher.logits, step.student.logits, self.settings.temperature)
        return {self.name: self.mean(step, kl)}
