"""Checkpoint manifests: each rank lists the files it wrote (size and SHA-256) next to them, so a resume can
tell an intact checkpoint from a truncated, partly deleted or half-uploaded one before DeepSpeed loads it,
and fall back to the newest intact checkpoint of the run.

Ray Train merges the ranks' checkpoint folders into one; each rank's manifest keeps its own name
(``raydistill_manifest_rank<r>.json``) and records the world size, so a missing rank is noticed too.
Checkpoints without any manifest (written before manifests existed) are taken as they are."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from raydistill.fsutil import write_text_atomic

MANIFEST_PREFIX = "raydistill_manifest_rank"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folder names inside the run's storage folder


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def write_manifest(directory: str | Path, rank: int, world_size: int, step: int) -> Path:
    """List every file under ``directory`` (this rank's checkpoint folder) with its size and checksum."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.name.startswith(MANIFEST_PREFIX):
            files[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size, "sha256": sha256(p)}
    out = directory / f"{MANIFEST_PREFIX}{rank}.json"
    write_text_atomic(out, json.dumps({"version": 1, "rank": rank, "world_size": world_size, "step": step,
                                       "files": files}, indent=1))
    return out


@dataclass
class CheckpointState:
    path: Path
    step: int | None = None
    problem: str | None = None  # None: intact
    legacy: bool = False  # no manifest: cannot be checked
    manifests: list[dict] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.problem is None


def read_manifests(directory: Path) -> tuple[list[dict], str | None]:
    manifests, problem = [], None
    for p in sorted(directory.glob(f"{MANIFEST_PREFIX}*.json")):
        try:
            manifests.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            problem = f"its manifest {p.name} is unreadable ({type(e).__name__})"
    return manifests, problem


def inspect(directory: str | Path, verify: bool = True) -> CheckpointState:
    """Whether a checkpoint folder is complete: every rank's manifest, every listed file with its size and (with
    ``verify``) its checksum."""
    directory = Path(directory)
    state = CheckpointState(directory)
    if not directory.is_dir():
        state.problem = "the folder does not exist"
        return state
    manifests, problem = read_manifests(directory)
    state.manifests = manifests
    if problem:
        state.problem = problem
        return state
    if not manifests:
        state.legacy = True
        return state
    state.step = int(manifests[0]["step"])
    world = int(manifests[0]["world_size"])
    missing = sorted(set(range(world)) - {int(m["rank"]) for m in manifests})
    if missing:
        state.problem = f"incomplete: the manifest of rank(s) {missing} of {world} is missing"
        return state
    if len({int(m["step"]) for m in manifests}) > 1:
        state.problem = "its ranks' manifests disagree on the step"
        return state
    for m in manifests:
        for rel, info in sorted(m["files"].items()):
            p = directory / rel
            if not p.is_file():
                state.problem = f"{rel} is missing"
                return state
            size = p.stat().st_size
            if size != info["size"]:
                state.problem = f"{rel} has {size} bytes, {info['size']} were written (truncated or changed)"
                return state
    if verify:
        for m in manifests:
            for rel, info in sorted(m["files"].items()):
                if sha256(directory / rel) != info["sha256"]:
                    state.problem = f"{rel} does not match its checksum (corrupt)"
                    return state
    return state


def manifest_step(directory: Path) -> int | None:
    manifests, _ = read_manifests(directory)
    try:
        return int(manifests[0]["step"]) if manifests else None
    except (KeyError, TypeError, ValueError):
        return None


def choose(latest: str | Path) -> tuple[CheckpointState | None, list[CheckpointState]]:
    """The checkpoint to resume from: ``latest`` (what Ray Train hands back) when intact, else the newest intact
    checkpoint beside it in the run's folder. Returns (chosen or None, the rejected ones, newest first)."""
    latest = Path(latest)
    rejected: list[CheckpointState] = []
    first = inspect(latest)
    if first.intact:
        return first, rejected
    rejected.append(first)
    parent = latest.parent
    siblings = [p for p in parent.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                and p != latest] if parent.is_dir() else []
    # Newest first: by the step the manifest records (cheap to read), unknown steps last, then by name (Ray's
    # folder names carry the time of the report).
    keyed = sorted(siblings, key=lambda p: (manifest_step(p) is not None, manifest_step(p) or 0, p.name), reverse=True)
    for p in keyed:
        state = inspect(p)
        if state.intact and not state.legacy:
            return state, rejected
        if not state.intact:
            rejected.append(state)
    return None, rejected
