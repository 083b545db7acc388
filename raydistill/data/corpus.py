"""Text corpora: the built-in generator, local files (txt, jsonl, csv, parquet; globs) or a hub dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raydistill.config import DataSpec
from raydistill.errors import ConfigError

TEXT_SUFFIXES = {".txt", ".tokens", ".raw", ".text", ""}


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


ALLOWED_FILES = "UTF-8 text (.txt, .tokens, .raw, .text or no suffix), .jsonl, .csv, .parquet"


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


def _read_file(path: str, field: str, where: str = "data.path") -> list[str]:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES or p.is_dir():
        # One document per non-empty line (WikiText's paragraphs; headings are short lines, kept as text).
        return [line.strip() for line in read_text(p, where).splitlines() if line.strip()]
    if suffix == ".jsonl":
        out = []
        for n, row in read_jsonl(p, where):
            if field not in row:
                raise ConfigError(f"{where.rsplit('.', 1)[0]}.text_field: {path}:{n} has no field {field!r}; allowed: "
                                  f"a field every row has, found {sorted(row)}")
            out.append(str(row[field]))
        return out
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            frame = pd.read_csv(p) if suffix == ".csv" else pd.read_parquet(p)
        except Exception as e:  # noqa: BLE001 - pandas/pyarrow parse errors: the file is the user's to fix
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{where}: {str(p)!r} is not a readable {suffix} file ({text}); allowed: "
                              f"{ALLOWED_FILES}") from None
        if field not in frame.columns:
            raise ConfigError(f"{where.rsplit('.', 1)[0]}.text_field: {path} has no column {field!r}; allowed: one of "
                              f"{list(frame.columns)}")
        return [str(t) for t in frame[field].dropna()]
    raise ConfigError(f"{where}: {str(p)!r} has an unsupported file type {suffix!r}; allowed: {ALLOWED_FILES}")


def _read_files(paths: list[str], field: str, where: str = "data.path") -> list[str]:
    return [doc for path in paths for doc in _read_file(path, field, where)]


def _hub(spec: DataSpec, split: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.hub.name, spec.hub.config, split=split)
    except Exception as e:  # network, missing dataset or split: the user's to fix
        raise ConfigError(f"data.hub: cannot load {spec.hub.name!r} split {split!r}: {e}") from None
    if spec.text_field not in ds.column_names:
        raise ConfigError(f"data.text_field {spec.text_field!r} not in {spec.hub.name} columns {ds.column_names}")
    return [t for t in ds[spec.text_field] if t and t.strip()]


def hold_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a deterministic random ``fraction`` (at least one item) held out."""
    order = np.random.default_rng(seed).permutation(len(items))
    held = set(order[:max(1, int(len(items) * fraction))].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_corpus(spec: DataSpec, where: str = "data") -> tuple[list[str], list[str]]:
    """(train documents, validation documents); ``where`` names the section in errors."""
    if spec.source == "builtin":
        from raydistill.data.synthetic import generate_documents

        docs = generate_documents(spec.builtin.num_documents, seed=spec.builtin.seed)
        val = None
    elif spec.source == "files":
        docs = _read_files(spec.path, spec.text_field, f"{where}.path")
        val = (_read_files(spec.validation_path, spec.text_field, f"{where}.validation_path")
               if spec.validation_path else None)
    else:
        docs = _hub(spec, spec.hub.split)
        val = _hub(spec, spec.hub.validation_split) if spec.hub.validation_split else None
    if spec.max_documents:
        docs = docs[:spec.max_documents]
    if val is None:
        docs, val = hold_out(docs, spec.validation_fraction, spec.seed)
    if not docs:
        raise ConfigError(f"{where}: the corpus is empty")
    return docs, val
