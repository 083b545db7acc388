"""The teacher cache: the teacher's top-K log-probabilities and token ids for every batch a run trains and
validates on, computed once and read by every run or sweep trial that would compute the same ones.

Why it is exact. Batches are a pure function of (seed, step, micro-step, rank) (``data.blocks.BatchSampler``,
MLM masking included), so a filler that builds the samplers a worker would build produces the very batches
the worker will see, without training. The teacher is frozen and in eval mode, so its output on a batch
depends on the batch, its weights and its precision only. The key below hashes all of these.

Key (``ingredients``): the teacher's identity and precision (``generation.model_identity``: a local
directory's weight files, a hub id and revision, or a random preset's config and init seed), the tokenizer's
fingerprint, the packed corpus (its content hash and block size, or the blocks' bytes when in memory), the
masking probability (encoders), the data seed (``train.seed``), the batch layout (batch size, micro-batches,
workers), K, the value dtype and, when stored, the number of tail samples S and their temperature
(``teacher_cache.tail_samples``, ``tail_temperature``). ``train.max_steps`` and ``train.eval_batches`` are not
in it: the cache holds steps, and a longer run adds the steps it lacks.

Layout under ``ROOT/<key>/``: ``train/<step>/r<rank>.npz`` (all micro-batches of one optimiser step on one
rank: ``logprobs`` [micro, B, T, K] in the value dtype, bfloat16 stored as its int16 bits, and ``ids`` int32;
with tail samples also ``tail_logprobs`` and ``tail_ids`` [micro, B, T, S] and ``tail_log_mass`` [micro, B, T],
drawn outside the top K with the training step's seed by ``teacher_signals.teacher_tail``, as the step draws
them online),
``val/0000000/r<rank>.npz`` (the fixed validation batches, one per "micro" index), and ``manifest.json``:
the ingredients and one entry per file with its size and sha256. Shards are written atomically (temporary
name + rename locally, one PUT on object storage) before the manifest lists them, and the manifest is
rewritten (atomically) as chunks finish, so a fill that crashed keeps what it had listed. A file the
manifest does not list, or whose size (and, on local storage, checksum) differs, is computed again; a
worker verifies each file's checksum as it reads it and stops the run, naming the file, if it does not
match.

Fill: a Ray job before training (``fill``), one actor per training worker (each loads the teacher once;
steps go to them in chunks, with progress lines), or in this process when Ray is not running (tests,
benchmarks). A sweep fills once from its driver before any trial starts; trials whose key matches find the
cache complete, others fill their own first. Lazily filling in the first trial to reach a step would let
concurrent trials (they start together) all run the teacher at the same steps, and would keep the teacher
loaded in every trial."""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raydistill.errors import ConfigError
from raydistill.objectives.base import Needs
from raydistill.sweep import results as R

FORMAT = 1
MANIFEST = "manifest.json"
VAL_STEP = 0  # validation batches are seeded with step 0, which never trains
LOGPROBS, IDS = "teacher_topk_logprobs", "teacher_topk_ids"
TAIL_LOGPROBS, TAIL_IDS, TAIL_LOG_MASS = "teacher_tail_logprobs", "teacher_tail_ids", "teacher_tail_log_mass"
PROGRESS_EVERY_S = 5.0


# ----------------------------------------------------------------------------------------------- key
def blocks_digest(blocks) -> dict[str, Any]:
    """What identifies a packed split: the shards' content hash and block size, or the blocks' bytes."""
    key = getattr(blocks, "key", "")
    if key:
        return {"corpus": key, "split": blocks.split, "block_size": blocks.block_size}
    h = hashlib.sha256(np.ascontiguousarray(blocks.ids).tobytes())
    h.update(np.ascontiguousarray(blocks.lengths).tobytes())
    return {"blocks": h.hexdigest()[:20], "shape": list(blocks.ids.shape)}


def ingredients(cfg, plan) -> dict[str, Any]:
    """Everything the cached signals depend on (see the module doc), as plain data."""
    from raydistill.data.pipeline import tokenizer_fingerprint
    from raydistill.generation import model_identity

    t, tc = cfg.train, cfg.teacher_cache
    blocks = plan.fetch_blocks()
    return {
        "format": FORMAT,
        "teacher": model_identity(plan.teacher_source, plan.teacher_revision, plan.teacher_config.to_json_string(),
                                  t.seed, t.precision,
                                  cfg.teacher.model_dump(include={"torch_dtype", "attn_implementation"})),
        "tokenizer": tokenizer_fingerprint(plan.tokenizer),
        "data": [blocks_digest(b) for b in blocks],
        "mlm_probability": cfg.data.mlm_probability if plan.token_info.is_encoder else None,
        "seed": t.seed,
        "layout": {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "workers": cfg.scaling.num_workers,
                   "block_size": cfg.data.block_size},
        "top_k": tc.top_k, "dtype": tc.dtype,
        # Only when stored, so that caches without tail samples keep their keys.
        **({"tail_samples": tc.tail_samples, "tail_temperature": tc.tail_temperature} if tc.tail_samples else {}),
    }


def cache_key(ingr: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ingr, sort_keys=True).encode()).hexdigest()[:20]


def default_root(cfg) -> str:
    return cfg.teacher_cache.uri or R.uri_join(str(cfg.cache_dir), "teacher_cache")


# ----------------------------------------------------------------------------------------------- what is cached
def online_reasons(cfg, plan, needs: Needs, stream_needs: dict[str, Needs]) -> list[str]:
    """Why the teacher must still run in the workers although the cache is used (empty: it is not loaded)."""
    out = []
    if needs.teacher_logits:
        out.append("an objective reads the teacher's full logits")
    if needs.teacher_layers:
        out.append(f"objectives read the teacher's hidden states (blocks {sorted(needs.teacher_layers)})")
    for name, n in stream_needs.items():
        if n.teacher or n.teacher_topk:
            out.append(f"streams.{name} runs the teacher (streams are not cached)")
    if plan.rouge is not None and plan.rouge.spec.teacher:
        out.append("rouge.teacher scores the teacher")
    return out


@dataclass
class CacheUse:
    """What a worker needs to read the cache (travels in the RunPlan)."""

    root: str  # ROOT/<key>
    key: str
    top_k: int  # what the objectives read: the stored K is cut to it
    dtype: str
    tail_samples: int = 0  # the tail samples the objectives read (0: those stored, if any, are not attached)
    online: list[str] = field(default_factory=list)  # why the teacher still runs (empty: not loaded)
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- files
def unit_name(step: int, rank: int) -> str:
    return f"{'val' if step == VAL_STEP else 'train'}/{step:07d}/r{rank:03d}.npz"


def _split(location: str, name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    return R.uri_join(location, folder) if folder else location, base


def write_file(root: str, name: str, data: bytes) -> None:
    R.write_bytes_to(*_split(root, name), data)


def read_file(root: str, name: str) -> bytes | None:
    try:
        return R.read_bytes_from(*_split(root, name))
    except OSError:
        return None


def file_size(root: str, name: str) -> int | None:
    location, base = _split(root, name)
    if not R.is_uri(location):
        from pathlib import Path

        p = Path(location) / base
        return p.stat().st_size if p.is_file() else None
    import pyarrow.fs as pafs

    fs, path = R.open_storage(location)
    info = fs.get_file_info(f"{path}/{base}")
    return info.size if info.type == pafs.FileType.File else None


def _values(logprobs: torch.Tensor, dtype: str) -> np.ndarray:
    values = logprobs.to(getattr(torch, dtype)).cpu()
    return values.view(torch.int16).numpy() if dtype == "bfloat16" else values.numpy()


def encode(logprobs: torch.Tensor, ids: torch.Tensor, dtype: str,
           tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> bytes:
    """One file's arrays (``logprobs``, ``ids``; ``tail_logprobs``, ``tail_ids``, ``tail_log_mass`` when ``tail``
    is given)."""
    arrays = {"logprobs": _values(logprobs, dtype), "ids": ids.to(torch.int32).cpu().numpy()}
    if tail is not None:
        arrays.update(tail_logprobs=_values(tail[0], dtype), tail_ids=tail[1].to(torch.int32).cpu().numpy(),
                      tail_log_mass=_values(tail[2], dtype))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(data: bytes, dtype: str) -> dict[str, torch.Tensor]:
    """``encode``'s arrays by name, the values in their stored dtype (bfloat16 from its int16 bits)."""
    with np.load(io.BytesIO(data)) as z:
        arrays = {name: torch.from_numpy(z[name]) for name in z.files}
    if dtype == "bfloat16":
        for name in ("logprobs", "tail_logprobs", "tail_log_mass"):
            if name in arrays:
                arrays[name] = arrays[name].view(torch.bfloat16)
    return arrays


def read_manifest(root: str) -> dict | None:
    try:
        data = R.read_bytes_from(root, MANIFEST)
        manifest = json.loads(data) if data else None
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def write_manifest(root: str, manifest: dict, entries: dict[str, dict]) -> None:
    """Merge ``entries`` into the manifest on storage (another filler of the same key may have added some) and
    write it in one piece."""
    current = read_manifest(root) or {}
    merged = {**current.get("entries", {}), **entries}
    R.write_bytes_to(root, MANIFEST, json.dumps({**manifest, "entries": merged}, indent=1, sort_keys=True).encode())


def intact(root: str, name: str, entry: dict | None, verify: bool) -> bool:
    """The manifest lists ``name`` and the file matches its size (and checksum when ``verify``)."""
    if not entry:
        return False
    if not verify:
        return file_size(root, name) == entry.get("bytes")
    data = read_file(root, name)
    return data is not None and len(data) == entry.get("bytes") and \
        hashlib.sha256(data).hexdigest() == entry.get("sha256")


# ----------------------------------------------------------------------------------------------- fill
class Filler:
    """Computes and writes the cache files of some steps: the batches every rank would build, through the
    teacher the workers would load, at their precision. Runs in this process or as a Ray actor."""

    def __init__(self, cfg, plan, root: str):
        self.cfg, self.plan, self.root = cfg, plan, root
        self.teacher = None
        self.samplers = None

    def _load_teacher(self) -> None:
        from raydistill.models.loading import build_model, teacher_dtype

        cfg, plan = self.cfg, self.plan
        torch.manual_seed(cfg.train.seed)  # as Worker.build: a random-init teacher gets the workers' weights
        teacher = build_model(plan.teacher_config, plan.teacher_source, plan.teacher_revision, cfg.teacher)
        teacher.requires_grad_(False).eval()
        if teacher_dtype(cfg) is not None:  # the dtype the workers run it in
            teacher.to(teacher_dtype(cfg))
        self.device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        self.teacher = teacher.to(self.device)

    def batches(self, step: int, rank: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches rank ``rank`` trains on at ``step`` (validation: its evaluation batches), built by
        the samplers ``Worker.build`` builds."""
        from raydistill.data.blocks import BatchSampler

        cfg, t = self.cfg, self.cfg.train
        if self.samplers is None:
            blocks = self.plan.fetch_blocks()
            common = dict(batch_size=t.batch_size, world_size=cfg.scaling.num_workers, seed=t.seed,
                          mlm_probability=cfg.data.mlm_probability)
            self.samplers = [(BatchSampler(blocks[0], self.plan.token_info, grad_accum=t.grad_accum, rank=r, **common),
                              BatchSampler(blocks[1], self.plan.token_info, grad_accum=1, rank=r, **common))
                             for r in range(cfg.scaling.num_workers)]
        train, val = self.samplers[rank]
        if step == VAL_STEP:
            return list(val.eval_batches(t.eval_batches, seed=t.seed))
        return [train.batch(step, micro) for micro in range(t.grad_accum)]

    @torch.no_grad()
    def compute(self, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """The top-K values and ids of ``(step, rank)``'s micro-batches, [micro, B, T, K], and their tail samples'
        ([micro, B, T, S] each, and the tail's log-mass [micro, B, T]) when the cache stores them."""
        from raydistill.data.blocks import step_seed
        from raydistill.objectives.teacher_signals import teacher_tail, teacher_topk
        from raydistill.train.step import MODEL_INPUTS

        if self.teacher is None:
            self._load_teacher()
        tc = self.cfg.teacher_cache
        values, ids, tails = [], [], []
        for batch in self.batches(step, rank):
            logits = self.teacher(**{k: batch[k].to(self.device) for k in MODEL_INPUTS}).logits
            top = teacher_topk(logits, tc.top_k)
            values.append(top.logprobs)
            ids.append(top.ids)
            if tc.tail_samples:  # the seed the training step draws with (Worker: extras["step_seed"])
                tails.append(teacher_tail(logits, top.ids, tc.tail_samples, batch["input_ids"],
                                          step_seed(self.cfg.train.seed, step), tc.tail_temperature))
        tail = tuple(torch.stack([getattr(t, f) for t in tails]) for f in ("logprobs", "ids", "log_mass")) \
            if tails else None
        return torch.stack(values), torch.stack(ids), tail

    def run(self, units: list[tuple[int, int]]) -> dict[str, dict]:
        """Compute and write ``units`` ((step, rank) pairs); their manifest entries."""
        out = {}
        for step, rank in units:
            values, ids, tail = self.compute(step, rank)
            data = encode(values, ids, self.cfg.teacher_cache.dtype, tail)
            name = unit_name(step, rank)
            write_file(self.root, name, data)
            out[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                         "micro_batches": int(ids.shape[0]), "positions": int(ids.shape[0] * ids.shape[1] * ids.shape[2])}
        return out


def _chunks(items: list, parts: int) -> list[list]:
    size = max(1, math.ceil(len(items) / max(1, parts)))
    return [items[i:i + size] for i in range(0, len(items), size)]


def _progress(done: int, total: int, start: float, out) -> None:
    rate = done / max(time.perf_counter() - start, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("nan")
    print(f"[raydistill] teacher cache: {done}/{total} step files ({100 * done / total:.0f}%), {rate:.2f}/s, "
          f"ETA {eta:.0f} s", file=out, flush=True)


def run_fill(cfg, plan, root: str, units: list[tuple[int, int]], manifest: dict, monitor=None,
             out=None) -> dict[str, dict]:
    """Compute ``units`` on Ray actors (one per training worker, with a worker's resources) when Ray is up,
    else here; the manifest grows as chunks finish."""
    from raydistill.monitoring import board as phases

    out = out or sys.stdout
    start, last = time.perf_counter(), 0.0
    entries: dict[str, dict] = {}

    def finished(part: dict[str, dict]) -> None:
        nonlocal last
        entries.update(part)
        write_manifest(root, manifest, part)
        if monitor is not None:
            monitor.post(phase=phases.TEACHER_CACHE, done=len(entries), total=len(units))
        if time.perf_counter() - last >= PROGRESS_EVERY_S or len(entries) == len(units):
            last = time.perf_counter()
            _progress(len(entries), len(units), start, out)

    import ray

    if not ray.is_initialized():
        filler = Filler(cfg, plan, root)
        for chunk in _chunks(units, math.ceil(len(units) / 4)):
            finished(filler.run(chunk))
        return entries
    from ray.util import ActorPool

    s = cfg.scaling
    actors = min(s.num_workers, len(units))
    options = {"num_cpus": s.cpus_per_worker, "num_gpus": s.gpus_per_worker if s.use_gpu else 0,
               "resources": dict(s.resources_per_worker)}
    remote = ray.remote(Filler).options(**options)
    handles = [remote.remote(cfg, plan, root) for _ in range(actors)]
    try:
        # Chunks of several steps (each actor loads the teacher once), a few per actor for progress.
        for part in ActorPool(handles).map_unordered(lambda a, chunk: a.run.remote(chunk), _chunks(units, actors * 4)):
            finished(part)
    finally:
        for actor in handles:  # free their CPUs/GPUs for the training workers now
            ray.kill(actor)
    return entries


def attach(cfg, plan, monitor=None, out=None) -> Any:
    """Driver side, before training: check the cache covers the run (filling what is missing) and point the
    plan at it (``plan.teacher_cache``). Prints the storage cost before filling and what was reused."""
    from raydistill.objectives import build_objectives
    from raydistill.train.step import combined_needs

    out = out or sys.stdout
    if cfg.teacher_cache is None or plan.mode != "distill":
        return plan
    objectives = build_objectives(plan.objectives, plan.info)
    needs = combined_needs(objectives)  # the cache's columns against them: checked by plan.prepare already
    if needs.teacher_topk == 0:
        print("[raydistill] note: teacher_cache is set but no objective reads the teacher's top-K (e.g. "
              "objectives.kd.top_k); the teacher runs as usual", file=out, flush=True)
        return plan
    tc = cfg.teacher_cache
    t = cfg.train
    ingr = ingredients(cfg, plan)
    key = cache_key(ingr)
    root = R.uri_join(default_root(cfg), key)
    world = cfg.scaling.num_workers
    units = [(step, rank) for step in [VAL_STEP, *range(1, t.max_steps + 1)] for rank in range(world)]
    positions, size = tc.footprint(cfg)
    samples = f" and {tc.tail_samples} tail samples (+ their mass)" if tc.tail_samples else ""
    print(f"[raydistill] teacher cache {root}: top {tc.top_k}{samples} {tc.dtype} log-probs + int32 ids = "
          f"{tc.bytes_per_token()} bytes/token; {positions:,} positions ({t.max_steps} steps + validation, "
          f"{world} worker{'s' if world != 1 else ''}) = {size / 1e9:.3g} GB (limit teacher_cache.max_gb "
          f"{tc.max_gb:g})", file=out, flush=True)
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("ingredients") != ingr:  # a hash collision, or a hand-edited file
        raise ConfigError(f"teacher cache {root}: its manifest describes other ingredients than this run's; "
                          "delete the folder")
    listed = (manifest or {}).get("entries", {})
    verify = not R.is_uri(root)  # checksums on local storage; sizes on object storage (workers check sums)
    missing = [u for u in units if not intact(root, unit_name(*u), listed.get(unit_name(*u)), verify)]
    damaged = [unit_name(*u) for u in missing if unit_name(*u) in listed]
    if damaged:
        print(f"[raydistill] teacher cache: {len(damaged)} damaged or missing file(s) listed in the manifest "
              f"(e.g. {damaged[0]}): computing them again", file=out, flush=True)
    tokens_per_file = t.batch_size * cfg.data.block_size
    reused = len(units) - len(missing)
    started = time.perf_counter()
    if missing:
        print(f"[raydistill] teacher cache: {reused} of {len(units)} step files reused "
              f"({reused * tokens_per_file * t.grad_accum:,} tokens), computing {len(missing)}", file=out, flush=True)
        head = {"format": FORMAT, "key": key, "ingredients": ingr, "top_k": tc.top_k, "dtype": tc.dtype,
                "tail_samples": tc.tail_samples, "tail_temperature": tc.tail_temperature}
        computed = run_fill(cfg, plan, root, missing, head, monitor, out)
    else:
        computed = {}
        print(f"[raydistill] teacher cache: all {len(units)} step files found (reused {reused}, computed 0)",
              file=out, flush=True)
    stream_needs = {name: combined_needs(build_objectives(s.objectives, plan.info))
                    for name, s in plan.streams.items()}
    online = online_reasons(cfg, plan, needs, stream_needs)
    plan.teacher_cache = CacheUse(root=root, key=key, top_k=needs.teacher_topk, dtype=tc.dtype, tail_samples=needs.teacher_tail[1],
                                  online=online, stats={
        "files": len(units), "reused_files": reused, "computed_files": len(missing),
        "teacher_forwards": sum(e["micro_batches"] for e in computed.values()),
        "fill_s": round(time.perf_counter() - started, 3) if missing else 0.0, "bytes": size})
    print("[raydistill] teacher cache: " + (f"the teacher still runs in the workers: {'; '.join(online)}" if online
          else "the workers read every teacher signal from it and do not load the teacher"), file=out, flush=True)
    return plan


def sweep_reuse(cfg, use: CacheUse, rows: list[dict[str, Any]], out=None) -> dict[str, Any]:
    """What a sweep's trials read from the cache against what the teacher computed (its driver's fill and any
    fill of a trial whose key differed), printed in one line and returned."""
    t = cfg.train
    per_step = t.grad_accum * t.batch_size * cfg.data.block_size * cfg.scaling.num_workers
    steps_read = int(sum(r.get("step") or 0 for r in rows))
    computed = use.stats.get("computed_files", 0) + int(sum(r.get("teacher_cache/computed_files") or 0 for r in rows))
    forwards = use.stats.get("teacher_forwards", 0)
    res = {"trials": len(rows), "steps_read": steps_read, "tokens_read": steps_read * per_step,
           "files_computed": computed, "files_reused_by_fill": use.stats.get("reused_files", 0),
           "teacher_micro_batches_computed": forwards, "fill_s": use.stats.get("fill_s", 0.0)}
    print(f"[raydistill] teacher cache: trials read {steps_read} steps ({res['tokens_read']:,} tokens) from it "
          f"instead of running the teacher; the teacher computed {computed} step files ({forwards} micro-batches "
          f"in the sweep's fill, {res['fill_s']:.1f} s), {res['files_reused_by_fill']} were there already",
          file=out or sys.stdout, flush=True)
    return res


# ----------------------------------------------------------------------------------------------- read
class Reader:
    """A worker's view of the cache: attaches its (step, micro-batch) signals to a batch, cut to the K the
    objectives read, checking each file's checksum against the manifest."""

    def __init__(self, use: CacheUse, rank: int):
        self.use, self.rank = use, rank
        manifest = read_manifest(use.root)
        if manifest is None:
            from raydistill.train.faults import RunFailure

            raise RunFailure(f"teacher cache {use.root}: no manifest; rerun to fill it")
        self.entries = manifest["entries"]
        self._step: int | None = None
        self._arrays: dict[str, torch.Tensor] | None = None
        self.reads = 0
        # The prefetch thread reads training steps while validation reads step 0 on the main thread.
        self._lock = threading.Lock()

    def _load(self, step: int) -> dict[str, torch.Tensor]:
        from raydistill.train.faults import RunFailure

        if self._step != step:
            name = unit_name(step, self.rank)
            entry = self.entries.get(name)
            data = read_file(self.use.root, name)
            if entry is None or data is None or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                what = "not listed in its manifest" if entry is None else "missing" if data is None else \
                    "damaged (checksum differs from the manifest)"
                raise RunFailure(f"teacher cache file {R.uri_join(self.use.root, name)} is {what}; rerun the "
                                 "command: the fill computes it again before training")
            self._arrays, self._step = decode(data, self.use.dtype), step
            self.reads += 1
        return self._arrays

    def signals(self, batch: dict[str, torch.Tensor], step: int, micro: int) -> dict[str, torch.Tensor]:
        """``batch`` with the teacher's top-K (and tail samples, when the objectives read them) for optimiser
        ``step``'s micro-batch ``micro`` (step 0: the ``micro``-th validation batch)."""
        with self._lock:
            arrays = self._load(step)
        k = self.use.top_k
        out = {**batch, LOGPROBS: arrays["logprobs"][micro, ..., :k], IDS: arrays["ids"][micro, ..., :k]}
        if self.use.tail_samples:
            out.update({TAIL_LOGPROBS: arrays["tail_logprobs"][micro], TAIL_IDS: arrays["tail_ids"][micro],
                        TAIL_LOG_MASS: arrays["tail_log_mass"][micro]})
        return out
