"""The packed corpus on storage: token-stream shards, a manifest, and blocks read from them at random.

Packing concatenates the documents of a split (each followed by its separator) into one token stream and
cuts it into blocks of ``body`` tokens: block ``i`` is ``stream[i*body:(i+1)*body]`` (encoders wrap it in
[CLS] ... [SEP]), the last one padded. So the stream *is* the packed corpus: the shards store it without
the padding, split where the pieces that produced it end (``train/00042.npy``: the training tokens of
piece 42), and the manifest lists each shard's token count. Block ``i`` is a slice of one shard or of two
neighbouring ones, found by binary search over the shards' offsets; the block size is applied when
reading, so runs that differ only in ``data.block_size`` share the shards.

:class:`ShardedBlocks` pickles as its description (where the shards are, their token counts, the special
ids); a worker opens them as memory maps on first use. On a local or shared filesystem the shards are read
in place; from ``s3://``/``gs://`` each node downloads them once into its cache (shards are written once
and never change: the name includes the corpus's content hash and a build id), in the background from the
first use, the shard a batch needs first."""

from __future__ import annotations

import json
import mmap
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raydistill.data.sources import is_uri, open_fs, uri_join

MANIFEST = "manifest.json"
FORMAT = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def write_array(location: str, array: np.ndarray) -> int:
    """Save ``array`` as .npy at a local path or URI; returns the bytes written."""
    if is_uri(location):
        import io

        fs, path = open_fs(location)
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        with fs.open_output_stream(path) as f:
            f.write(buf.getvalue())
        return buf.tell()
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{location}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, location)
    return os.path.getsize(location)


def read_manifest(root: str) -> dict | None:
    """The manifest under ``root`` (a corpus directory or URI), or None when there is none (yet)."""
    location = uri_join(root, MANIFEST)
    try:
        if is_uri(location):
            fs, path = open_fs(location)
            with fs.open_input_stream(path) as f:
                data = f.read()
        else:
            data = Path(location).read_bytes()
        manifest = json.loads(data)
    except (OSError, FileNotFoundError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT else None


def write_manifest(root: str, manifest: dict) -> None:
    """Written last, in one piece: a corpus directory with a manifest is complete."""
    data = json.dumps(manifest, indent=1).encode()
    location = uri_join(root, MANIFEST)
    if is_uri(location):
        fs, path = open_fs(location)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    from raydistill.fsutil import write_bytes_atomic

    write_bytes_atomic(location, data)


def new_build_id() -> str:
    return "build-" + uuid.uuid4().hex[:12]


def _node_cache() -> Path:
    root = os.environ.get("RAYDISTILL_CACHE") or str(Path("~/.cache/raydistill").expanduser())
    return Path(root) / "data-remote"


@dataclass
class ShardedBlocks:
    """Fixed-length blocks over a split's token shards; the ``Blocks`` interface (``len``, ``ids[idx]``,
    ``lengths[idx]``, ``take(idx)``) without holding the corpus."""

    root: str  # the corpus directory (local path or URI)
    split: str
    shards: list[str]  # paths relative to root
    tokens: list[int]  # tokens in each shard
    block_size: int
    is_encoder: bool
    pad_id: int
    cls_id: int | None = None
    sep_id: int | None = None
    key: str = ""
    _maps: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _fetcher: threading.Thread | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.body = self.block_size - 2 if self.is_encoder else self.block_size
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(self.tokens, dtype=np.int64))])
        self.total = int(self.offsets[-1])
        self._len = (self.total + self.body - 1) // self.body

    # Pickled as its description: the memory maps (and a download thread) stay in the process that opened them.
    def __getstate__(self):
        return {k: getattr(self, k) for k in ("root", "split", "shards", "tokens", "block_size", "is_encoder",
                                              "pad_id", "cls_id", "sep_id", "key")}

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self) -> int:
        return self._len

    @property
    def ids(self) -> "_Column":
        return _Column(self, 0)

    @property
    def lengths(self) -> "_Column":
        return _Column(self, 1)

    @property
    def remote(self) -> bool:
        return is_uri(self.root)

    # ------------------------------------------------------------------------------------------ reading
    def _local_path(self, i: int) -> Path:
        if not self.remote:
            return Path(self.root) / self.shards[i]
        return _node_cache() / (self.key or "corpus") / self.shards[i]

    def _download(self, i: int) -> Path:
        target = self._local_path(i)
        if target.is_file():
            return target
        fs, path = open_fs(uri_join(self.root, self.shards[i]))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
            os.replace(tmp, target)  # shards never change: whichever process renames last, the bytes are the same
        finally:
            if tmp.exists():
                tmp.unlink()
        return target

    def _prefetch_all(self) -> None:
        for i in range(len(self.shards)):
            try:
                self._download(i)
            except Exception:  # noqa: BLE001 - the reader downloads it again itself and reports the error
                return

    def _map(self, i: int) -> np.ndarray:
        m = self._maps.get(i)
        if m is not None:
            return m
        with self._lock:
            m = self._maps.get(i)
            if m is not None:
                return m
            if self.remote:
                if self._fetcher is None:  # download every shard in the background from the first use
                    self._fetcher = threading.Thread(target=self._prefetch_all, daemon=True, name="shard-prefetch")
                    self._fetcher.start()
                path = self._download(i)
            else:
                path = self._local_path(i)
            try:
                m = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"packed corpus shard {path} not found on {socket.gethostname()}: the packed corpus must be on "
                    "storage every node sees (cache_dir on a filesystem mounted at the same path on every node, or "
                    "data.cache_uri on s3:// or gs://)") from None
            self._maps[i] = m
            return m

    def _stream(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream."""
        s = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            while self.offsets[s + 1] <= start:  # skip empty shards
                s += 1
            end = min(stop, int(self.offsets[s + 1]))
            base = int(self.offsets[s])
            parts.append(self._map(s)[start - base:end - base])
            start = end
            s += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def prefetch(self, idx) -> None:
        """Ask the kernel to read blocks ``idx`` ahead (``madvise(WILLNEED)``: returns at once, no thread); a
        shard not opened yet, or still downloading, is left alone."""
        for i in np.asarray(idx, dtype=np.int64).reshape(-1).tolist():
            start = (i % self._len) * self.body
            stop = min(start + self.body, self.total)
            s = int(np.searchsorted(self.offsets, start, side="right")) - 1
            while start < stop and s < len(self.shards):
                end = min(stop, int(self.offsets[s + 1]))
                m = self._maps.get(s)
                if m is not None and end > start:
                    _willneed(m, start - int(self.offsets[s]), end - int(self.offsets[s]))
                start, s = max(start, end), s + 1

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [k, block_size], lengths int32 [k]) of blocks ``idx``: what ``pack`` would have made."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -self._len or idx.max() >= self._len):
            raise IndexError(f"block index out of range for {self._len} blocks")
        idx = np.where(idx < 0, idx + self._len, idx)
        ids = np.full((len(idx), self.block_size), self.pad_id, dtype=np.int32)
        lengths = np.zeros(len(idx), dtype=np.int32)
        for r, i in enumerate(idx.tolist()):
            start = i * self.body
            chunk = self._stream(start, min(start + self.body, self.total))
            if self.is_encoder:
                ids[r, 0] = self.cls_id
                ids[r, 1:1 + len(chunk)] = chunk
                ids[r, 1 + len(chunk)] = self.sep_id
                lengths[r] = len(chunk) + 2
            else:
                ids[r, :len(chunk)] = chunk
                lengths[r] = len(chunk)
        return ids, lengths

    def materialize(self):
        """All blocks in memory as a plain ``Blocks`` (what the in-memory pipeline held)."""
        from raydistill.data.blocks import Blocks

        stream = self._stream(0, self.total).astype(np.int32) if self.total else np.zeros(0, np.int32)
        n = self._len
        body = np.full(n * self.body, self.pad_id, dtype=np.int32)
        body[:self.total] = stream
        body = body.reshape(n, self.body)
        lengths = np.full(n, self.body, dtype=np.int32)
        if n:
            lengths[-1] = self.total - (n - 1) * self.body
        if not self.is_encoder:
            return Blocks(body, lengths)
        ids = np.full((n, self.block_size), self.pad_id, dtype=np.int32)
        ids[:, 0] = self.cls_id
        ids[:, 1:-1] = body
        ids[np.arange(n), lengths + 1] = self.sep_id
        return Blocks(ids, lengths + 2)


_PAGE = mmap.PAGESIZE


def _willneed(array: np.memmap, first: int, last: int) -> None:
    """madvise(WILLNEED) over elements [first, last) of a memory-mapped array."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    # np.memmap maps from the allocation-granularity boundary below the data's offset in the file.
    base = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
    lo = array.offset - base + first * array.itemsize
    hi = array.offset - base + last * array.itemsize
    lo -= lo % _PAGE
    try:
        mm.madvise(mmap.MADV_WILLNEED, lo, max(1, min(hi, len(mm)) - lo))
    except (OSError, ValueError):  # advice only
        pass


class _Column:
    """``blocks.ids[idx]`` / ``blocks.lengths[idx]`` for sharded blocks (int, slice or index array)."""

    def __init__(self, blocks: ShardedBlocks, which: int):
        self.blocks, self.which = blocks, which

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.blocks), self.blocks.block_size) if self.which == 0 else (len(self.blocks),)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.blocks.take([key])[self.which][0]
        if isinstance(key, slice):
            key = np.arange(len(self.blocks))[key]
        return self.blocks.take(key)[self.which]


def open_split(root: str, manifest: dict, split: str, block_size: int) -> ShardedBlocks:
    part = manifest["splits"][split]
    return ShardedBlocks(root=root, split=split, shards=[s["path"] for s in part["shards"]],
                         tokens=[int(s["tokens"]) for s in part["shards"]], block_size=block_size,
                         is_encoder=manifest["is_encoder"], pad_id=manifest["pad_id"], cls_id=manifest.get("cls_id"),
                         sep_id=manifest.get("sep_id"), key=manifest["key"])
