"""Text corpora: the built-in generator, local files (txt, jsonl, csv, parquet; globs) or a hub dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raydistill.config import DataSpec
from raydistill.errors import ConfigError

TEXT_SUFFIXES = {".txt", ".tokens", ".raw", ".text", ""}


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a bad line is a ConfigError naming file and line."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def _read_file(path: str, field: str) -> list[str]:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        # One document per non-empty line (WikiText's paragraphs; headings are short lines, kept as text).
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".jsonl":
        out = []
        for n, row in read_jsonl(p):
            if field not in row:
                raise ConfigError(f"{path}:{n}: no field {field!r} (set data.text_field; found {sorted(row)})")
            out.append(str(row[field]))
        return out
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.read_csv(p) if suffix == ".csv" else pd.read_parquet(p)
        if field not in frame.columns:
            raise ConfigError(f"{path}: no column {field!r} (set data.text_field; found {list(frame.columns)})")
        return [str(t) for t in frame[field].dropna()]
    raise ConfigError(f"{path}: unsupported file type {suffix!r}; allowed: .txt/.tokens/.raw, .jsonl, .csv, .parquet")


def _read_files(paths: list[str], field: str) -> list[str]:
    return [doc for path in paths for doc in _read_file(path, field)]


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


def load_corpus(spec: DataSpec) -> tuple[list[str], list[str]]:
    """(train documents, validation documents)."""
    if spec.source == "builtin":
        from raydistill.data.synthetic import generate_documents

        docs = generate_documents(spec.builtin.num_documents, seed=spec.builtin.seed)
        val = None
    elif spec.source == "files":
        docs = _read_files(spec.path, spec.text_field)
        val = _read_files(spec.validation_path, spec.text_field) if spec.validation_path else None
    else:
        docs = _hub(spec, spec.hub.split)
        val = _hub(spec, spec.hub.validation_split) if spec.hub.validation_split else None
    if spec.max_documents:
        docs = docs[:spec.max_documents]
    if val is None:
        docs, val = hold_out(docs, spec.validation_fraction, spec.seed)
    if not docs:
        raise ConfigError("data: the corpus is empty")
    return docs, val
