"""Corpus -> tokenizer -> packed blocks, cached on disk by content hash so sweeps pay for it once."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from raydistill.config import DataSpec
from raydistill.data.blocks import Blocks, TokenInfo, pack


def data_key(spec: DataSpec) -> dict:
    """What determines the corpus: the data section plus size and mtime of every local file."""
    files = [*(spec.path or []), *(spec.validation_path or [])] if spec.source == "files" else []
    stamps = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in files]
    return {"data": spec.model_dump(mode="json", exclude={"block_size", "mlm_probability"}), "files": stamps}


def token_info(tok: PreTrainedTokenizerBase, is_encoder: bool) -> TokenInfo:
    return TokenInfo(is_encoder=is_encoder, vocab_size=len(tok), pad_id=tok.pad_token_id,
                     mask_id=tok.mask_token_id, special_ids=tuple(sorted(set(tok.all_special_ids))))


def tokenize_and_pack(docs: list[str], tok: PreTrainedTokenizerBase, block_size: int, is_encoder: bool) -> Blocks:
    ids = tok(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return pack(ids, block_size, pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                sep_id=tok.sep_token_id if is_encoder else None, cls_id=tok.cls_token_id if is_encoder else None)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16] if tok.is_fast else \
        hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


def packed_corpus(spec: DataSpec, docs: tuple[list[str], list[str]], tok: PreTrainedTokenizerBase,
                  is_encoder: bool, cache_root: str | Path) -> tuple[Blocks, Blocks]:
    key = json.dumps({**data_key(spec), "block": spec.block_size, "enc": is_encoder,
                      "tok": tokenizer_fingerprint(tok)}, sort_keys=True)
    path = Path(cache_root) / "data" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".npz")
    if path.is_file():
        z = np.load(path)
        return Blocks(z["train_ids"], z["train_len"]), Blocks(z["val_ids"], z["val_len"])
    train = tokenize_and_pack(docs[0], tok, spec.block_size, is_encoder)
    val = tokenize_and_pack(docs[1], tok, spec.block_size, is_encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, train_ids=train.ids, train_len=train.lengths, val_ids=val.ids, val_len=val.lengths)
    os.replace(tmp, path)
    return train, val
