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


# ----------------------------------------------------------------------------------------------- pieces
def _whole_file_docs(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def test_pieces_of_a_file_read_the_documents_of_the_whole_file(tmp_path, monkeypatch):
    """Text and jsonl files cut into byte ranges (lines belong to the piece they start in), parquet into row
    groups: the pieces' documents in turn are the whole file's, whatever the cut points."""
    import pandas as pd

    from raydistill.config import DataSpec
    from raydistill.data import sources
    from raydistill.data.corpus import load_corpus

    lines = ["short", "", "  padded  ", "é unicode ünïcödé €", "x" * 200, "\r", "crlf line", "", "last"]
    text = "\r\n".join(lines[:6]) + "\n" + "\n".join(lines[6:]) + "\n\n"
    (tmp_path / "a.txt").write_text(text)
    rows = [{"text": f"row {i} " + "é" * (i % 5)} for i in range(40)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" + ("\n" if i % 7 == 0 else "") for i, r in
                                              enumerate(rows)))
    pd.DataFrame({"text": [f"pq {i}" if i % 4 else None for i in range(25)]}).to_parquet(
        tmp_path / "c.parquet", row_group_size=4)
    spec = DataSpec(path=[str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")],
                    validation_path=str(tmp_path / "a.txt"))
    expected = (_whole_file_docs(tmp_path / "a.txt") + [r["text"] for r in rows]
                + [f"pq {i}" for i in range(25) if i % 4])
    whole = load_corpus(spec)
    assert whole[0] == expected
    for size in (1, 3, 16, 37, 1000):
        monkeypatch.setattr(sources, "PIECE_BYTES", size)
        pieces = sources.list_pieces(spec)
        assert len(pieces) > 9 if size < 100 else True
        assert [d for p in pieces if p.role == "main" for d in sources.read_piece(p)] == expected, size
        assert load_corpus(spec) == whole


def test_errors_in_later_pieces_name_the_file_line_and_offset(tmp_path, monkeypatch):
    from raydistill.config import DataSpec
    from raydistill.data import sources
    from raydistill.data.corpus import load_corpus
    from raydistill.errors import ConfigError

    monkeypatch.setattr(sources, "PIECE_BYTES", 20)
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(6)) + "{oops\n")
    with pytest.raises(ConfigError, match=r"data\.path: .*bad\.jsonl:7: not valid JSON"):
        load_corpus(DataSpec(path=str(tmp_path / "bad.jsonl")))
    (tmp_path / "bin.txt").write_bytes(b"fine text line\n" * 4 + b"\xff\xfe binary\n")
    with pytest.raises(ConfigError, match=r"bin\.txt' is not UTF-8 text \(byte 0xff at offset 60"):
        load_corpus(DataSpec(path=str(tmp_path / "bin.txt")))


# ----------------------------------------------------------------------------------------------- shards
def _sharded(tmp: Path, streams: list[list[int]], block_size: int, encoder: bool):
    from raydistill.data.shards import ShardedBlocks, write_array

    paths = []
    for i, s in enumerate(streams):
        if s:
            write_array(str(tmp / f"s{i}.npy"), np.asarray(s, dtype=np.uint16))
            paths.append(f"s{i}.npy")
    return ShardedBlocks(root=str(tmp), split="train", shards=paths, tokens=[len(s) for s in streams if s],
                         block_size=block_size, is_encoder=encoder, pad_id=0, cls_id=1 if encoder else None,
                         sep_id=2 if encoder else None, key="k")


@pytest.mark.parametrize("encoder", [False, True])
def test_sharded_blocks_are_the_packed_blocks(tmp_path, encoder):
    """Blocks read from a split's token shards (cut anywhere, some empty) equal ``pack`` over its documents."""
    import pickle

    from raydistill.data.blocks import pack

    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 500, rng.integers(1, 40)).tolist() for _ in range(60)]
    sep = 2 if encoder else 3
    stream = [t for d in docs for t in (*d, sep)]
    cuts = sorted(rng.choice(len(stream), 6, replace=False).tolist())
    parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    parts.insert(3, [])  # a piece without tokens of this split
    for block_size in (8, 13, 64):
        kw = dict(pad_id=0, bos_id=None, eos_id=None, sep_id=2, cls_id=1) if encoder else \
            dict(pad_id=0, bos_id=None, eos_id=3)
        want = pack(docs, block_size, **kw)
        got = _sharded(tmp_path, parts, block_size, encoder)
        assert len(got) == len(want)
        idx = rng.permutation(len(want))
        ids, lengths = got.take(idx)
        assert np.array_equal(ids, want.ids[idx]) and np.array_equal(lengths, want.lengths[idx])
        assert ids.dtype == np.int32 and lengths.dtype == np.int32
        assert np.array_equal(got.ids[idx[:5]], want.ids[idx[:5]]) and got.lengths[-1] == want.lengths[-1]
        assert np.array_equal(got.ids[2:5], want.ids[2:5])
        full = got.materialize()
        assert np.array_equal(full.ids, want.ids) and np.array_equal(full.lengths, want.lengths)
        again = pickle.loads(pickle.dumps(got))
        assert len(pickle.dumps(got)) < 2000 and not again._maps
        assert np.array_equal(again.take(idx)[0], want.ids[idx])


def test_the_driver_hands_out_descriptions_and_reuses_the_cache(tmp_path, monkeypatch):
    """prepare's blocks pickle to a few KB (the object store carries no corpus); a second prepare reads no
    document (the manifest is found by content hash), and another block size shares the same shards."""
    import pickle

    from raydistill.data import sources
    from raydistill.data.shards import ShardedBlocks
    from raydistill.train.plan import prepare

    overrides = case_overrides(tmp_path)["files-gpt2"]
    first = prepare(config(tmp_path, overrides))
    train, val = first.fetch_blocks()
    assert isinstance(train, ShardedBlocks) and len(pickle.dumps(first.blocks)) < 4000

    def no_reading(piece):
        raise AssertionError(f"read {piece} although the corpus is cached")

    monkeypatch.setattr(sources, "read_piece", no_reading)
    again = prepare(config(tmp_path, overrides))
    assert again.blocks[0].root == train.root and again.blocks[0].shards == train.shards
    wider = prepare(config(tmp_path, overrides, "data.block_size=48"))
    assert wider.blocks[0].root == train.root and len(wider.blocks[0]) < len(train)
    assert wider.blocks[0].take([0])[0].shape == (1, 48)


def test_how_and_where_a_corpus_is_prepared_do_not_change_its_key(tmp_path):
    """The cache key (and the tokenizer's and pretrained teachers', which use data_key) ignores the block
    size, masking, data.pipeline and data.cache_uri; hub.streaming enters it only when set."""
    from raydistill.config import DataSpec
    from raydistill.data.pipeline import data_key

    base = data_key(DataSpec())
    assert base == data_key(DataSpec(block_size=64, mlm_probability=0.3, pipeline="ray", cache_uri="s3://b/p"))
    assert "pipeline" not in base["data"] and "cache_uri" not in base["data"]
    hub = data_key(DataSpec(hub={"name": "x"}))
    assert "streaming" not in hub["data"]["hub"]
    assert data_key(DataSpec(hub={"name": "x", "streaming": True}))["data"]["hub"]["streaming"] is True


def test_progress_lines_show_pieces_bytes_tokens_and_rate():
    import io

    from raydistill.data.pipeline import Progress

    out = io.StringIO()
    p = Progress("tokenize", 4, 8_000_000, out, every_s=0.0)
    p.update({"bytes": 2_000_000, "train_tokens": 400_000, "val_tokens": 100_000, "docs": 10, "node": "a"})
    line = out.getvalue()
    assert "tokenize 1/4 pieces" in line and "2.0/8.0 MB" in line and "0.50M tokens" in line and "ETA" in line
    quiet = io.StringIO()
    q = Progress("count", 1, 10, quiet)  # a stage that ends within every_s prints nothing (small corpora)
    q.update({"bytes": 10, "docs": 3})
    assert quiet.getvalue() == ""


# ----------------------------------------------------------------------------------------------- storage
def test_corpus_and_shards_on_object_storage(tmp_path, s3_server, monkeypatch):
    """Corpus files read from s3:// (a glob), shards written to s3:// (data.cache_uri) and downloaded once per
    node on first use: the same batches as the local files."""
    import pyarrow.fs as pafs

    from raydistill.data.shards import ShardedBlocks
    from raydistill.train.plan import prepare

    overrides = case_overrides(tmp_path)["files-gpt2"]
    fs, _ = pafs.FileSystem.from_uri(f"s3://bucket?{s3_server}")
    for name in ("a.txt", "b.jsonl"):
        with fs.open_output_stream(f"bucket/corpus/{name}") as f:
            f.write((tmp_path / "files" / name).read_bytes())
    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path / "node-cache"))
    remote = [o for o in overrides if not o.startswith("data.path=")] + [
        f"data.path=s3://bucket/corpus/*?{s3_server}",  # a.txt, b.jsonl: the local case's order
        f"data.cache_uri=s3://bucket/shards?{s3_server}", "data.pipeline=local"]
    plan = prepare(config(tmp_path, remote))
    blocks = plan.fetch_blocks()
    assert isinstance(blocks[0], ShardedBlocks) and blocks[0].root.startswith("s3://bucket/shards/corpus-")
    assert batches_digest(blocks, plan.token_info, plan.cfg.train.seed) == TODAY["files-gpt2"]
    assert list((tmp_path / "node-cache" / "data-remote").rglob("*.npy"))  # downloaded to this node's cache


def test_hub_datasets_downloaded_or_streamed(tmp_path):
    """A hub dataset (here a local folder, offline) read whole or streamed shard by shard: the same blocks."""
    import pandas as pd

    from raydistill.train.plan import prepare

    hub = tmp_path / "hubset"
    hub.mkdir()
    docs = generate_documents(200, seed=5)
    pd.DataFrame({"text": docs[:100]}).to_parquet(hub / "train-00000-of-00002.parquet", row_group_size=16)
    pd.DataFrame({"text": docs[100:180] + ["   "]}).to_parquet(hub / "train-00001-of-00002.parquet")
    pd.DataFrame({"text": docs[180:]}).to_parquet(hub / "validation-00000-of-00001.parquet")
    base = ["teacher.name=tiny-gpt2", f"data.hub.name={hub}", "data.hub.validation_split=validation",
            "data.pipeline=local"]
    whole = prepare(config(tmp_path, base))
    streamed = prepare(config(tmp_path, base + ["data.hub.streaming=true"]))
    assert whole.blocks[0].root != streamed.blocks[0].root  # streaming is part of the key
    assert batches_digest(whole.fetch_blocks(), whole.token_info, 0) == \
        batches_digest(streamed.fetch_blocks(), streamed.token_info, 0)
    assert len(streamed.blocks[0].shards) == 2  # one piece per streamed shard


# ----------------------------------------------------------------------------------------------- on Ray
@pytest.mark.e2e
def test_the_ray_data_pipeline_packs_the_same_blocks(ray_cluster, cases):
    """data.pipeline=ray: Ray Data tasks count the documents (held-out split) and tokenize the pieces; the
    blocks and batches are those of the in-memory pipeline."""
    from raydistill.data.shards import read_manifest
    from raydistill.train.plan import prepare

    tmp, overrides = cases
    for name in ("files-gpt2", "files-bert-val"):
        plan = prepare(config(tmp, overrides[name], "data.pipeline=ray", f"cache_dir={tmp}/ray-cache"))
        manifest = read_manifest(plan.blocks[0].root)
        assert manifest["pipeline"] == "ray" and manifest["nodes"] == 1
        assert batches_digest(plan.fetch_blocks(), plan.token_info, plan.cfg.train.seed) == TODAY[name]


def test_bench_samplers_see_ray_workers_by_their_process_title_and_the_cpu_load():
    import subprocess
    import sys
    import time

    from raydistill.bench.data import RssSampler
    from raydistill.bench.sweep import CpuSampler

    # A process whose command line carries Ray Train's worker title, as `ps` shows a RayTrainWorker actor.
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(3)",
                              "ray::RayTrainWorker"])
    try:
        with CpuSampler() as cpu, RssSampler(every_s=0.1) as rss:
            time.sleep(2.2)
    finally:
        child.kill()
    # (Ray processes of earlier tests may still be exiting: only the child's own reading is certain.)
    assert rss.peaks["train_worker"] > 64 << 20, rss.peaks
    assert 1 <= len(cpu.samples) <= 3 and all(0 <= s <= 100 for s in cpu.samples), cpu.samples
    assert cpu.mean == round(sum(cpu.samples) / len(cpu.samples), 1)
