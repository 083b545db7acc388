"""Data pipeline: masking, labels, packing, deterministic sharding, corpora and tokenizers."""

import json

import numpy as np
import pytest
import torch

from conftest import shared_data
from raydistill.config import DataSpec
from raydistill.data.blocks import BatchSampler, Blocks, TokenInfo, pack
from raydistill.data.corpus import load_corpus
from raydistill.data.masking import mask_tokens, next_token_labels
from raydistill.data.tokenizer import cached_tokenizer
from raydistill.errors import ConfigError


def test_mlm_masking_rates_and_special_tokens():
    ids = torch.randint(10, 1000, (200, 100))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    inputs, labels = mask_tokens(ids, special, mask_id=3, vocab_size=1000, probability=0.15,
                                 generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[special].any()
    assert chosen.float().mean().item() == pytest.approx(0.15 * 98 / 100, abs=0.01)
    assert torch.equal(labels[chosen], ids[chosen])
    as_mask = (inputs == 3)[chosen].float().mean().item()
    kept = (inputs == ids)[chosen].float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / 1000, abs=0.02)  # 10% kept (+ random draws of the same id)
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_every_row_gets_a_target():
    ids = torch.randint(10, 50, (64, 4))
    _, labels = mask_tokens(ids, torch.zeros_like(ids, dtype=torch.bool), 3, 50, 0.01, torch.Generator().manual_seed(1))
    assert ((labels != -100).sum(1) >= 1).all()


def test_next_token_labels_shift_and_ignore_padding():
    ids = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert next_token_labels(ids, mask).tolist() == [[6, 7, -100, -100]]


def test_pack_encoder_and_decoder_blocks():
    enc = pack([[10, 11, 12], [13, 14]], 5, pad_id=0, bos_id=None, eos_id=None, sep_id=2, cls_id=1)
    assert enc.ids.tolist() == [[1, 10, 11, 12, 2], [1, 2, 13, 14, 2], [1, 2, 2, 0, 0]]
    assert enc.lengths.tolist() == [5, 5, 3]
    dec = pack([[10, 11, 12], [13]], 3, pad_id=0, bos_id=9, eos_id=9)
    assert dec.ids.tolist() == [[10, 11, 12], [9, 13, 9]]


def test_batches_are_deterministic_disjoint_across_ranks_and_cover_the_epoch():
    blocks = Blocks(np.arange(48 * 4, dtype=np.int32).reshape(48, 4) + 10, np.full(48, 4, dtype=np.int32))
    info = TokenInfo(is_encoder=False, vocab_size=500, pad_id=0, mask_id=None, special_ids=(0,))
    samplers = [BatchSampler(blocks, info, batch_size=3, grad_accum=2, rank=r, world_size=2, seed=7) for r in (0, 1)]
    seen = [i for step in (1, 2, 3, 4) for m in (0, 1) for s in samplers for i in s.indices(step, m)]
    assert sorted(seen) == list(range(48))  # one epoch = 4 steps x 2 micro x 2 ranks x 3
    again = BatchSampler(blocks, info, batch_size=3, grad_accum=2, rank=1, world_size=2, seed=7)
    assert torch.equal(again.batch(3, 1)["input_ids"], samplers[1].batch(3, 1)["input_ids"])
    assert not np.array_equal(samplers[0].indices(5, 0), samplers[0].indices(1, 0))  # reshuffled next epoch


def test_local_file_formats_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "c.csv").write_text("text,other\nfrom csv,1\n")
    import pandas as pd

    pd.DataFrame({"text": ["from parquet"]}).to_parquet(tmp_path / "d.parquet")
    spec = DataSpec(path=str(tmp_path / "*"), validation_path=str(tmp_path / "a.txt"))
    train, val = load_corpus(spec)
    assert train == ["first line", "second line", "from jsonl", "from csv", "from parquet"]
    assert val == ["first line", "second line"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ConfigError, match=r"data\.text_field: .*bad.jsonl:1 has no field 'text'"):
        load_corpus(DataSpec(path=str(tmp_path / "bad.jsonl")))


def test_wikitext2_loads_as_a_local_corpus():
    root = shared_data("wikitext-2")
    spec = DataSpec(path=str(root / "wiki.train.tokens"), validation_path=str(root / "wiki.valid.tokens"))
    train, val = load_corpus(spec)
    assert len(train) > 20000 and len(val) > 2000
    assert sum(len(d.split()) for d in train) > 1_900_000


def test_builtin_corpus_holds_out_a_validation_fraction():
    train, val = load_corpus(DataSpec(builtin={"num_documents": 200, "seed": 3}, validation_fraction=0.1))
    assert len(val) == 20 and len(train) == 180 and not set(train) & set(val)


def test_tokenizer_is_trained_once_and_cached(tmp_path):
    texts = ["the cat sits on the mat"] * 50 + ["a dog runs"] * 50
    tok = cached_tokenizer(tmp_path, {"k": 1}, texts, "wordpiece", 100)
    assert tok.mask_token == "[MASK]" and tok("the cat")["input_ids"][0] == tok.cls_token_id
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1
    again = cached_tokenizer(tmp_path, {"k": 1}, [], "wordpiece", 100)  # no texts needed: loaded
    assert again.get_vocab() == tok.get_vocab()
    bpe = cached_tokenizer(tmp_path, {"k": 1}, texts, "bpe", 300)
    assert bpe.pad_token == "<pad>" and bpe.decode(bpe("the cat")["input_ids"]) == "the cat"


def test_a_sequence_is_masked_alike_in_any_micro_batch_or_worker():
    """MLM masking is drawn per row from the row's stream position: the same sequences split over micro-batches
    or workers get the same targets (the split-invariance contract of tests/test_normalisation.py)."""
    blocks = Blocks(np.arange(40 * 12, dtype=np.int64).reshape(40, 12) % 300 + 10, np.full(40, 12, dtype=np.int32))
    info = TokenInfo(is_encoder=True, vocab_size=400, pad_id=0, mask_id=3, special_ids=(0, 1, 2))
    one = BatchSampler(blocks, info, batch_size=4, grad_accum=1, rank=0, world_size=1, seed=5).batch(2, 0)
    micro = BatchSampler(blocks, info, batch_size=2, grad_accum=2, rank=0, world_size=1, seed=5)
    ranks = [BatchSampler(blocks, info, batch_size=2, grad_accum=1, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for parts in ([micro.batch(2, 0), micro.batch(2, 1)], [ranks[0].batch(2), ranks[1].batch(2)]):
        for key in ("input_ids", "labels", "sample_ids"):
            assert torch.equal(torch.cat([p[key] for p in parts]), one[key]), key
    assert one["sample_ids"].tolist() == [4, 5, 6, 7]


def test_decoder_batches_mark_bos_eos_so_iit_spans_skip_them():
    from raydistill.interventions import plan_generator, sample_plan

    bos = eos = 2
    docs = [list(range(10, 10 + n)) for n in (3, 5, 2, 7, 4, 6, 3, 5)]
    blocks = pack(docs * 4, 16, pad_id=0, bos_id=bos, eos_id=eos)
    info = TokenInfo(is_encoder=False, vocab_size=100, pad_id=0, mask_id=None, special_ids=(0, bos))
    batch = BatchSampler(blocks, info, batch_size=len(blocks), grad_accum=1, rank=0, world_size=1, seed=0).batch(1)
    special = batch["special_tokens_mask"].bool()
    assert torch.equal(special, (batch["input_ids"] == eos) | ~batch["attention_mask"].bool())
    assert special.any()
    hits = 0
    for seed in range(50):
        plan = sample_plan(batch["attention_mask"], batch["special_tokens_mask"], plan_generator(seed, 1),
                           proportion=0.5)
        assert not special[plan.base.rows, plan.base.cols].any()
        assert not special[plan.source.rows, plan.source.cols].any()
        with_special = sample_plan(batch["attention_mask"], batch["special_tokens_mask"], plan_generator(seed, 1),
                                   proportion=0.5, include_special_tokens=True)
        hits += int(special[with_special.base.rows, with_special.base.cols].any())
    assert hits > 0  # include_special_tokens: true lets them in
