"""``cosine``: 1 - cos(h_S, h_T) on aligned block outputs, with a learned projection when widths differ."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from raydistill.errors import ConfigError
from raydistill.models.adapters import resolve_layer
from raydistill.objectives import register
from raydistill.objectives.base import (ModelInfo, Needs, Objective, ObjectiveSettings, Step,
                                        width_projection)


class LayerPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: int = Field(description="teacher block index (0-based; negative counts from the end)")
    student: int = Field(description="student block index (0-based; negative counts from the end)")


class CosineSettings(ObjectiveSettings):
    pairs: list[LayerPair] = Field(default_factory=lambda: [LayerPair(teacher=-1, student=-1)],
                                   min_length=1, description="teacher->student block pairs (default: last->last)")


@register
class CosineLoss(Objective):
    name = "cosine"
    Settings = CosineSettings

    def __init__(self, settings: CosineSettings, info: ModelInfo):
        super().__init__(settings, info)
        if info.teacher_layers is None:
            raise ConfigError("objectives.cosine needs a teacher model")
        self.pairs = [(resolve_layer(p.teacher, info.teacher_layers, "objectives.cosine.pairs.teacher"),
                       resolve_layer(p.student, info.student_layers, "objectives.cosine.pairs.student"))
                      for p in settings.pairs]
        # One projection shared by all pairs: the student's residual width is the same at every block.
        self.proj = width_projection(info)

    def needs(self) -> Needs:
        return Needs(teacher_layers=frozenset(t for t, _ in self.pairs),
                     student_layers=frozenset(s for _, s in self.pairs))

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        terms = []
        for t, s in self.pairs:
            hs = step.student.hidden[s]
            if self.proj is not None:
                hs = self.proj(hs)
            cos = F.cosine_similarity(hs.float(), step.teacher.hidden[t].float(), dim=-1, eps=1e-8)
            terms.append(self.mean(step, 1.0 - cos))
        return {self.name: torch.stack(terms).mean()}
