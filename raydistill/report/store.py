"""Reading a sweep's files from any storage through pyarrow's filesystems.

A local path, a ``file://`` URI, ``s3://bucket/prefix`` or ``gs://bucket/prefix`` all go through
``pyarrow.fs.FileSystem.from_uri`` and the same calls (S3 options ride on the URI's query string, e.g.
``s3://bucket/sweeps/x?endpoint_override=localhost:9000&scheme=http``; credentials come from the usual
environment variables). Everything here tolerates a sweep that is still running: a missing file is
``None``, a half-written last line of a JSON-lines file is skipped."""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any

from raydistill.errors import ConfigError


def display_location(location: str) -> str:
    """The location without what may hold secrets: a URI's query string (``access_key=...``) and user info."""
    if "://" not in location:
        return location
    scheme, rest = location.split("://", 1)
    rest = rest.split("?", 1)[0]
    host, sep, path = rest.partition("/")
    return f"{scheme}://{host.rsplit('@', 1)[-1]}{sep}{path}"


class SweepStore:
    """One sweep directory (STORAGE_PATH/NAME) on some filesystem; paths below it are relative, '/'-separated."""

    def __init__(self, location: str):
        import pyarrow.fs as pafs

        self.location = location
        uri = location if "://" in location else os.path.abspath(os.path.expanduser(location))
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"{location}: cannot open this storage location ({e})") from None
        self.root = self.root.rstrip("/") or "/"
        if self.kind(".") != "dir":
            raise ConfigError(f"{location}: no such sweep directory (give STORAGE_PATH/NAME of a raydistill sweep)")

    @property
    def is_local(self) -> bool:
        import pyarrow.fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return self.root if rel in ("", ".") else posixpath.join(self.root, rel)

    def kind(self, rel: str) -> str | None:
        """'file', 'dir' or None (absent)."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(rel))
        return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type)

    def exists(self, rel: str) -> bool:
        return self.kind(rel) == "file"

    def listdir(self, rel: str = ".") -> list[tuple[str, str]]:
        """(name, 'file' | 'dir') of the entries directly under ``rel``, sorted by name."""
        import pyarrow.fs as pafs

        if self.kind(rel) != "dir":
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=False, allow_not_found=True))
        kinds = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}
        return sorted((posixpath.basename(i.path.rstrip("/")), kinds.get(i.type, "other")) for i in infos)

    def read_bytes(self, rel: str) -> bytes | None:
        if not self.exists(rel):
            return None
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:  # removed between the check and the read (a running sweep rewrites files)
            return None

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode("utf-8", errors="replace")

    def read_json(self, rel: str) -> Any:
        text = self.read_text(rel)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # being written
            return None

    def read_jsonl(self, rel: str) -> list[dict]:
        """Every complete JSON object line (a line being appended is skipped)."""
        text = self.read_text(rel) or ""
        rows = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def read_table(self, stem: str = "results"):
        """``<stem>.parquet`` (preferred) or ``<stem>.csv`` as a DataFrame; None when neither exists."""
        import pandas as pd
        import pyarrow.parquet as pq

        if self.exists(f"{stem}.parquet"):
            try:
                return pq.read_table(self.path(f"{stem}.parquet"), filesystem=self.fs).to_pandas()
            except (OSError, ValueError):  # replaced while reading: fall back to the CSV
                pass
        data = self.read_bytes(f"{stem}.csv")
        if data is None:
            return None
        try:
            return pd.read_csv(io.BytesIO(data), dtype={"trial": str})
        except pd.errors.EmptyDataError:
            return None
