"""``kd``: soft-target distillation, tau^2 * KL(teacher_tau || student_tau) per position."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from raydistill.objectives import register
from raydistill.objectives.base import Needs, Objective, ObjectiveSettings, Step, masked_mean


class KDSettings(ObjectiveSettings):
    temperature: float = Field(2.0, gt=0, description="softening temperature tau (2 in DistilBERT)")
    masked_only: bool = Field(False, description="only positions with a task label (MLM-masked tokens)")


def soft_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau)), shape [..., ]."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * (t.exp() * (t - s)).sum(-1)


@register
class KDLoss(Objective):
    name = "kd"
    Settings = KDSettings

    def needs(self) -> Needs:
        return Needs(teacher_logits=True, student_logits=True)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        kl = soft_kl(step.teacher.logits, step.student.logits, self.settings.temperature)
        mask = step.attention_mask.bool()
        if self.settings.masked_only:
            mask = mask & (step.batch["labels"] != -100)
        return {self.name: masked_mean(kl, mask)}
