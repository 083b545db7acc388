"""SQuAD-style span extraction: question + context windows with a document stride, and picking the best
answer span across an example's windows.

The question always comes first, so decoder students (causal attention) read the whole question before
any context token they score. A window that does not contain the gold answer is trained to point at
position 0 (BERT's [CLS]), as in the original BERT recipe.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def _questions(tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int, doc_stride: int) -> list[str]:
    """Questions cut to leave every window more context room than the stride (else the tokenizer fails)."""
    limit = max(1, (max_length - doc_stride) // 2)
    questions = [e["question"].strip() for e in examples]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [q if len(offsets) <= limit else q[:offsets[limit - 1][1]]
            for q, offsets in zip(questions, enc["offset_mapping"])]


def _encode(tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int, doc_stride: int):
    return tokenizer(_questions(tokenizer, examples, max_length, doc_stride), [e["context"] for e in examples],
                     truncation="only_second", max_length=max_length, stride=doc_stride,
                     return_overflowing_tokens=True, return_offsets_mapping=True)


_NOT_INPUTS = ("offset_mapping", "overflow_to_sample_mapping")


def _context_range(sequence_ids: list[int | None]) -> tuple[int, int]:
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    return first, last


def train_features(tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int,
                   doc_stride: int) -> list[dict]:
    """One feature per window, labelled with the token span of the first gold answer."""
    enc = _encode(tokenizer, examples, max_length, doc_stride)
    features = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        example = examples[enc["overflow_to_sample_mapping"][i]]
        sequence_ids = enc.sequence_ids(i)
        if 1 not in sequence_ids:  # question alone fills the window
            continue
        ctx_first, ctx_last = _context_range(sequence_ids)
        answer_start = example["answers"]["answer_start"][0]
        answer_end = answer_start + len(example["answers"]["text"][0])
        start = end = 0
        if offsets[ctx_first][0] <= answer_start and offsets[ctx_last][1] >= answer_end:
            start = ctx_first
            while start <= ctx_last and offsets[start][1] <= answer_start:
                start += 1
            end = ctx_last
            while end >= ctx_first and offsets[end][0] >= answer_end:
                end -= 1
        feature = {key: enc[key][i] for key in enc.keys() if key not in _NOT_INPUTS}
        feature.update(start_positions=start, end_positions=end)
        features.append(feature)
    return features


def eval_features(tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int,
                  doc_stride: int) -> list[dict]:
    """Windows with the example they come from and the character offsets of their context tokens."""
    enc = _encode(tokenizer, examples, max_length, doc_stride)
    features = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        sequence_ids = enc.sequence_ids(i)
        if 1 not in sequence_ids:
            continue
        feature = {key: enc[key][i] for key in enc.keys() if key not in _NOT_INPUTS}
        feature["example"] = enc["overflow_to_sample_mapping"][i]
        feature["context_offsets"] = [tuple(o) if s == 1 else None for o, s in zip(offsets, sequence_ids)]
        features.append(feature)
    return features


def best_answers(examples: list[dict], features: list[dict], outputs: list[dict[str, torch.Tensor]],
                 max_answer_tokens: int, n_best: int = 20) -> dict[str, str]:
    """Question id -> the context span with the highest start + end logit over all of its windows."""
    best: dict[int, tuple[float, str]] = {}
    for feature, out in zip(features, outputs):
        offsets = feature["context_offsets"]
        start_logits, end_logits = out["start_logits"], out["end_logits"]
        k = min(n_best, len(offsets))
        starts = torch.topk(start_logits, k).indices.tolist()
        ends = torch.topk(end_logits, k).indices.tolist()
        context = examples[feature["example"]]["context"]
        for s in starts:
            if offsets[s] is None:
                continue
            for e in ends:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_tokens:
                    continue
                score = float(start_logits[s] + end_logits[e])
                if feature["example"] not in best or score > best[feature["example"]][0]:
                    best[feature["example"]] = (score, context[offsets[s][0]:offsets[e][1]])
    return {examples[i]["id"]: best[i][1] if i in best else "" for i in range(len(examples))}
