"""Objective registry: config name -> objective class. Adding an objective is one new module that
registers itself here; nothing else changes."""

from __future__ import annotations

from raydistill.objectives.base import ForwardResult, ModelInfo, Needs, Objective, ObjectiveSettings, Step

REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    if cls.name in REGISTRY:
        raise ValueError(f"objective {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def build_objectives(active: dict[str, ObjectiveSettings], info: ModelInfo) -> dict[str, Objective]:
    """Instantiate the active objectives; constructors validate settings against the models' shapes."""
    return {name: REGISTRY[name](settings, info) for name, settings in active.items()}


# Importing the modules registers them.
from raydistill.objectives import cosine, iit, jsd, kd, reverse_kl, skew_kl, task, td, tvd  # noqa: E402,F401

__all__ = ["REGISTRY", "register", "build_objectives", "Objective", "ObjectiveSettings", "Needs", "ModelInfo",
           "Step", "ForwardResult"]
