"""Corpus -> tokenizer -> packed token shards on storage, cached by content hash so runs and sweep trials pay
for it once.

The work is cut into pieces (``sources.py``) and done by the same two functions wherever it runs: in the
driver process for small corpora, or as a Ray Data pipeline (``map_batches`` over the pieces, one CPU per
task) that spreads over every node of the cluster:

1. *count* (only when a validation split is held out of the corpus, or ``max_documents`` caps it): each
   piece's number of documents. The driver then draws the held-out documents exactly as the in-memory
   pipeline did (a seeded permutation of all document indices) and gives each piece its list.
2. *tokenize*: each piece reads its documents, tokenizes them, appends separators as ``pack`` does and
   writes its part of the training and validation token streams as one ``.npy`` shard each, straight to
   the cache (a local directory, a filesystem every node mounts, or s3/gs).

The driver only lists pieces, draws the hold-out and writes the manifest (last: a corpus with a manifest is
complete). It never holds the corpus; the blocks it hands to the workers describe the shards
(``shards.ShardedBlocks``). Progress lines show pieces, bytes and tokens done, the rate and an estimate of
the time left."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from raydistill.data import sources
from raydistill.data.shards import (FORMAT, ShardedBlocks, new_build_id, open_split, read_manifest, token_dtype,
                                    write_array, write_manifest)
from raydistill.data.sources import Piece, is_uri, uri_join
from raydistill.errors import ConfigError

if TYPE_CHECKING:  # pipeline tasks import this module on every node: no torch, no config models there
    from transformers import PreTrainedTokenizerBase

    from raydistill.config import DataSpec
    from raydistill.data.blocks import Blocks, TokenInfo

AUTO_RAY_BYTES = 64 << 20  # data.pipeline: auto prepares corpora with more input than this on Ray
TOKENIZE_BATCH = 1024  # documents per tokenizer call inside a piece
PROGRESS_EVERY_S = 5.0


def data_key(spec: DataSpec) -> dict:
    """What determines the corpus: the data section plus size and mtime of every file. Settings that change
    how or where it is prepared, not what it holds (block size, masking, pipeline, cache location), are left
    out, so those caches (tokenizer, packed shards, pretrained teachers) survive changing them."""
    dumped = spec.model_dump(mode="json", exclude={"block_size", "mlm_probability", "pipeline", "cache_uri"})
    hub = dumped.get("hub")
    if isinstance(hub, dict) and not hub.get("streaming"):
        hub.pop("streaming", None)
    return {"data": dumped, "files": [list(s) for s in sources.stamps(spec)]}


def token_info(tok: PreTrainedTokenizerBase, is_encoder: bool) -> TokenInfo:
    from raydistill.data.blocks import TokenInfo

    return TokenInfo(is_encoder=is_encoder, vocab_size=len(tok), pad_id=tok.pad_token_id,
                     mask_id=tok.mask_token_id, special_ids=tuple(sorted(set(tok.all_special_ids))))


def tokenize_and_pack(docs: list[str], tok: PreTrainedTokenizerBase, block_size: int, is_encoder: bool) -> Blocks:
    """In memory, for small document lists (the shards hold the same blocks)."""
    from raydistill.data.blocks import pack

    ids = tok(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return pack(ids, block_size, pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                sep_id=tok.sep_token_id if is_encoder else None, cls_id=tok.cls_token_id if is_encoder else None)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16] if tok.is_fast else \
        hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


def corpus_key(spec: DataSpec, tok: PreTrainedTokenizerBase, is_encoder: bool) -> str:
    key = json.dumps({**data_key(spec), "enc": is_encoder, "tok": tokenizer_fingerprint(tok), "format": FORMAT},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def shards_root(spec: DataSpec, cache_root: str | Path) -> str:
    """Where packed corpora live: ``data.cache_uri``, else CACHE_DIR/data."""
    uri = getattr(spec, "cache_uri", None)
    return uri if uri else str(Path(cache_root) / "data")


# ----------------------------------------------------------------------------------------------- progress
class Progress:
    """Throttled progress lines for a stage of the pipeline: pieces, input bytes, tokens, rates, ETA."""

    def __init__(self, label: str, pieces: int, total_bytes: int, out=None, every_s: float = PROGRESS_EVERY_S,
                 verbose: bool = False):
        self.label, self.pieces, self.total_bytes = label, pieces, total_bytes
        self.verbose = verbose  # a line at the end even when the stage took less than every_s
        self.printed = False
        self.done = self.bytes = self.tokens = self.docs = 0
        self.start = self.last = time.perf_counter()
        self.every_s = every_s
        self.out = out or sys.stdout
        self.nodes: dict[str, int] = {}
        self.peak_rss = 0

    def update(self, result: dict) -> None:
        self.done += 1
        self.bytes += int(result.get("bytes", 0))
        self.tokens += int(result.get("train_tokens", 0)) + int(result.get("val_tokens", 0))
        self.docs += int(result.get("docs", 0))
        node = result.get("node")
        if node:
            self.nodes[node] = self.nodes.get(node, 0) + 1
        self.peak_rss = max(self.peak_rss, int(result.get("peak_rss", 0)))
        now = time.perf_counter()
        if now - self.last >= self.every_s or (self.done == self.pieces and (self.printed or self.verbose)):
            self.last, self.printed = now, True
            print(self.line(), file=self.out, flush=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        mb, total = self.bytes / 1e6, self.total_bytes / 1e6
        frac = self.bytes / self.total_bytes if self.total_bytes else self.done / max(self.pieces, 1)
        eta = f", ETA {_duration(s * (1 - frac) / frac)}" if 0 < frac < 1 else ""
        toks = f", {self.tokens / 1e6:.2f}M tokens ({self.tokens / s / 1e6:.2f}M/s)" if self.tokens else \
            f", {self.docs} documents"
        return (f"[raydistill] data: {self.label} {self.done}/{self.pieces} pieces, {mb:.1f}/{total:.1f} MB "
                f"({mb / s:.1f} MB/s){toks}{eta}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ----------------------------------------------------------------------------------------------- the work
@dataclass
class Assignment:
    """What a piece contributes: its first ``keep`` documents (all when None); ``held``: local indices of
    those that go to validation; ``to_val``: every document goes to validation (a validation file)."""

    keep: int | None = None
    held: np.ndarray | None = None
    to_val: bool = False


@dataclass
class TokenizeJob:
    """Everything a tokenize task needs (put in the object store once; small but for the tokenizer)."""

    pieces: list[Piece]
    assignments: list[Assignment]
    tokenizer: Any
    is_encoder: bool
    dtype: str
    out: str  # the build directory (local path or URI)
    build: str

    def separators(self) -> tuple[int | None, int | None]:
        tok = self.tokenizer
        sep = tok.sep_token_id if self.is_encoder else tok.eos_token_id
        bos = tok.bos_token_id
        bos = bos if not self.is_encoder and bos is not None and bos != tok.eos_token_id else None
        return bos, sep


def _stream(docs: list[str], job: TokenizeJob) -> np.ndarray:
    """The documents' tokens, each preceded by BOS (decoders whose BOS differs from EOS) and followed by the
    separator (SEP for encoders, EOS for decoders), as ``pack`` concatenates them."""
    bos, sep = job.separators()
    parts = []
    for i in range(0, len(docs), TOKENIZE_BATCH):
        ids = job.tokenizer(docs[i:i + TOKENIZE_BATCH], add_special_tokens=False,
                            return_attention_mask=False)["input_ids"]
        flat: list[int] = []
        for doc in ids:
            if not doc:
                continue
            if bos is not None:
                flat.append(bos)
            flat.extend(doc)
            if sep is not None:
                flat.append(sep)
        ids = np.asarray(flat, dtype=np.int64)
        if ids.size and ids.max() > np.iinfo(job.dtype).max:  # never wrap around silently
            raise ValueError(f"token id {int(ids.max())} does not fit the shards' {job.dtype}")
        parts.append(ids.astype(job.dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=job.dtype)


def _node() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - the node only labels progress
        pass
    return "local"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def count_piece(piece: Piece) -> dict:
    try:
        docs = sources.read_piece(piece)
    except ConfigError as e:
        return {"error": str(e)}
    return {"docs": len(docs), "bytes": piece.nbytes, "node": _node(), "peak_rss": _peak_rss()}


def _count(pieces: list[Piece], i: int) -> dict:
    return {**count_piece(pieces[i]), "i": i}


def tokenize_piece(job: TokenizeJob, i: int) -> dict:
    piece, plan = job.pieces[i], job.assignments[i]
    began, cpu = time.time(), time.process_time()
    try:
        docs = sources.read_piece(piece)
    except ConfigError as e:
        return {"error": str(e)}
    if plan.keep is not None:
        docs = docs[:plan.keep]
    if plan.to_val:
        train, val = [], docs
    elif plan.held is not None and len(plan.held):
        held = np.zeros(len(docs), dtype=bool)
        held[plan.held] = True
        train = [d for d, h in zip(docs, held) if not h]
        val = [d for d, h in zip(docs, held) if h]
    else:
        train, val = docs, []
    out = {"i": i, "docs": len(docs), "bytes": piece.nbytes, "node": _node(), "pid": os.getpid(), "began": began}
    for split, part in (("train", train), ("val", val)):
        stream = _stream(part, job) if part else np.zeros(0, dtype=job.dtype)
        out[f"{split}_tokens"] = int(len(stream))
        if len(stream):
            rel = f"{job.build}/{split}/{i:05d}.npy"
            write_array(uri_join(job.out, rel), stream)
            out[f"{split}_path"] = rel
    out["peak_rss"] = _peak_rss()
    out["ended"] = time.time()
    out["cpu_s"] = time.process_time() - cpu
    return out


# ----------------------------------------------------------------------------------------------- runners
class LocalRunner:
    """Runs the pieces one after another in this process."""

    kind = "local"

    def map(self, fn: Callable[[int], dict], count: int, progress: Progress) -> Iterator[dict]:
        for i in range(count):
            result = fn(i)
            _raise_error(result)
            progress.update(result)
            yield result


class _PieceWorker:
    """A Ray Data ``map_batches`` actor over rows ``{"i": piece index}``: fetches the job (tokenizer, pieces)
    from the object store once, then counts or tokenizes the pieces it is given, one CPU each."""

    def __init__(self, kind: str, job_ref: list):
        import ray

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per actor, as Ray schedules it
        self.kind, self.job = kind, ray.get(job_ref[0])

    def __call__(self, batch: dict) -> dict:
        results = [_count(self.job, int(i)) if self.kind == "count" else tokenize_piece(self.job, int(i))
                   for i in batch["i"]]
        return {"result": np.array([json.dumps(r) for r in results], dtype=object)}


class RayRunner:
    """Runs the pieces as a Ray Data pipeline over the cluster's CPUs (an actor per CPU, a piece at a time)."""

    kind = "ray"

    def __init__(self):
        import ray

        self.cpus = int(ray.cluster_resources().get("CPU", 1))
        self.nodes = len([n for n in ray.nodes() if n.get("Alive")])

    def map_job(self, kind: str, job: Any, count: int, progress: Progress) -> Iterator[dict]:
        import ray
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # raydistill prints its own lines (pieces, bytes, tokens)
        ctx.execution_options.verbose_progress = False
        ref = ray.put(job)
        ds = ray.data.from_items([{"i": i} for i in range(count)], override_num_blocks=max(count, 1))
        # One actor per CPU, each with the next piece queued behind the current one: a worker never waits for
        # the driver's scheduling loop between pieces (with tasks, about 0.2 s per piece on a busy 2-core node).
        actors = max(1, min(count, self.cpus))
        ds = ds.map_batches(_PieceWorker, fn_constructor_kwargs={"kind": kind, "job_ref": [ref]}, batch_size=1,
                            num_cpus=1, zero_copy_batch=True,
                            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2))
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            _raise_error(result)
            progress.update(result)
            yield result


def _raise_error(result: dict) -> None:
    if "error" in result:
        raise ConfigError(result["error"])


def run_stage(runner, kind: str, job: Any, count: int, progress: Progress) -> list[dict]:
    """Results of every piece, in piece order."""
    if isinstance(runner, RayRunner):
        return sorted(runner.map_job(kind, job, count, progress), key=lambda r: r["i"])
    fn = (lambda i: _count(job, i)) if kind == "count" else (lambda i: tokenize_piece(job, i))
    return sorted(runner.map(fn, count, progress), key=lambda r: r["i"])


# ----------------------------------------------------------------------------------------------- the corpus
class DataSession:
    """Where the pipeline runs: the driver (small corpora) or a Ray cluster, started on first need.

    ``start_ray`` connects to (or starts) the cluster; it is called only when a corpus needs Ray and Ray is
    not initialized, and a cluster it started is shut down when the session closes (training starts its
    own later, as before)."""

    def __init__(self, start_ray: Callable[[], None] | None = None, out=None):
        self.start_ray = start_ray
        self.started = False
        self.out = out
        self.stats: list[dict] = []

    def runner(self, mode: str):
        if mode == "local":
            return LocalRunner()
        import ray

        if not ray.is_initialized():
            if self.start_ray is None:
                ray.init()
            else:
                self.start_ray()
            self.started = True
        return RayRunner()

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


@contextmanager
def data_session(start_ray: Callable[[], None] | None = None, out=None) -> Iterator[DataSession]:
    session = DataSession(start_ray, out)
    try:
        yield session
    finally:
        session.close()


class Corpus:
    """A corpus to be prepared: its pieces, the documents' split between training and validation, and
    (lazily) the training documents as a stream for tokenizer training."""

    def __init__(self, spec: DataSpec, where: str = "data", session: DataSession | None = None,
                 mode: str | None = None):
        self.spec, self.where = spec, where
        self.session = session or DataSession()
        self._mode = mode
        self._pieces: list[Piece] | None = None
        self._assignments: list[Assignment] | None = None
        self.counted: dict | None = None

    @property
    def pieces(self) -> list[Piece]:
        if self._pieces is None:
            self._pieces = sources.list_pieces(self.spec, self.where)
        return self._pieces

    @property
    def input_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def mode(self) -> str:
        """'local' or 'ray' (data.pipeline, or by size and source for auto)."""
        mode = self._mode or getattr(self.spec, "pipeline", "auto")
        if mode != "auto":
            return mode
        if self.spec.source == "builtin":
            return "local"
        remote = any(is_uri(p.location) or p.kind == "hub-stream" for p in self.pieces)
        return "ray" if remote or self.input_bytes > AUTO_RAY_BYTES else "local"

    def _needs_counts(self) -> bool:
        return not sources.has_validation(self.spec) or bool(self.spec.max_documents)

    def assignments(self) -> list[Assignment]:
        if self._assignments is not None:
            return self._assignments
        pieces = self.pieces
        main = [i for i, p in enumerate(pieces) if p.role == "main"]
        out = [Assignment(to_val=p.role == "validation") for p in pieces]
        if self._needs_counts():
            mode = self.mode()
            progress = Progress("count", len(main), sum(pieces[i].nbytes for i in main), self.session.out,
                                verbose=mode == "ray")
            results = run_stage(self.session.runner(mode), "count", [pieces[i] for i in main], len(main), progress)
            counts = np.array([r["docs"] for r in results], dtype=np.int64)
            self.counted = {"documents": int(counts.sum()), "seconds": round(progress.seconds, 2)}
            total = int(counts.sum())
            kept = min(total, self.spec.max_documents) if self.spec.max_documents else total
            starts = np.concatenate([[0], np.cumsum(counts)])
            held_mask = None
            if not sources.has_validation(self.spec):
                if kept == 0:
                    raise ConfigError(f"{self.where}: the corpus is empty")
                # As the in-memory pipeline held documents out: a seeded permutation of all indices.
                order = np.random.default_rng(self.spec.seed).permutation(kept)
                held_mask = np.zeros(kept, dtype=bool)
                held_mask[order[:max(1, int(kept * self.spec.validation_fraction))]] = True
            for j, i in enumerate(main):
                a, b = int(starts[j]), min(int(starts[j + 1]), kept)
                keep = max(0, b - a)
                out[i].keep = keep if keep < counts[j] else None
                if held_mask is not None and keep:
                    out[i].held = np.flatnonzero(held_mask[a:b]).astype(np.int32)
            if kept - (int(held_mask.sum()) if held_mask is not None else 0) <= 0:
                raise ConfigError(f"{self.where}: the corpus is empty")
        self._assignments = out
        return out

    def train_documents(self) -> Iterable[str]:
        """The training documents in order, read piece by piece when iterated (for tokenizer training)."""
        return _Documents(self, "train")

    def validation_documents(self) -> Iterable[str]:
        return _Documents(self, "val")


class _Documents:
    def __init__(self, corpus: Corpus, split: str):
        self.corpus, self.split = corpus, split

    def __iter__(self) -> Iterator[str]:
        assignments = self.corpus.assignments()
        for piece, plan in zip(self.corpus.pieces, assignments):
            if plan.to_val:
                if self.split == "val":
                    yield from sources.read_piece(piece)
                continue
            held = plan.held if plan.held is not None else np.zeros(0, dtype=np.int32)
            if self.split == "val" and not len(held):
                continue
            docs = sources.read_piece(piece)
            if plan.keep is not None:
                docs = docs[:plan.keep]
            if self.split == "val":
                yield from (docs[j] for j in held.tolist())
            else:
                skip = set(held.tolist())
                yield from (d for j, d in enumerate(docs) if j not in skip)


def packed_corpus(spec: DataSpec, corpus: Corpus, tok: PreTrainedTokenizerBase, is_encoder: bool,
                  cache_root: str | Path) -> tuple[ShardedBlocks, ShardedBlocks]:
    """(training blocks, validation blocks) of ``spec``'s corpus: read from the cache when a manifest exists
    for its content hash, otherwise prepared (in this process or on Ray) and written there first."""
    key = corpus_key(spec, tok, is_encoder)
    root = uri_join(shards_root(spec, cache_root), f"corpus-{key}")
    manifest = read_manifest(root)
    if manifest is None:
        manifest = build(corpus, tok, is_encoder, root, key)
    return (open_split(root, manifest, "train", spec.block_size), open_split(root, manifest, "val", spec.block_size))


def build(corpus: Corpus, tok: PreTrainedTokenizerBase, is_encoder: bool, root: str, key: str) -> dict:
    start = time.perf_counter()
    mode = corpus.mode()
    assignments = corpus.assignments()
    runner = corpus.session.runner(mode)
    build_id = new_build_id()
    job = TokenizeJob(pieces=corpus.pieces, assignments=assignments, tokenizer=tok, is_encoder=is_encoder,
                      dtype=token_dtype(max(len(tok), max(tok.get_vocab().values(), default=0) + 1)).name,
                      out=root, build=build_id)
    where = f"on Ray ({runner.cpus} CPUs, {runner.nodes} node{'s' if runner.nodes != 1 else ''})" \
        if isinstance(runner, RayRunner) else "in this process"
    print(f"[raydistill] data: packing {corpus.where} ({len(corpus.pieces)} pieces, {corpus.input_bytes / 1e6:.1f} MB) "
          f"{where} -> {root}", file=corpus.session.out or sys.stdout, flush=True)
    progress = Progress("tokenize", len(corpus.pieces), corpus.input_bytes, corpus.session.out, verbose=mode == "ray")
    results = run_stage(runner, "tokenize", job, len(corpus.pieces), progress)
    if not sum(r["docs"] for r, p in zip(results, corpus.pieces) if p.role == "main" and not assignments[r["i"]].to_val):
        raise ConfigError(f"{corpus.where}: the corpus is empty")
    splits = {}
    for split in ("train", "val"):
        shards = [{"path": r[f"{split}_path"], "tokens": r[f"{split}_tokens"]} for r in results
                  if r.get(f"{split}_tokens")]
        splits[split] = {"shards": shards, "tokens": int(sum(s["tokens"] for s in shards))}
    if not is_uri(root):  # written by tasks on other nodes to a directory this node does not see?
        missing = [s["path"] for part in splits.values() for s in part["shards"] if not (Path(root) / s["path"]).is_file()]
        if missing:
            raise ConfigError(f"{corpus.where}: the packed shards written on other nodes are not visible here "
                              f"({missing[0]} under {root}); on a multi-node cluster put the cache on storage every "
                              "node sees: cache_dir on a filesystem mounted at the same path everywhere, or "
                              "data.cache_uri: s3://... or gs://...")
    manifest = {
        "format": FORMAT, "key": key, "is_encoder": is_encoder, "dtype": job.dtype, "pad_id": tok.pad_token_id,
        "cls_id": tok.cls_token_id if is_encoder else None, "sep_id": tok.sep_token_id if is_encoder else None,
        "tokenizer": tokenizer_fingerprint(tok), "splits": splits, "documents": int(sum(r["docs"] for r in results)),
        "input_bytes": corpus.input_bytes, "pieces": len(corpus.pieces), "pipeline": mode,
        "nodes": len(progress.nodes), "node_pieces": sorted(progress.nodes.values(), reverse=True),
        "seconds": round(time.perf_counter() - start, 2),
        "tokenize_seconds": round(progress.seconds, 2), "count": corpus.counted,
        "worker_peak_rss": progress.peak_rss,
        # Summed over tasks: wall time well above CPU time means the tasks waited for a core.
        "task_cpu_seconds": round(sum(r.get("cpu_s", 0) for r in results), 2),
        "task_wall_seconds": round(sum(r.get("ended", 0) - r.get("began", 0) for r in results), 2),
        # From the first piece's start to the last one's end: the stage without starting its workers.
        "pieces_span_seconds": round(max(r.get("ended", 0) for r in results) - min(r.get("began", 0) for r in results),
                                     2) if results else 0.0,
    }
    write_manifest(root, manifest)
    corpus.session.stats.append({"where": corpus.where, **{k: manifest[k] for k in (
        "pipeline", "nodes", "seconds", "tokenize_seconds", "documents", "input_bytes", "pieces", "worker_peak_rss")},
        "tokens": splits["train"]["tokens"] + splits["val"]["tokens"], "node_pieces": dict(progress.nodes)})
    print(f"[raydistill] data: packed {splits['train']['tokens']:,} training and {splits['val']['tokens']:,} "
          f"validation tokens in {manifest['seconds']:.1f} s", file=corpus.session.out or sys.stdout, flush=True)
    return manifest
