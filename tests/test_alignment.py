"""Layer alignments: presets, explicit pairs, validation against the models' depths."""

from __future__ import annotations

import pytest

from raydistill.alignment import AlignmentPair, LayerPair, preset_alignment, resolve_alignment
from raydistill.errors import ConfigError
from raydistill.objectives.base import ModelInfo
from raydistill.objectives.iit import IITCosineLoss, IITCosineSettings, IITLoss, IITSettings


def one_based(pairs):
    return [([t + 1 for t in p.teacher], p.student + 1) for p in pairs]


def test_presets_match_the_paper_for_12_to_6():
    assert one_based(preset_alignment("middle", 12, 6)) == [([6], 3)]
    assert one_based(preset_alignment("late", 12, 6)) == [([9], 3), ([10], 4)]
    assert one_based(preset_alignment("full", 12, 6)) == [([2 * i - 1, 2 * i], i) for i in range(1, 7)]


@pytest.mark.parametrize("teacher,student", [(12, 6), (12, 3), (4, 2), (24, 6), (10, 4), (7, 3), (5, 5), (2, 4),
                                             (1, 1), (32, 24)])
def test_presets_fit_any_depths(teacher, student):
    full = preset_alignment("full", teacher, student)
    assert [p.student for p in full] == list(range(student))
    flat = [t for p in full for t in p.teacher]
    assert all(0 <= t < teacher for t in flat)
    if teacher >= student:
        # Consecutive groups covering every teacher block once, sizes within one of L_T / L_S.
        assert flat == list(range(teacher))
        sizes = [len(p.teacher) for p in full]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) == teacher // student
    else:
        assert all(len(p.teacher) == 1 for p in full) and sorted(set(flat)) == list(range(teacher))
    for name in ("middle", "late"):
        pairs = preset_alignment(name, teacher, student)
        assert pairs and len(set(pairs)) == len(pairs)
        assert all(0 <= t < teacher for p in pairs for t in p.teacher)
        assert all(0 <= p.student < student for p in pairs)


def test_explicit_pairs_resolve_negative_indices_and_shorthand():
    pairs = resolve_alignment([{"teacher": [-1, 9], "student": -1}, {"teacher": 4, "student": 1}], 12, 6)
    assert pairs == [LayerPair((9, 11), 5), LayerPair((4,), 1)]
    assert pairs[0].label == "t9_11-s5"
    assert resolve_alignment([AlignmentPair(teacher=[0], student=0)], 2, 1) == [LayerPair((0,), 0)]


@pytest.mark.parametrize("spec,message", [
    ([{"teacher": [12], "student": 0}], r"objectives\.iit\.alignment\[0\]\.teacher: layer 12 out of range; "
                                        r"the model has 12 blocks \(allowed: -12\.\.11\)"),
    ([{"teacher": [3], "student": 0}, {"teacher": [2], "student": 6}],
     r"objectives\.iit\.alignment\[1\]\.student: layer 6 out of range; the model has 6 blocks \(allowed: -6\.\.5\)"),
    ([{"teacher": [-13], "student": 0}], r"alignment\[0\]\.teacher: layer -13 out of range"),
    ([{"teacher": [3, 3], "student": 0}], r"names a teacher block twice"),
    ([{"teacher": [3], "student": 0}, {"teacher": [3], "student": 0}], r"listed twice"),
    ([], r"empty list"),
    ("diagonal", r"unknown preset 'diagonal'; allowed: middle, late, full"),
])
def test_bad_alignments_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_alignment(spec, 12, 6)


def test_objectives_validate_alignment_in_their_constructor():
    info = ModelInfo(is_encoder=True, vocab_size=100, student_layers=2, student_hidden=64, teacher_layers=4,
                     teacher_hidden=64)
    with pytest.raises(ConfigError, match=r"objectives\.iit\.alignment\[0\]\.teacher: layer 4 out of range.*-4\.\.3"):
        IITLoss(IITSettings(alignment=[{"teacher": [4], "student": 0}]), info)
    with pytest.raises(ConfigError, match=r"objectives\.iit_cosine\.alignment\[0\]\.student: layer 2 out of range"):
        IITCosineLoss(IITCosineSettings(alignment=[{"teacher": [1], "student": 2}]), info)
    no_teacher = ModelInfo(is_encoder=True, vocab_size=100, student_layers=2, student_hidden=64)
    with pytest.raises(ConfigError, match="objectives.iit needs a teacher"):
        IITLoss(IITSettings(), no_teacher)
    objective = IITLoss(IITSettings(alignment="full"), info)
    assert objective.pairs == [LayerPair((0, 1), 0), LayerPair((2, 3), 1)]
    needs = objective.needs()
    assert needs.teacher_layers == {0, 1, 2, 3} and needs.student_layers == {0, 1}
