"""Tokenizers: a Hugging Face tokenizer by name or directory, or one trained locally on the corpus and
cached by content hash (WordPiece for encoders, byte-level BPE for decoders)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from raydistill.errors import ConfigError

BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}
BPE_SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<pad>"}


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a fast tokenizer on ``texts``; ``kind`` is 'wordpiece' (BERT-style) or 'bpe' (GPT-2-style)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        specials = list(dict.fromkeys(BERT_SPECIALS.values()))
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                                    show_progress=False))
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, **BERT_SPECIALS)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = list(dict.fromkeys(BPE_SPECIALS.values()))
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
        return PreTrainedTokenizerFast(tokenizer_object=tok, **BPE_SPECIALS)
    raise ConfigError(f"tokenizer.kind {kind!r}: allowed 'wordpiece' or 'bpe'")


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer {name!r} could not be loaded ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:  # decoders (GPT-2, Llama) ship without one; padding is masked out anyway
        tok.pad_token = tok.eos_token
    return tok


def cached_tokenizer(cache_root: str | Path, key: dict, texts: Iterable[str], kind: str,
                     vocab_size: int) -> PreTrainedTokenizerFast:
    """Train once per (corpus, kind, size); later runs (and sweep trials) load the cached copy. ``texts`` is
    iterated once, only when training (an iterable that reads the corpus piece by piece keeps it out of
    memory: the trainer keeps word counts, not documents)."""
    digest = hashlib.sha256(json.dumps({**key, "kind": kind, "vocab": vocab_size}, sort_keys=True).encode())
    target = Path(cache_root) / "tokenizers" / digest.hexdigest()[:16]
    if not (target / "tokenizer.json").is_file():
        tok = train_tokenizer(texts, kind, vocab_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: concurrent trials never see half a tokenizer
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target)
