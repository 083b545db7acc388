"""Text corpora: the built-in generator, local files (txt, jsonl, csv, parquet; globs), files on s3/gs or a
hub dataset, as lists of documents (for corpora that fit in memory; training reads them piece by piece
through ``pipeline.Corpus``, with the same readers and the same held-out split)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raydistill.config import DataSpec
from raydistill.data.sources import ALLOWED_FILES, TEXT_SUFFIXES  # noqa: F401 - re-exported
from raydistill.errors import ConfigError


def read_jsonl(path: Path, where: str = "data.path") -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a bad line is a ConfigError naming file and line."""
    rows = []
    for n, line in enumerate(read_text(path, where).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: {path}:{n}: not valid JSON ({e.msg}); allowed: one JSON object per line") \
                from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: {path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def read_text(path: str | Path, where: str) -> str:
    """A file's UTF-8 text; a binary, unreadable or non-UTF-8 file is a ConfigError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{where}: {str(p)!r} is a directory; allowed: files or globs such as '{p}/*.txt'")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {str(p)!r} ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: {str(p)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}: "
                          f"a binary file?); allowed: {ALLOWED_FILES}") from None
    if "\x00" in text:
        raise ConfigError(f"{where}: {str(p)!r} contains NUL bytes (offset {text.index(chr(0))}: a binary file?); "
                          f"allowed: {ALLOWED_FILES}")
    return text


def hold_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a deterministic random ``fraction`` (at least one item) held out."""
    order = np.random.default_rng(seed).permutation(len(items))
    held = set(order[:max(1, int(len(items) * fraction))].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_corpus(spec: DataSpec, where: str = "data") -> tuple[list[str], list[str]]:
    """(train documents, validation documents), read in this process; ``where`` names the section in errors."""
    from raydistill.data.pipeline import Corpus

    corpus = Corpus(spec, where, mode="local")
    docs = list(corpus.train_documents())
    if not docs:
        raise ConfigError(f"{where}: the corpus is empty")
    return docs, list(corpus.validation_documents())
