"""Layer alignments between a teacher and a student for interchange interventions.

An alignment is a list of pairs: a set of teacher blocks whose outputs are swapped together, and the one
student block that is swapped in its place. Indices are 0-based block outputs (the embeddings are not a
layer); negative indices count from the end, as in ``objectives.cosine.pairs``.

Presets (the paper's, stated for a 12-block teacher and 6-block student with 1-based blocks, generalised
to any depths L_T, L_S; the table below is 1-based like the paper, the code is 0-based):

- ``middle``: T(L_T//2) -> S(L_S//2).                        12/6: T6 -> S3
- ``late``: T(t) -> S(s) and T(t+1) -> S(s+1), t = round(3 L_T / 4), s = L_S//2, each clipped to the
  depth (duplicates dropped).                                  12/6: T9 -> S3, T10 -> S4
- ``full``: student block i <-> teacher group i, the L_T blocks cut into L_S consecutive groups of
  L_T/L_S (sizes differ by at most one when L_S does not divide L_T; a student deeper than its teacher
  maps several student blocks to one teacher block).       12/6: T{2i-1, 2i} -> S i, i = 1..6
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from raydistill.errors import ConfigError
from raydistill.models.adapters import resolve_layer  # noqa: F401  (re-exported)

ALIGNMENT_PRESETS = ("middle", "late", "full")


class AlignmentPair(BaseModel):
    """One aligned pair as written in the config: ``{teacher: [layers], student: layer}``."""

    model_config = ConfigDict(extra="forbid")
    teacher: list[int] = Field(min_length=1, description="teacher block indices swapped together (0-based; "
                               "negative counts from the end)")
    student: int = Field(description="student block index (0-based; negative counts from the end)")

    @field_validator("teacher", mode="before")
    @classmethod
    def _one_int(cls, v):
        # ``teacher: 5`` is a natural shorthand for ``teacher: [5]``.
        return [v] if isinstance(v, int) else v


@dataclass(frozen=True)
class LayerPair:
    """A resolved pair: non-negative, sorted, distinct teacher blocks and one student block."""

    teacher: tuple[int, ...]
    student: int

    @property
    def label(self) -> str:
        """Metric-name friendly, e.g. ``t4_5-s2`` (0-based)."""
        return "t" + "_".join(map(str, self.teacher)) + f"-s{self.student}"


def preset_alignment(name: str, teacher_depth: int, student_depth: int) -> list[LayerPair]:
    """The pairs of a preset for the given depths (0-based)."""
    if teacher_depth < 1 or student_depth < 1:
        raise ConfigError(f"alignment preset {name!r}: depths must be positive (teacher {teacher_depth}, "
                          f"student {student_depth})")
    if name == "middle":
        return [LayerPair((max(1, teacher_depth // 2) - 1,), max(1, student_depth // 2) - 1)]
    if name == "late":
        t, s = min(teacher_depth, max(1, round(3 * teacher_depth / 4))), max(1, student_depth // 2)
        pairs = [LayerPair((t - 1,), s - 1), LayerPair((min(t + 1, teacher_depth) - 1,), min(s + 1, student_depth) - 1)]
        return list(dict.fromkeys(pairs))
    if name == "full":
        pairs = []
        for i in range(student_depth):
            lo = i * teacher_depth // student_depth
            hi = max(lo + 1, (i + 1) * teacher_depth // student_depth)
            pairs.append(LayerPair(tuple(range(lo, hi)), i))
        return pairs
    raise ConfigError(f"alignment preset {name!r} unknown; allowed: {', '.join(ALIGNMENT_PRESETS)} or a list "
                      "of {teacher: [layers], student: layer}")


def resolve_alignment(spec: str | list[AlignmentPair] | list[dict], teacher_depth: int, student_depth: int,
                      field: str = "objectives.iit.alignment") -> list[LayerPair]:
    """Validate an alignment (preset name or explicit pairs) against the models' depths.

    Raises ``ConfigError`` naming ``field``, the offending value and the allowed range."""
    if isinstance(spec, str):
        if spec not in ALIGNMENT_PRESETS:
            raise ConfigError(f"{field}: unknown preset {spec!r}; allowed: {', '.join(ALIGNMENT_PRESETS)} or a "
                              "list of {teacher: [layers], student: layer}")
        return preset_alignment(spec, teacher_depth, student_depth)
    if not spec:
        raise ConfigError(f"{field}: empty list; give a preset ({', '.join(ALIGNMENT_PRESETS)}) or at least one "
                          "pair {teacher: [layers], student: layer}")
    pairs = []
    for i, raw in enumerate(spec):
        pair = raw if isinstance(raw, AlignmentPair) else AlignmentPair.model_validate(raw)
        teacher = [resolve_layer(t, teacher_depth, f"{field}[{i}].teacher") for t in pair.teacher]
        if len(set(teacher)) != len(teacher):
            raise ConfigError(f"{field}[{i}].teacher: {pair.teacher} names a teacher block twice")
        student = resolve_layer(pair.student, student_depth, f"{field}[{i}].student")
        pairs.append(LayerPair(tuple(sorted(teacher)), student))
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"{field}: the same pair is listed twice")
    return pairs
