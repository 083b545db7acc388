"""Where a corpus's documents come from, cut into *pieces* that can be read independently and in any order.

A piece is a byte range of a text or jsonl file (lines belong to the piece in which they start), one row
group of a parquet file, a whole csv file, a range of rows of a Hugging Face dataset, one shard of a
streamed hub dataset, or the built-in generator. Pieces are listed in corpus order, so the documents of
pieces 0, 1, 2, ... in turn are exactly the documents reading the whole corpus in one process yields (one
per non-empty line of a text file, stripped; one per jsonl row; the non-null values of a csv/parquet
column; the non-blank texts of a hub split). Each piece is read where it is processed (a Ray Data task on
any node, or the driver for small corpora), so no process ever holds more than a piece.

Paths are local files or URIs that pyarrow's filesystems open (``s3://``, ``gs://``, ``file://``, with a
query string such as ``?endpoint_override=...`` passed through)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from raydistill.errors import ConfigError

if TYPE_CHECKING:
    from raydistill.config import DataSpec

TEXT_SUFFIXES = {".txt", ".tokens", ".raw", ".text", ""}
ALLOWED_FILES = "UTF-8 text (.txt, .tokens, .raw, .text or no suffix), .jsonl, .csv, .parquet"
PIECE_BYTES = 4 << 20  # text and jsonl files are read in ranges of about this many bytes
HUB_PIECE_BYTES = 16 << 20  # rows of a downloaded hub split per piece, by their Arrow size
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_GLOB = re.compile(r"[*?\[]")


# ----------------------------------------------------------------------------------------------- storage
def is_uri(path: str) -> bool:
    return bool(_URI.match(str(path)))


def open_fs(location: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI; a location pyarrow cannot open is a
    ConfigError naming it."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(location)
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{location}: cannot open this storage location ({str(e).splitlines()[0]})") from None
    return fs, path


def uri_join(location: str, *names: str) -> str:
    """``names`` below a local directory or a URI (before its query string)."""
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *[n.strip("/") for n in names]]) + sep + query


def read_bytes(location: str, start: int = 0, length: int | None = None) -> bytes:
    """``length`` bytes of a file from ``start`` (to the end when None)."""
    if not is_uri(location):
        with open(location, "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)
    fs, path = open_fs(location)
    with fs.open_input_file(path) as f:
        size = f.size()
        return f.read_at(max(0, (size - start) if length is None else min(length, size - start)), start)


def file_stamp(location: str, where: str) -> tuple[str, int, int]:
    """(path, size, mtime in whole seconds): what the caches key a file by."""
    if not is_uri(location):
        return location, os.path.getsize(location), int(os.path.getmtime(location))
    import pyarrow.fs as pafs

    fs, path = open_fs(location)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {location!r} ({str(e).splitlines()[0]})") from None
    if info.type != pafs.FileType.File:
        raise ConfigError(f"{where}: {location!r} is not a file (found: {info.type.name}); allowed: files or globs")
    return location, int(info.size), int(info.mtime.timestamp()) if info.mtime else 0


def expand(patterns: list[str] | str | None, where: str) -> list[str]:
    """Files a list of paths/globs names, in order. Local ones were resolved by the config already; a URI
    with ``*``, ``?`` or ``[`` is listed (recursively below its last fixed folder) and matched."""
    import pyarrow.fs as pafs

    out: list[str] = []
    for pattern in ([patterns] if isinstance(patterns, str) else patterns or []):
        if not is_uri(pattern) or not _GLOB.search(pattern.partition("?")[0]):
            out.append(pattern)
            continue
        base, sep, query = pattern.partition("?")
        scheme, _, rest = base.partition("://")
        fixed = _GLOB.split(rest, maxsplit=1)[0].rsplit("/", 1)[0]
        fs, root = open_fs(f"{scheme}://{fixed}{sep}{query}")
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except OSError as e:
            raise ConfigError(f"{where}: cannot list {pattern!r} ({str(e).splitlines()[0]})") from None
        # pyarrow drops the scheme from the paths it lists (and the host part too, for some schemes).
        prefix = root[:-len(fixed)] if fixed and root.endswith(fixed) else ""
        hits = sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and fnmatch.fnmatchcase(i.path[len(prefix):], rest))
        if not hits:
            raise ConfigError(f"{where}: no file matches {pattern!r}")
        out.extend(f"{scheme}://{h[len(prefix):]}{sep}{query}" for h in hits)
    return out


def _suffix(location: str) -> str:
    return Path(location.partition("?")[0]).suffix.lower()


def _name(location: str) -> str:
    return location.partition("?")[0]


# ----------------------------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class Piece:
    """A unit of reading. ``role``: 'main' (data.path, hub split, builtin) or 'validation' (validation_path
    or validation_split); ``start``/``end``: a byte range, row group, row range or shard index."""

    kind: str  # text, jsonl, csv, parquet, builtin, hub, hub-stream
    location: str
    role: str
    where: str
    start: int = 0
    end: int = 0
    field: str = "text"
    hub: tuple = ()  # (name, config, split, num_shards) for hub pieces
    nbytes: int = 0  # input bytes, for progress


def _file_pieces(location: str, role: str, where: str, field: str) -> list[Piece]:
    suffix = _suffix(location)
    if not is_uri(location) and Path(location).is_dir():
        raise ConfigError(f"{where}: {location!r} is a directory; allowed: files or globs such as '{location}/*.txt'")
    _, size, _ = file_stamp(location, where)
    if suffix in TEXT_SUFFIXES or suffix == ".jsonl":
        kind = "jsonl" if suffix == ".jsonl" else "text"
        bounds = list(range(0, size, PIECE_BYTES)) + [size]
        return [Piece(kind, location, role, where, a, b, field, nbytes=b - a)
                for a, b in zip(bounds[:-1], bounds[1:])] or [Piece(kind, location, role, where, 0, 0, field)]
    if suffix == ".csv":
        return [Piece("csv", location, role, where, 0, size, field, nbytes=size)]
    if suffix == ".parquet":
        meta = _parquet(location, where)
        if field not in meta.schema.names:
            raise ConfigError(f"{where.rsplit('.', 1)[0]}.text_field: {_name(location)} has no column {field!r}; "
                              f"allowed: one of {list(meta.schema.names)}")
        groups = meta.num_row_groups
        return [Piece("parquet", location, role, where, g, g + 1, field,
                      nbytes=meta.row_group(g).total_byte_size) for g in range(groups)]
    raise ConfigError(f"{where}: {str(location)!r} has an unsupported file type {suffix!r}; allowed: {ALLOWED_FILES}")


def _parquet(location: str, where: str):
    import pyarrow.parquet as pq

    try:
        if is_uri(location):
            fs, path = open_fs(location)
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata
        return pq.ParquetFile(location).metadata
    except Exception as e:  # noqa: BLE001 - pyarrow parse errors: the file is the user's to fix
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: {str(_name(location))!r} is not a readable .parquet file ({text}); allowed: "
                          f"{ALLOWED_FILES}") from None


def _hub_load(name: str, config: str | None, split: str, streaming: bool = False):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # network, missing dataset or split: the user's to fix
        raise ConfigError(f"data.hub: cannot load {name!r} split {split!r}: {e}") from None


@lru_cache(maxsize=4)
def _hub_cached(name: str, config: str | None, split: str):
    return _hub_load(name, config, split)


def _hub_pieces(spec: DataSpec, split: str, role: str, where: str) -> list[Piece]:
    hub = spec.hub
    if getattr(hub, "streaming", False):
        ds = _hub_load(hub.name, hub.config, split, streaming=True)
        n = max(1, int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1)))
        if ds.column_names is not None and spec.text_field not in ds.column_names:
            raise ConfigError(f"data.text_field {spec.text_field!r} not in {hub.name} columns {ds.column_names}")
        return [Piece("hub-stream", hub.name, role, where, i, i + 1, spec.text_field, (hub.name, hub.config, split, n))
                for i in range(n)]
    ds = _hub_cached(hub.name, hub.config, split)
    if spec.text_field not in ds.column_names:
        raise ConfigError(f"data.text_field {spec.text_field!r} not in {hub.name} columns {ds.column_names}")
    nbytes = int(getattr(ds.data, "nbytes", 0) or 0)
    rows = max(1, len(ds) * HUB_PIECE_BYTES // max(nbytes, 1)) if nbytes else 50_000
    bounds = list(range(0, len(ds), rows)) + [len(ds)]
    return [Piece("hub", hub.name, role, where, a, b, spec.text_field, (hub.name, hub.config, split, 0),
                  nbytes=nbytes * (b - a) // max(len(ds), 1)) for a, b in zip(bounds[:-1], bounds[1:])]


def list_pieces(spec: DataSpec, where: str = "data") -> list[Piece]:
    """Every piece of the corpus, main documents first, then validation documents, each in corpus order."""
    if spec.source == "builtin":
        return [Piece("builtin", "", "main", where, spec.builtin.num_documents, spec.builtin.seed)]
    if spec.source == "files":
        pieces = [p for f in expand(spec.path, f"{where}.path")
                  for p in _file_pieces(f, "main", f"{where}.path", spec.text_field)]
        if spec.validation_path:
            pieces += [p for f in expand(spec.validation_path, f"{where}.validation_path")
                       for p in _file_pieces(f, "validation", f"{where}.validation_path", spec.text_field)]
        return pieces
    pieces = _hub_pieces(spec, spec.hub.split, "main", f"{where}.hub")
    if spec.hub.validation_split:
        pieces += _hub_pieces(spec, spec.hub.validation_split, "validation", f"{where}.hub")
    return pieces


def has_validation(spec: DataSpec) -> bool:
    return bool(spec.validation_path) if spec.source == "files" else \
        bool(spec.hub.validation_split) if spec.source == "hub" else False


def stamps(spec: DataSpec) -> list:
    """Size and modification time of every file of a files corpus (what the caches key it by)."""
    if spec.source != "files":
        return []
    files = [*expand(spec.path, "data.path"), *expand(spec.validation_path, "data.validation_path")]
    return [file_stamp(f, "data.path") for f in files]


# ----------------------------------------------------------------------------------------------- reading
def _decode(data: bytes, piece: Piece, offset: int) -> str:
    """UTF-8 text of ``data`` (which starts at byte ``offset`` of the file); errors name the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{piece.where}: {_name(piece.location)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                          f"offset {offset + e.start}: a binary file?); allowed: {ALLOWED_FILES}") from None
    if "\x00" in text:
        before = len(read_bytes(piece.location, 0, offset).decode("utf-8", "replace")) if offset else 0
        raise ConfigError(f"{piece.where}: {_name(piece.location)!r} contains NUL bytes (offset "
                          f"{before + text.index(chr(0))}: a binary file?); allowed: {ALLOWED_FILES}")
    return text


def _line_range(piece: Piece) -> tuple[bytes, int]:
    """The bytes of the lines that start in [start, end), and the file offset of the first one."""
    loc = piece.location
    if not is_uri(loc) and Path(loc).is_dir():
        raise ConfigError(f"{piece.where}: {loc!r} is a directory; allowed: files or globs such as '{loc}/*.txt'")
    try:
        if piece.start == 0 and piece.end >= file_stamp(loc, piece.where)[1]:
            return read_bytes(loc), 0
        begin = piece.start
        head = b""
        if begin > 0:  # the line that holds byte start-1 belongs to the previous piece
            probe = begin - 1
            while True:
                chunk = read_bytes(loc, probe, 1 << 16)
                cut = chunk.find(b"\n")
                if cut >= 0 or not chunk:
                    begin = probe + cut + 1 if cut >= 0 else probe + len(chunk)
                    break
                probe += len(chunk)
        if begin >= piece.end:
            return b"", begin
        body = read_bytes(loc, begin, piece.end - begin)
        if not body.endswith(b"\n"):  # finish the line that holds byte end-1
            pos = piece.end
            while True:
                chunk = read_bytes(loc, pos, 1 << 16)
                cut = chunk.find(b"\n")
                if cut >= 0:
                    head = chunk[:cut + 1]
                    break
                if not chunk:
                    break
                body += chunk
                pos += len(chunk)
        return body + head, begin
    except OSError as e:
        raise ConfigError(f"{piece.where}: cannot read {loc!r} ({e.strerror or str(e).splitlines()[0]})") from None


def _jsonl_docs(text: str, piece: Piece, offset: int) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{piece.where}: {_name(piece.location)}:{_line_number(piece, offset, n)}: not valid "
                              f"JSON ({e.msg}); allowed: one JSON object per line") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{piece.where}: {_name(piece.location)}:{_line_number(piece, offset, n)}: expected a "
                              f"JSON object, got {type(row).__name__}")
        if piece.field not in row:
            raise ConfigError(f"{piece.where.rsplit('.', 1)[0]}.text_field: {_name(piece.location)}:"
                              f"{_line_number(piece, offset, n)} has no field {piece.field!r}; allowed: a field every "
                              f"row has, found {sorted(row)}")
        out.append(str(row[piece.field]))
    return out


def _line_number(piece: Piece, offset: int, n: int) -> int:
    if offset == 0:
        return n
    return len(read_bytes(piece.location, 0, offset).decode("utf-8", "replace").splitlines()) + n


def _table_docs(piece: Piece) -> list[str]:
    import pandas as pd

    suffix = "." + piece.kind
    try:
        if piece.kind == "csv":
            import io

            frame = pd.read_csv(io.BytesIO(read_bytes(piece.location)) if is_uri(piece.location) else piece.location)
        else:
            import pyarrow.parquet as pq

            if is_uri(piece.location):
                fs, path = open_fs(piece.location)
                with fs.open_input_file(path) as f:
                    frame = pq.ParquetFile(f).read_row_group(piece.start, columns=[piece.field]).to_pandas()
            else:
                frame = pq.ParquetFile(piece.location).read_row_group(piece.start, columns=[piece.field]).to_pandas()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow parse errors: the file is the user's to fix
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{piece.where}: {_name(piece.location)!r} is not a readable {suffix} file ({text}); allowed: "
                          f"{ALLOWED_FILES}") from None
    if piece.field not in frame.columns:
        raise ConfigError(f"{piece.where.rsplit('.', 1)[0]}.text_field: {_name(piece.location)} has no column "
                          f"{piece.field!r}; allowed: one of {list(frame.columns)}")
    return [str(t) for t in frame[piece.field].dropna()]


@lru_cache(maxsize=2)
def _builtin(num_documents: int, seed: int) -> tuple[str, ...]:
    from raydistill.data.synthetic import generate_documents

    return tuple(generate_documents(num_documents, seed=seed))


def read_piece(piece: Piece) -> list[str]:
    """The documents of one piece, in corpus order."""
    if piece.kind == "builtin":
        return list(_builtin(piece.start, piece.end))
    if piece.kind in ("text", "jsonl"):
        data, offset = _line_range(piece)
        text = _decode(data, piece, offset)
        if piece.kind == "jsonl":
            return _jsonl_docs(text, piece, offset)
        # One document per non-empty line (WikiText's paragraphs; headings are short lines, kept as text).
        return [line.strip() for line in text.splitlines() if line.strip()]
    if piece.kind in ("csv", "parquet"):
        return _table_docs(piece)
    name, config, split, shards = piece.hub
    if piece.kind == "hub":
        ds = _hub_cached(name, config, split)
        return [t for t in ds[piece.start:piece.end][piece.field] if t and t.strip()]
    ds = _hub_load(name, config, split, streaming=True)
    if shards > 1:
        ds = ds.shard(num_shards=shards, index=piece.start, contiguous=True)
    docs = []
    for row in ds:
        if piece.field not in row:
            raise ConfigError(f"data.text_field {piece.field!r} not in {name} rows (found {sorted(row)})")
        t = row[piece.field]
        if t and t.strip():
            docs.append(t)
    return docs


def iter_documents(pieces: list[Piece]) -> Iterator[str]:
    for piece in pieces:
        yield from read_piece(piece)
