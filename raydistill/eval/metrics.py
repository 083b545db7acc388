"""Benchmark metrics, from the libraries the papers' numbers come from.

* GLUE: accuracy, F1 of the positive class and Matthews correlation from scikit-learn; Pearson and Spearman
  correlations from scipy.stats (what GLUE's own scorer and Hugging Face's ``glue`` metric call).
* CoNLL-2003: entity-level micro precision/recall/F1 from ``seqeval`` in its default mode, which chunks tags
  exactly as the shared task's ``conlleval`` script does (IOB1 and IOB2 alike: an entity starts at B-X or
  at an I-X after O or another type), as BERT-style NER evaluations (Hugging Face ``run_ner``) report it.
* SQuAD v1.1: the official ``evaluate-v1.1.py`` normalisation, EM and token F1, written out here (the
  official script is not a package); max over the gold answers, a missing prediction scores 0.

Scores are fractions in [0, 1] (SQuAD EM/F1 included, unlike the official script's percentages), except
perplexity. Correlations of a constant series (NaN in scipy) are reported as 0.0, so sweeps can still rank
trials; an undefined F1 or precision (nothing predicted) is 0.0, as sklearn/seqeval give with a warning.
"""

from __future__ import annotations

import collections
import math
import re
import string
import warnings
from typing import Sequence

# ----------------------------------------------------------------------------------------- classification


def accuracy(preds: Sequence, labels: Sequence) -> float:
    from sklearn.metrics import accuracy_score

    _same_length(preds, labels)
    return float(accuracy_score(list(labels), list(preds))) if len(labels) else 0.0


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP F1): sklearn's ``f1_score(average="binary")``."""
    from sklearn.metrics import f1_score

    _same_length(preds, labels)
    if not len(labels):
        return 0.0
    return float(f1_score(list(labels), list(preds), pos_label=positive, average="binary", zero_division=0.0))


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (sklearn; the multi-class form of Gorodkin 2004 beyond two classes). 0.0 when
    either side has a single class."""
    from sklearn.metrics import matthews_corrcoef as mcc

    _same_length(preds, labels)
    if not len(labels):
        return 0.0
    return float(mcc(list(labels), list(preds)))


def _correlation(fn, xs: Sequence[float], ys: Sequence[float]) -> float:
    _same_length(xs, ys)
    if len(xs) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on a constant input and returns NaN
        value = float(fn(list(xs), list(ys))[0])
    return 0.0 if math.isnan(value) else value


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's r (scipy.stats.pearsonr)."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, xs, ys)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rho (scipy.stats.spearmanr: ties share their average rank)."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, xs, ys)


# ------------------------------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, drop punctuation, drop articles, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, golds: Sequence[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    return max(_token_f1(prediction, g) for g in golds)


def squad_scores(predictions: dict[str, str], golds: dict[str, Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 over ``golds`` (question id -> gold answers); a missing prediction scores 0."""
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em = sum(squad_exact_match(predictions.get(q, ""), g) for q, g in golds.items())
    f1 = sum(squad_f1(predictions.get(q, ""), g) for q, g in golds.items())
    return {"exact_match": em / len(golds), "f1": f1 / len(golds)}


# -------------------------------------------------------------------------------------------------- NER


def _check_tags(sentences: Sequence[Sequence[str]]) -> None:
    for tags in sentences:
        for tag in tags:
            prefix, _, kind = tag.partition("-")
            if tag != "O" and (prefix not in ("B", "I") or not kind):
                raise ValueError(f"not an IOB tag: {tag!r}")


def entity_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """Chunks (start, end exclusive, type) as seqeval (and conlleval) read them: a chunk starts at B-X, or
    at I-X after O or after another type, and ends where the next tag is not I-X."""
    from seqeval.metrics.sequence_labeling import get_entities

    _check_tags([tags])
    return {(start, end + 1, kind) for kind, start, end in get_entities(list(tags))}


def entity_scores(pred_sentences: Sequence[Sequence[str]],
                  gold_sentences: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity-level precision, recall and F1 over all sentences (seqeval's default mode,
    conlleval's numbers): an entity counts only with exact boundaries and type."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    _same_length(pred_sentences, gold_sentences)
    for pred, gold in zip(pred_sentences, gold_sentences):
        _same_length(pred, gold)
    _check_tags(pred_sentences)
    _check_tags(gold_sentences)
    gold, pred = [list(s) for s in gold_sentences], [list(s) for s in pred_sentences]
    if not gold:
        return {"entity_f1": 0.0, "entity_precision": 0.0, "entity_recall": 0.0}
    return {"entity_f1": float(f1_score(gold, pred, zero_division=0)),
            "entity_precision": float(precision_score(gold, pred, zero_division=0)),
            "entity_recall": float(recall_score(gold, pred, zero_division=0))}


# ----------------------------------------------------------------------------------------- language model


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean negative log-likelihood in nats per predicted token)."""
    if num_tokens <= 0:
        raise ValueError("perplexity of zero predicted tokens")
    return math.exp(total_nll / num_tokens)


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and references differ in length ({len(a)} vs {len(b)})")
