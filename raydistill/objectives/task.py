"""``task``: the student's own language-modelling loss (MLM or next-token cross-entropy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raydistill.objectives import register
from raydistill.objectives.base import Needs, Objective, Step


@register
class TaskLoss(Objective):
    """Cross-entropy of the student's logits against ``batch['labels']`` (already aligned: masked tokens
    for encoders, the next token for decoders), averaged over the positions that have a label."""

    name = "task"

    def needs(self) -> Needs:
        return Needs(student_logits=True)

    def positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"] != -100

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        logits = step.student.logits
        labels = step.batch["labels"]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                             reduction="none")
        return {self.name: self.mean(step, ce.view(labels.shape))}
