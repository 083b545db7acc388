"""ROUGE-L as MiniLLM and the TD-distillation paper score it: Google's ``rouge-score`` package,
``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``.

The library lowercases the text, replaces every run of characters outside ``[a-z0-9]`` by a space, splits,
and Porter-stems the tokens longer than 3 characters ("running dogs" and "run dog" become the same tokens).
With ``l`` the length of the longest common subsequence of the prediction's and the reference's tokens::

    precision = l / len(prediction),  recall = l / len(reference),  F = 2PR / (P + R)

(0 when either side has no token). With several references a prediction takes its best F, as MiniLLM's
``metric_max_over_ground_truths`` does. Scores lie in [0, 1]; training reports ``val/rougeL`` as 100 x the
mean F over prompts and seeds, the scale papers print.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

from rouge_score import rouge_scorer, tokenizers
from rouge_score.scoring import Score as RougeScore  # (precision, recall, fmeasure)

ROUGE_TYPE = "rougeL"
USE_STEMMER = True

__all__ = ["RougeScore", "mean_rouge_l", "model_rouge_l", "rouge_l", "scorer", "tokenize"]


@lru_cache(maxsize=1)
def scorer() -> rouge_scorer.RougeScorer:
    """The one scorer every score goes through (MiniLLM's ``default_rouge_scorer``)."""
    return rouge_scorer.RougeScorer([ROUGE_TYPE], use_stemmer=USE_STEMMER)


def tokenize(text: str) -> list[str]:
    """The tokens ROUGE-L compares: the scorer's own tokeniser (lowercase, alphanumeric runs, stemmed)."""
    return _tokenizer().tokenize(text)


@lru_cache(maxsize=1)
def _tokenizer() -> tokenizers.DefaultTokenizer:
    return tokenizers.DefaultTokenizer(use_stemmer=USE_STEMMER)


def rouge_l(prediction: str, reference: str | Sequence[str]) -> RougeScore:
    """ROUGE-L of one prediction against one reference, or the best over several references (by F)."""
    references = [reference] if isinstance(reference, str) else list(reference)
    if not references:
        raise ValueError("rouge_l: no reference")
    scores = [scorer().score(target=ref, prediction=prediction)[ROUGE_TYPE] for ref in references]
    return max(scores, key=lambda s: s.fmeasure)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
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
    ``references`` (a string, or a list of strings scored by the best), one generation per seed; only the
    first ``count`` prompts are scored (the rest pad a shard so that every rank runs the same generate
    calls). Responses are decoded without special tokens."""
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
