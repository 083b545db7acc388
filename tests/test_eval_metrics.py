"""Metric functions (scikit-learn, scipy, seqeval and the official SQuAD normalisation) against values
computed by hand, and on the real CoNLL-2003 tags."""

from __future__ import annotations

import math

import pytest
from conftest import shared_data

from raydistill.eval import metrics as M
from raydistill.eval.loaders import read_conll


def test_accuracy_and_binary_f1():
    preds, gold = [1, 0, 1, 1], [1, 1, 1, 0]
    assert M.accuracy(preds, gold) == 0.5
    # tp=2, fp=1, fn=1 -> 2*2 / (2*2 + 1 + 1)
    assert M.f1_binary(preds, gold) == pytest.approx(2 / 3)
    assert M.f1_binary([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        M.accuracy([1], [1, 0])


def test_matthews_binary_multiclass_and_degenerate():
    # tp=2, fp=1, tn=2, fn=1 -> (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert M.matthews_corrcoef([1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]) == pytest.approx(1 / 3)
    assert M.matthews_corrcoef([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert M.matthews_corrcoef([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)
    assert M.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction carries no signal
    # 3 classes: c=2, n=4, sum p_k t_k = 5, sum p_k^2 = 6, sum t_k^2 = 6 -> (8-5)/sqrt(10*10)
    assert M.matthews_corrcoef([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3)


def test_pearson_and_spearman():
    # dx = [-1.5,-.5,.5,1.5], dy = [-3,-1,0,4]: sxy = 11, sxx = 5, syy = 26
    assert M.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    # Ties take their average rank: x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4] -> 4.5 / sqrt(4.5 * 5)
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert M.spearman([1, 2, 3], [1, 10, 100]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [1, 10, 100]) < 1.0
    assert M.spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0


@pytest.mark.parametrize("text,expected", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("an apple a day", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),  # articles only as whole words
    ("A.B.C.", "abc"),
    ("  U.S.-led  ", "usled"),
    ("the", ""),
])
def test_squad_normalisation(text, expected):
    assert M.normalize_answer(text) == expected


def test_squad_em_f1_with_several_gold_answers():
    assert M.squad_exact_match("Denver Broncos", ["Broncos", "the Denver Broncos"]) == 1.0
    assert M.squad_exact_match("Denver", ["Broncos", "the Denver Broncos"]) == 0.0
    # pred [quick, brown, fox] vs gold [quick, fox, jumps]: 2 shared -> P = R = 2/3
    assert M.squad_f1("the quick brown fox", ["quick fox jumps"]) == pytest.approx(2 / 3)
    # The best gold answer counts: "brown fox" gives P = 2/3, R = 1 -> 0.8
    assert M.squad_f1("the quick brown fox", ["quick fox jumps", "Brown fox."]) == pytest.approx(0.8)
    assert M.squad_f1("", ["anything"]) == 0.0
    scores = M.squad_scores({"q1": "U.S.", "q2": "red car"}, {"q1": ["US"], "q2": ["a red car"], "q3": ["x"]})
    assert scores == {"exact_match": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}  # q3 unanswered


def test_entity_spans_follow_conlleval():
    assert M.entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {(0, 2, "PER"), (3, 4, "LOC")}
    assert M.entity_spans(["B-PER", "B-PER"]) == {(0, 1, "PER"), (1, 2, "PER")}
    assert M.entity_spans(["O", "I-PER", "I-PER"]) == {(1, 3, "PER")}  # I- after O opens an entity
    assert M.entity_spans(["B-PER", "I-LOC"]) == {(0, 1, "PER"), (1, 2, "LOC")}
    with pytest.raises(ValueError):
        M.entity_spans(["X-PER"])


def test_entity_f1_partial_matches_and_type_errors():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"], ["O", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"],  # PER cut short (wrong), LOC right
            ["B-LOC", "O"],  # right span, wrong type
            ["O", "B-MISC"]]  # spurious entity
    scores = M.entity_scores(pred, gold)
    # 1 correct of 4 predicted and of 3 gold
    assert scores["entity_precision"] == pytest.approx(1 / 4)
    assert scores["entity_recall"] == pytest.approx(1 / 3)
    assert scores["entity_f1"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    assert M.entity_scores([["O", "O", "O", "O"]], [gold[0]])["entity_f1"] == 0.0
    assert M.entity_scores([["O", "I-PER", "I-PER"]], [["O", "B-PER", "I-PER"]])["entity_f1"] == 1.0


def test_perplexity():
    assert M.perplexity(5 * math.log(10), 5) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)


def test_entity_scores_read_iob1_and_iob2_alike():
    # seqeval's default mode chunks as conlleval: IOB1 (I- opens an entity, B- only splits two adjacent
    # entities of one type) and its IOB2 conversion give the same entities.
    iob1 = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"], ["O", "I-ORG", "I-MISC"]]
    iob2 = [["B-PER", "I-PER", "B-PER", "O", "B-LOC"], ["O", "B-ORG", "B-MISC"]]
    assert M.entity_scores(iob1, iob2) == {"entity_f1": 1.0, "entity_precision": 1.0, "entity_recall": 1.0}
    assert M.entity_scores([["O"]], [["O"]])["entity_f1"] == 0.0  # nothing to find: 0, no warning


def _to_iob1(tags):
    out, prev = [], "O"
    for tag in tags:
        if tag.startswith("B-") and prev[2:] != tag[2:]:
            tag = "I-" + tag[2:]  # B- only where the previous token has the same type
        out.append(tag)
        prev = tag
    return out


def test_entity_scores_on_real_conll2003_valid():
    sentences = read_conll(shared_data("conll2003", "valid.txt"))
    gold = [s["tags"] for s in sentences]
    assert sum(len(M.entity_spans(g)) for g in gold) == 5942  # 1842 PER + 1837 LOC + 1341 ORG + 922 MISC
    assert M.entity_scores(gold, gold)["entity_f1"] == 1.0
    assert M.entity_scores([_to_iob1(g) for g in gold], gold)["entity_f1"] == 1.0
    # Dropping every MISC entity: precision stays 1, recall loses 922 of 5942.
    no_misc = [[t if not t.endswith("MISC") else "O" for t in g] for g in gold]
    scores = M.entity_scores(no_misc, gold)
    assert scores["entity_precision"] == 1.0 and scores["entity_recall"] == pytest.approx(1 - 922 / 5942)
