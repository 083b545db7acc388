"""The corpus pipeline (read, tokenize, pack, shards on storage): batches stay exactly what they were.

The digests below were computed with the in-memory pipeline this one replaced (one ``.npz`` per corpus, the
whole corpus in the driver), on the same configs: the built-in corpus and local text/jsonl files, decoder
(byte-level BPE trained here: its training is deterministic) and encoder (a WordPiece vocabulary fixed by the
corpus: training WordPiece is not deterministic from one process to the next, so the test names the vocabulary).
A digest covers every packed block of both splits, training batches at several steps, micro-steps and ranks,
and validation batches."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from raydistill.config import load_config
from raydistill.data.blocks import BatchSampler
from raydistill.data.synthetic import generate_documents

# name -> (digest, training blocks, validation blocks), from the pipeline before issue 17.
TODAY = {
    "builtin-gpt2": ("3aab7d230a831a5ea38bde6406c82a1e", 1194, 58),
    "builtin-bert": ("8534d919a8db252a608bee1cf7f83bf5", 666, 32),
    "files-gpt2": ("774572779a57205645df5a2351826b85", 429, 53),
    "files-bert-val": ("bdcc030e9b6baf719c6bbcb85ebb4f61", 130, 168),
}


def write_corpus_files(root: Path) -> None:
    docs = generate_documents(120, seed=11)
    (root / "a.txt").write_text("\n\n".join(docs[:60]) + "\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[60:]))


def fixed_wordpiece(root: Path) -> str:
    """A WordPiece tokenizer whose vocabulary is a function of the built-in corpus alone."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from raydistill.data.tokenizer import BERT_SPECIALS

    docs = generate_documents(300, seed=0)
    words = Counter(w for d in docs for w in re.findall(r"\w+|[^\w\s]", d.lower()))
    chars = sorted({c for w in words for c in w})
    vocab = list(dict.fromkeys([*BERT_SPECIALS.values(), *chars, *("##" + c for c in chars),
                                *sorted(words, key=lambda w: (-words[w], w))[:150]]))
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tok, **BERT_SPECIALS).save_pretrained(root / "wordpiece")
    return str(root / "wordpiece")


def _update(h, batch: dict) -> None:
    for key in sorted(batch):
        h.update(key.encode())
        h.update(batch[key].numpy().tobytes())


def batches_digest(blocks, token_info, seed: int) -> tuple[str, int, int]:
    """Digest of every block of both splits and of batches at several (step, micro-step, rank)."""
    h = hashlib.sha256()
    for b in blocks:
        every = np.arange(len(b))
        h.update(np.ascontiguousarray(b.ids[every], dtype=np.int32).tobytes())
        h.update(np.ascontiguousarray(b.lengths[every], dtype=np.int32).tobytes())
    for rank in (0, 1):
        train = BatchSampler(blocks[0], token_info, batch_size=3, grad_accum=2, rank=rank, world_size=2, seed=seed)
        for step in (1, 2, 7, 40):
            for micro in (0, 1):
                _update(h, train.batch(step, micro))
        val = BatchSampler(blocks[1], token_info, batch_size=3, grad_accum=1, rank=rank, world_size=2, seed=seed)
        for batch in val.eval_batches(3, seed):
            _update(h, batch)
    return h.hexdigest()[:32], len(blocks[0]), len(blocks[1])


def case_overrides(tmp: Path) -> dict[str, list[str]]:
    (tmp / "files").mkdir(parents=True, exist_ok=True)
    write_corpus_files(tmp / "files")
    wp = fixed_wordpiece(tmp)
    files = tmp / "files"
    return {
        "builtin-gpt2": ["teacher.name=tiny-gpt2", "data.builtin.num_documents=300"],
        "builtin-bert": ["teacher.name=tiny-bert", f"tokenizer.name={wp}", "data.builtin.num_documents=300",
                         "data.mlm_probability=0.2"],
        "files-gpt2": ["teacher.name=tiny-gpt2", f"data.path=[{files}/a.txt,{files}/b.jsonl]", "data.text_field=body",
                       "data.validation_fraction=0.1"],
        "files-bert-val": ["teacher.name=tiny-bert", f"tokenizer.name={wp}", f"data.path={files}/b.jsonl",
                           "data.text_field=body", f"data.validation_path={files}/a.txt", "data.max_documents=50"],
    }


def config(tmp: Path, overrides: list[str], *extra: str):
    return load_config(None, [f"cache_dir={tmp}/cache", f"output_dir={tmp}/run", "data.block_size=32",
                              "tokenizer.vocab_size=300", *overrides, *extra])


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    return tmp, case_overrides(tmp)


@pytest.mark.parametrize("name", sorted(TODAY))
def test_batches_are_identical_to_the_in_memory_pipeline(cases, name):
    from raydistill.train.plan import prepare

    tmp, overrides = cases
    plan = prepare(config(tmp, overrides[name]))
    assert batches_digest(plan.fetch_blocks(), plan.token_info, plan.cfg.train.seed) == TODAY[name]
