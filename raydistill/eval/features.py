"""Tokenising task examples into model features: sentence (pair) classification and word-level tagging.

Word-to-subword alignment works through character offsets rather than ``is_split_into_words``, so it is the
same for WordPiece encoders and byte-level BPE decoders: the words are joined with spaces, and each
sub-token belongs to the word holding its last character. The first sub-token of a word carries the
word's label; the others are ignored (-100) in the loss and in prediction.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from raydistill.eval.loop import IGNORE


def _pair_texts(tokenizer: PreTrainedTokenizerBase, examples: list[dict]) -> tuple[list[str], list[str] | None]:
    a = [e["text_a"] for e in examples]
    if examples[0]["text_b"] is None:
        return a, None
    b = [e["text_b"] for e in examples]
    if tokenizer.sep_token is None:
        # Decoder tokenizers have no pair template: join the texts around the end-of-text token so the
        # model still sees where the first one ends.
        sep = tokenizer.eos_token or "\n"
        return [f"{x} {sep} {y}" for x, y in zip(a, b)], None
    return a, b


def encode_classification(tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int,
                          regression: bool) -> list[dict]:
    a, b = _pair_texts(tokenizer, examples)
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    features = []
    for i, example in enumerate(examples):
        feature = {key: enc[key][i] for key in enc.keys()}
        feature["labels"] = float(example["label"]) if regression else int(example["label"])
        features.append(feature)
    return features


def encode_tagging(tokenizer: PreTrainedTokenizerBase, examples: list[dict], label_ids: dict[str, int],
                   max_length: int) -> list[dict]:
    """Features with ``labels`` on each word's first sub-token and ``word_index`` (sub-token -> word, -1
    elsewhere). Words cut off by ``max_length`` get no sub-token (they are predicted "O")."""
    texts, char_to_word = [], []
    for e in examples:
        owner: list[int] = []
        for w, word in enumerate(e["tokens"]):
            if w:
                owner.append(-1)  # the joining space
            owner.extend([w] * len(word))
        texts.append(" ".join(e["tokens"]))
        char_to_word.append(owner)
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    features = []
    for i, example in enumerate(examples):
        word_index, labels = [], []
        seen: set[int] = set()
        for start, end in enc["offset_mapping"][i]:
            w = char_to_word[i][end - 1] if end > start else -1
            first = w >= 0 and w not in seen
            if first:
                seen.add(w)
            word_index.append(w if first else -1)
            labels.append(label_ids[example["tags"][w]] if first else IGNORE)
        feature = {key: enc[key][i] for key in enc.keys() if key != "offset_mapping"}
        feature.update(labels=labels, word_index=word_index)
        features.append(feature)
    return features
