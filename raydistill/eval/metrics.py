"""Benchmark metrics, implemented here (no sklearn/seqeval/scipy) and checked against hand-computed values.

Scores are fractions in [0, 1] (SQuAD EM/F1 included, unlike the official script's percentages), except
perplexity. Correlations of a constant series are reported as 0.0, not NaN, so sweeps can still rank trials.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Sequence

# ----------------------------------------------------------------------------------------- classification


def accuracy(preds: Sequence, labels: Sequence) -> float:
    _same_length(preds, labels)
    return sum(p == g for p, g in zip(preds, labels)) / len(labels) if labels else 0.0


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP F1)."""
    _same_length(preds, labels)
    tp = sum(p == positive and g == positive for p, g in zip(preds, labels))
    fp = sum(p == positive and g != positive for p, g in zip(preds, labels))
    fn = sum(p != positive and g == positive for p, g in zip(preds, labels))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class form of Gorodkin 2004; the binary phi coefficient for 2 classes).
    0.0 when either side has a single class, as sklearn does."""
    _same_length(preds, labels)
    classes = sorted(set(preds) | set(labels))
    n = len(labels)
    correct = sum(p == g for p, g in zip(preds, labels))
    pred_count = collections.Counter(preds)
    true_count = collections.Counter(labels)
    cov_ytyp = correct * n - sum(pred_count[k] * true_count[k] for k in classes)
    cov_ypyp = n * n - sum(pred_count[k] ** 2 for k in classes)
    cov_ytyt = n * n - sum(true_count[k] ** 2 for k in classes)
    denom = math.sqrt(cov_ypyp * cov_ytyt)
    return cov_ytyp / denom if denom else 0.0


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    _same_length(xs, ys)
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata 'average')."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    _same_length(xs, ys)
    return pearson(_ranks(xs), _ranks(ys))


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


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or not kind:
        raise ValueError(f"not an IOB tag: {tag!r}")
    return prefix, kind


def entity_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """Chunks (start, end exclusive, type) as conlleval reads them: a chunk starts at B-X, or at I-X after
    O or after another type, and ends where the next tag is not I-X."""
    spans = set()
    start, kind = None, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, t = _split_tag(tag)
        if start is not None and (prefix != "I" or t != kind):
            spans.add((start, i, kind))
            start = None
        if prefix != "O" and start is None:
            start, kind = i, t
    return spans


def entity_scores(pred_sentences: Sequence[Sequence[str]],
                  gold_sentences: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity-level precision, recall and F1 over all sentences (conlleval's numbers): an
    entity counts only with exact boundaries and type."""
    _same_length(pred_sentences, gold_sentences)
    correct = n_pred = n_gold = 0
    for pred, gold in zip(pred_sentences, gold_sentences):
        _same_length(pred, gold)
        p, g = entity_spans(pred), entity_spans(gold)
        correct += len(p & g)
        n_pred += len(p)
        n_gold += len(g)
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if correct else 0.0
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall}


# ----------------------------------------------------------------------------------------- language model


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean negative log-likelihood in nats per predicted token)."""
    if num_tokens <= 0:
        raise ValueError("perplexity of zero predicted tokens")
    return math.exp(total_nll / num_tokens)


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and references differ in length ({len(a)} vs {len(b)})")
