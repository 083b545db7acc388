"""ROUGE-L (the TD-distillation paper's metric, via MiniLLM's evaluation): an LCS-based F-measure on tokens.

Matches ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])`` with its default tokenisation and no stemmer:
text is lowercased, every run of characters outside ``[a-z0-9]`` becomes a separator, and the remaining
alphanumeric tokens are compared. With ``l`` the length of the longest common subsequence of the
prediction's and the reference's tokens::

    precision = l / len(prediction),  recall = l / len(reference),  F = 2PR / (P + R)

(0 when either side has no token or nothing matches). Scores lie in [0, 1]; training reports
``val/rougeL`` as 100 x the mean F over prompts and seeds, the scale papers print.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """rouge-score's default tokeniser: lowercase, non-alphanumeric runs -> spaces, split."""
    return _NON_ALPHANUM.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@dataclass(frozen=True)
class RougeScore:
    precision: float
    recall: float
    fmeasure: float


def rouge_l(prediction: str, reference: str) -> RougeScore:
    """ROUGE-L of one prediction against one reference (rouge-score's ``rougeL``)."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return RougeScore(0.0, 0.0, 0.0)
    lcs = lcs_length(pred, ref)
    p, r = lcs / len(pred), lcs / len(ref)
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return RougeScore(p, r, f)


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure over pairs, in [0, 1] (0 for an empty list)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    return sum(rouge_l(p, r).fmeasure for p, r in zip(predictions, references)) / len(predictions)


def model_rouge_l(model, tokenizer, prompts: Sequence, references: Sequence[str], *, generate_kwargs: dict[str, Any],
                  seeds: Sequence[int], batch_size: int = 32, device="cpu", count: int | None = None
                  ) -> tuple[float, int]:
    """(sum of ROUGE-L F, number of scores) of ``model``'s responses to ``prompts`` (token id arrays) against
    ``references``, one generation per seed; only the first ``count`` prompts are scored (the rest pad a
    shard so that every rank runs the same generate calls). Responses are decoded without special tokens."""
    from raydistill.generation import generate_responses

    count = len(prompts) if count is None else count
    total, n = 0.0, 0
    for seed in seeds:
        responses = generate_responses(model, list(prompts), pad_id=tokenizer.pad_token_id,
                                       eos_id=tokenizer.eos_token_id, generate_kwargs=generate_kwargs,
                                       batch_size=batch_size, seed=seed, device=device)
        for response, ref in zip(responses[:count], references[:count]):
            total += rouge_l(tokenizer.decode(response, skip_special_tokens=True), ref).fmeasure
            n += 1
    return total, n
