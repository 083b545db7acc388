"""``raydistill bench data``: preparing a large corpus on Ray Data, and training from its shards.

A UTF-8 text file (WikiText-2's training split in the measurements the README reports) is repeated on disk
until it holds N tokens (default 10M and 100M) of a byte-level BPE tokenizer trained on it once. For each N
and each CPU count (1 and all of the machine's), a fresh process starts a Ray cluster of that many CPUs,
prepares the corpus from scratch (``prepare``: a Ray Data pipeline writing token shards to an empty cache)
and trains a tiny GPT-2 pair on it for three steps, reporting:

* ``tokens_per_s``: tokens packed per second of the tokenize stage (from its start, workers starting
  included, to the last result); ``tokens_per_s_pieces``: from the first piece's start to the last one's
  end;
* ``prepare_s``: the whole preparation (listing, pipeline, manifest), and ``first_step_s``: from the start
  of the preparation to the first training step's metrics row (preparation, Ray Train workers, models, one
  step; Ray is already running, ``ray_start_s``);
* ``driver_peak_rss_mb``: the driver process's peak resident memory after preparing (``ru_maxrss``);
  ``data_worker_peak_rss_mb``: the largest peak of the processes that ran pipeline tasks;
  ``train_worker_peak_rss_mb``: the training worker's, sampled every 0.2 s.

A ``cached`` row reruns the all-CPU case with the cache left in place: the time to the first step when the
shards exist. A ``two_node`` row prepares the smallest corpus on a simulated two-node cluster
(``ray.cluster_utils.Cluster``, one CPU per node) and counts the pieces each node tokenized. The ``step``
rows compare the training step (median of 5-step windows through Ray Train + DeepSpeed, one worker) with
the shards streamed from storage and with the same blocks in memory, shipped through the object store as
before (runs in A-B-B-A order to cancel drift), and the same step in one process with the two kinds of
batches in alternating 5-step windows (drift and other load hit both alike); ``batch_ms`` times building
one micro-batch either way."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from raydistill.bench.sampling import Sampler
from raydistill.bench.timeslice import TRAIN_WORKER_TITLE

WARMUP = 5  # steps, and the logging window of the step rows
PARTS = ("build", "two_node", "step")
REPEAT_BELOW = 20_000_000  # corpora up to this many tokens are built 3 times per CPU count (the best counts)
DEFAULT_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2" / "wiki.train.tokens"
VALID_NAME = "wiki.valid.tokens"


# ----------------------------------------------------------------------------------------------- inputs
def make_tokenizer(text: Path, workdir: Path, vocab_size: int = 8192) -> str:
    from raydistill.data.tokenizer import train_tokenizer

    target = workdir / f"bpe-{vocab_size}"
    if not (target / "tokenizer.json").is_file():
        lines = [line.strip() for line in text.read_text().splitlines() if line.strip()]
        train_tokenizer(lines, "bpe", vocab_size).save_pretrained(target)
    return str(target)


def make_corpus(text: Path, tokens: int, workdir: Path, tokenizer: str) -> tuple[Path, int]:
    """``text`` repeated into one file until it holds at least ``tokens`` tokens; (path, tokens in it)."""
    from transformers import AutoTokenizer

    meta = workdir / "tokens_per_copy.json"
    if meta.is_file():
        per_copy = json.loads(meta.read_text())["tokens"]
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer)
        lines = [line.strip() for line in text.read_text().splitlines() if line.strip()]
        # Each document (line) is followed by EOS in the packed stream, as the pipeline counts it.
        per_copy = sum(len(ids) + 1 for ids in tok(lines, add_special_tokens=False)["input_ids"])
        meta.write_text(json.dumps({"tokens": per_copy}))
    copies = math.ceil(tokens / per_copy)
    path = workdir / f"corpus-{_short(tokens)}" / f"{text.stem}-x{copies}{text.suffix}"
    if not path.is_file() or path.stat().st_size != copies * text.stat().st_size:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.read_bytes()
        with open(f"{path}.tmp", "wb") as f:
            for _ in range(copies):
                f.write(data)
        os.replace(f"{path}.tmp", path)
    return path, copies * per_copy


def _short(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else str(n)


def overrides(corpus: Path, valid: Path, tokenizer: str, cache: str, out: str, name: str, steps: int,
              block_size: int = 64, batch_size: int = 8) -> list[str]:
    return [
        "teacher.name=tiny-gpt2", "student.num_layers=1", f"tokenizer.name={tokenizer}", f"name={name}",
        f"output_dir={out}", f"cache_dir={cache}", f"data.path={corpus}", f"data.validation_path={valid}",
        "data.pipeline=ray", f"data.block_size={block_size}", f"train.batch_size={batch_size}",
        f"train.max_steps={steps}", f"train.log_every={1 if steps <= WARMUP else WARMUP}", "train.eval_batches=1",
        "train.warmup_ratio=0", "objectives.task.weight=1", "objectives.kd.weight=1", "deepspeed.zero_stage=2",
        "scaling.num_workers=1", "ray.dashboard=false", "ray.log_to_driver=false"]


# ----------------------------------------------------------------------------------------------- child processes
class RssSampler(Sampler):
    """Peak RSS of this machine's Ray worker processes, by what they were seen running."""

    def __init__(self, every_s: float = 0.2):
        super().__init__(every_s)
        self.peaks: dict[str, int] = {}

    def sample(self) -> None:
        import psutil

        for p in psutil.process_iter(["cmdline", "memory_info"]):
            try:
                title = " ".join(p.info["cmdline"] or [])
                rss = p.info["memory_info"].rss
            except (psutil.Error, TypeError, AttributeError):
                continue
            for role, marker in (("train_worker", TRAIN_WORKER_TITLE), ("data_worker", "MapBatches")):
                if marker in title:
                    self.peaks[role] = max(self.peaks.get(role, 0), rss)


def _first_row_time(metrics: Path, stop: threading.Event, found: list) -> None:
    while not stop.wait(0.1):
        try:
            lines = metrics.read_text().splitlines()
        except OSError:
            continue
        if lines:
            found.append(json.loads(lines[0])["time"])
            return


def child_prepare(args: dict) -> dict:
    """One (corpus, CPU count) case in this fresh process: start Ray, prepare, train a few steps."""
    import ray

    from raydistill.config import load_config
    from raydistill.train.launcher import fit, worker_env
    from raydistill.train.plan import prepare

    cfg = load_config(None, args["overrides"])
    started = args["started"]
    out = {"tokens_target": args["tokens"], "cpus": args["cpus"]}
    with RssSampler() as rss:
        ray_started = time.time()
        if args.get("nodes", 1) > 1:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": args["cpus"], "object_store_memory": 256 << 20, "include_dashboard": False})
            for _ in range(args["nodes"] - 1):
                cluster.add_node(num_cpus=args["cpus"], object_store_memory=256 << 20)
            ray.init(address=cluster.address, runtime_env={"env_vars": worker_env(cfg)}, log_to_driver=False)
        else:
            cluster = None
            ray.init(num_cpus=args["cpus"], include_dashboard=False, object_store_memory=512 << 20,
                     runtime_env={"env_vars": worker_env(cfg)}, log_to_driver=False)
        from raydistill.data.shards import read_manifest

        out["ray_start_s"] = round(time.time() - ray_started, 1)
        rates, load = [], [os.getloadavg()[0]]
        for r in range(args.get("repeats", 1)):  # the best of several builds: the machine may be shared
            t0 = time.perf_counter()
            last_prepare = time.time()
            if r:  # an empty cache again: the pipeline runs in full
                cfg = load_config(None, [*args["overrides"], f"cache_dir={cfg.cache_dir}-{r}"])
            plan = prepare(cfg)
            prepare_s = round(time.perf_counter() - t0, 2)
            manifest = read_manifest(plan.blocks[0].root)
            made = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
            rates.append(made / max(manifest["tokenize_seconds"], 1e-9))
            if r == 0 or rates[-1] >= max(rates):
                out["prepare_s"], best = prepare_s, manifest
                out["tokens_per_s_pieces"] = round(made / max(manifest.get("pieces_span_seconds", 0), 1e-9))
            load.append(os.getloadavg()[0])
        manifest = best
        out["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
        out.update(tokens=tokens, pieces=manifest["pieces"], nodes=manifest["nodes"],
                   node_pieces=manifest.get("node_pieces"), tokenize_s=manifest["tokenize_seconds"],
                   tokens_per_s=round(max(rates)), tokens_per_s_all=[round(x) for x in rates],
                   task_cpu_s=manifest.get("task_cpu_seconds"), task_wall_s=manifest.get("task_wall_seconds"),
                   data_worker_peak_rss_mb=round(manifest["worker_peak_rss"] / 2**20, 1),
                   blocks_pickled_bytes=len(__import__("pickle").dumps(plan.blocks)),
                   load_avg_1m=[round(x, 2) for x in load])
        if args.get("train", True):
            stop, found = threading.Event(), []
            watcher = threading.Thread(target=_first_row_time, args=(Path(cfg.output_dir) / "metrics.jsonl", stop,
                                                                      found), daemon=True)
            watcher.start()
            fit(plan)
            stop.set()
            watcher.join()
            if not found:  # the watcher may have stopped before the file appeared
                lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
                found.append(json.loads(lines[0])["time"])
            # From the start of the (last) preparation: listing, pipeline, manifest, Ray Train workers, models,
            # one step. Ray was already up (ray_start_s); the process itself started earlier (imports).
            out["first_step_s"] = round(found[0] - last_prepare, 1)
            out["first_step_from_process_start_s"] = round(found[0] - started, 1)
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    out["train_worker_peak_rss_mb"] = round(rss.peaks.get("train_worker", 0) / 2**20, 1) or None
    out["data_worker_sampled_rss_mb"] = round(rss.peaks.get("data_worker", 0) / 2**20, 1) or None
    return out


def child_steps(args: dict) -> dict:
    """Step times with streamed shards and with the same blocks in memory, A-B-B-A, in this process."""
    import ray

    from raydistill.config import load_config
    from raydistill.train.launcher import fit, worker_env
    from raydistill.train.plan import prepare

    base = args["overrides"]
    cfg0 = load_config(None, base)
    ray.init(num_cpus=args["cpus"], include_dashboard=False, object_store_memory=512 << 20,
             runtime_env={"env_vars": worker_env(cfg0)}, log_to_driver=False)
    times: dict[str, list[float]] = {"shards": [], "memory": []}
    for i, kind in enumerate(("shards", "memory", "memory", "shards")):
        out = Path(args["out"]) / f"{kind}-{i}"
        cfg = load_config(None, [*base, f"output_dir={out}", f"name=steps-{kind}-{i}"])
        plan = prepare(cfg)
        if kind == "memory":  # the in-memory pipeline's blocks: arrays shipped through the object store
            plan.blocks = tuple(b.materialize() for b in plan.blocks)
        fit(plan)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        # Each row averages the steps since the previous one; the last also holds the final evaluation.
        times[kind] += [r["step_time_s"] for r in rows[:-1] if r["step"] > WARMUP]
    ray.shutdown()
    return {k: v for k, v in times.items()}


def _spawn(mode: str, args: dict) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "raydistill.bench.data", mode, json.dumps(args)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench data {mode} failed (status {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def interleaved_step_times(plan, steps: int = 200, window: int = 5) -> dict[str, list[float]]:
    """The same training step (task + kd, AdamW, one thread as a worker with one CPU) in one process, its
    batches built from the shards and from the same blocks in memory in alternating windows of ``window``
    steps: whatever else the machine does affects both sides alike. Step ``s`` trains on the batch of step
    ``s`` either way (the same rows)."""
    import torch

    from raydistill.data.blocks import BatchSampler
    from raydistill.models.loading import build_model, init_from_teacher
    from raydistill.objectives import build_objectives
    from raydistill.train.step import DistillModule

    t = plan.cfg.train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(t.seed)
    teacher = build_model(plan.teacher_config, plan.teacher_source).eval().requires_grad_(False)
    student = build_model(plan.student_config, plan.student_source)
    init_from_teacher(student, teacher, plan.init_layers)
    module = DistillModule(student, build_objectives(plan.objectives, plan.info), plan.info)
    opt = torch.optim.AdamW(module.parameters(), lr=t.lr)
    kw = dict(batch_size=t.batch_size, grad_accum=1, rank=0, world_size=1, seed=t.seed)
    samplers = {"shards": BatchSampler(plan.blocks[0], plan.token_info, **kw),
                "memory": BatchSampler(plan.blocks[0].materialize(), plan.token_info, **kw)}
    times: dict[str, list[float]] = {"shards": [], "memory": []}
    try:
        for step in range(1, steps + WARMUP + 1):
            kind = ("shards", "memory")[(step // window) % 2]
            start = time.perf_counter()
            loss, _ = module(samplers[kind].batch(step), teacher)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step > WARMUP:
                times[kind].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return times


def batch_times(blocks, info, reps: int = 300) -> float:
    """Median time (ms) to build one 16-row micro-batch."""
    from raydistill.data.blocks import BatchSampler

    sampler = BatchSampler(blocks, info, batch_size=16, grad_accum=1, rank=0, world_size=1, seed=0)
    times = []
    for step in range(1, reps + 1):
        t = time.perf_counter()
        sampler.batch(step)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


# ----------------------------------------------------------------------------------------------- the bench
def bench_data(tokens: tuple[int, ...] = (10_000_000, 100_000_000), cpus: tuple[int, ...] | None = None,
               text: str | None = None, workdir: str | None = None, parts: tuple[str, ...] = PARTS,
               steps: int = 40, cached_row: bool = True, keep: bool = False) -> dict:
    """``parts``: 'build' (each size on each CPU count, then training to the first step), 'two_node' (the
    smallest size on two simulated nodes), 'step' (step time from shards vs in memory, smallest size)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"bench data: unknown parts {sorted(unknown)}; allowed: {', '.join(PARTS)}")
    text_path = Path(text) if text else DEFAULT_TEXT
    if not text_path.is_file():
        raise FileNotFoundError(f"bench data: no text file at {text_path} (give --text FILE: a UTF-8 text file to "
                                "repeat, e.g. WikiText-2's wiki.train.tokens)")
    valid = text_path.with_name(VALID_NAME) if text_path.with_name(VALID_NAME).is_file() else text_path
    all_cpus = os.cpu_count() or 1
    cpus = tuple(cpus) if cpus else tuple(sorted({1, all_cpus}))
    work = Path(workdir or Path(tempfile.gettempdir()) / "raydistill-bench-data")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(text_path, work)
    rows, corpora = [], {}
    try:
        for n in tokens:
            corpus, approx = make_corpus(text_path, n, work, tokenizer)
            corpora[n] = corpus
            for c in (cpus if "build" in parts else ()):
                cache = work / f"cache-{_short(n)}-{c}cpu"
                shutil.rmtree(cache, ignore_errors=True)
                run = tempfile.mkdtemp(dir=work, prefix="run-")
                args = {"overrides": overrides(corpus, valid, tokenizer, str(cache), run, f"first-{c}", 3),
                        "cpus": c, "tokens": n, "started": time.time(), "repeats": 3 if n <= REPEAT_BELOW else 1}
                row = {"case": "build", "corpus_mb": round(corpus.stat().st_size / 1e6, 1), **_spawn("prepare", args)}
                if cached_row and c == max(cpus):
                    again = tempfile.mkdtemp(dir=work, prefix="run-")
                    args.update(started=time.time(), repeats=1,
                                overrides=overrides(corpus, valid, tokenizer, str(cache), again, "first-cached", 3))
                    cached = _spawn("prepare", args)
                    shutil.rmtree(again, ignore_errors=True)
                    rows.append(row)
                    row = {"case": "cached", "corpus_mb": row["corpus_mb"], **cached}
                rows.append(row)
                shutil.rmtree(run, ignore_errors=True)
                for extra in work.glob(f"{cache.name}-*"):  # the repeated builds' caches
                    shutil.rmtree(extra, ignore_errors=True)
                if not keep and not (c == max(cpus) and n == min(tokens)):
                    shutil.rmtree(cache, ignore_errors=True)
        smallest = min(tokens)
        if "two_node" in parts:
            cache = work / "cache-two-node"
            shutil.rmtree(cache, ignore_errors=True)
            run = tempfile.mkdtemp(dir=work, prefix="run-")
            args = {"overrides": overrides(corpora[smallest], valid, tokenizer, str(cache), run, "two-node", 3),
                    "cpus": 1, "nodes": 2, "tokens": smallest, "started": time.time(), "train": False}
            rows.append({"case": "two_node", "corpus_mb": round(corpora[smallest].stat().st_size / 1e6, 1),
                         **_spawn("prepare", args)})
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
        step = None
        if "step" in parts:
            cache = work / f"cache-{_short(smallest)}-{max(cpus)}cpu"  # built by 'build', or by the first fit
            run = tempfile.mkdtemp(dir=work, prefix="steps-")
            args = {"overrides": overrides(corpora[smallest], valid, tokenizer, str(cache), run, "steps",
                                           steps + WARMUP), "cpus": max(cpus), "out": run}
            times = _spawn("steps", args)
            shards, memory = statistics.median(times["shards"]), statistics.median(times["memory"])
            step = {"shards_step_s": shards, "memory_step_s": memory, "ratio": shards / memory, "target": 1.02,
                    "windows_s": {k: [round(x, 5) for x in v] for k, v in times.items()}}
            from raydistill.config import load_config
            from raydistill.train.plan import prepare

            plan = prepare(load_config(None, args["overrides"]))
            step["batch_ms_shards"] = round(batch_times(plan.blocks[0], plan.token_info), 3)
            step["batch_ms_memory"] = round(batch_times(plan.blocks[0].materialize(), plan.token_info), 3)
            inter = interleaved_step_times(plan, steps=max(100, 5 * steps))
            step["interleaved"] = {"shards_step_s": statistics.median(inter["shards"]),
                                   "memory_step_s": statistics.median(inter["memory"]),
                                   "steps": {k: len(v) for k, v in inter.items()}}
            step["interleaved"]["ratio"] = step["interleaved"]["shards_step_s"] / step["interleaved"]["memory_step_s"]
            shutil.rmtree(run, ignore_errors=True)
    finally:
        if not keep:
            for n, corpus in corpora.items():
                shutil.rmtree(corpus.parent, ignore_errors=True)
            for cache in work.glob("cache-*"):
                shutil.rmtree(cache, ignore_errors=True)
    return summarize(rows, step, cpus)


def summarize(rows: list[dict], step: dict | None, cpus: tuple[int, ...]) -> dict:
    builds = [r for r in rows if r["case"] == "build"]
    by = {(r["tokens_target"], r["cpus"]): r for r in builds}
    sizes = sorted({r["tokens_target"] for r in builds})
    result: dict = {"rows": rows, "step": step, "targets": {}}
    lo, hi = min(cpus), max(cpus)
    if len(sizes) > 1:
        small, big = by.get((sizes[0], hi)), by.get((sizes[-1], hi))
        if small and big:
            ratio = big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
            result["targets"]["driver_rss_ratio"] = {"value": round(ratio, 3), "target": 1.2, "met": ratio <= 1.2}
    for n in sizes:
        if (n, lo) in by and (n, hi) in by and hi > lo:
            speedup = by[(n, hi)]["tokens_per_s"] / by[(n, lo)]["tokens_per_s"]
            # Also without the stage's start (workers starting, imports): from the first piece to the last.
            pieces = by[(n, hi)]["tokens_per_s_pieces"] / by[(n, lo)]["tokens_per_s_pieces"]
            result["targets"][f"speedup_{_short(n)}"] = {"value": round(speedup, 3), "target": 1.7,
                                                         "met": speedup >= 1.7,
                                                         "from_first_to_last_piece": round(pieces, 3)}
    if step:
        result["targets"]["step_ratio"] = {"value": round(step["ratio"], 4), "target": 1.02, "met": step["ratio"] <= 1.02}
        if "interleaved" in step:
            r = step["interleaved"]["ratio"]
            result["targets"]["step_ratio_interleaved"] = {"value": round(r, 4), "target": 1.02, "met": r <= 1.02}
    result["table"] = table(rows, step, result["targets"])
    return result


def table(rows: list[dict], step: dict | None, targets: dict) -> str:
    head = (f"{'case':<10}{'tokens':>8}{'CPUs':>6}{'nodes':>6}{'tokens/s':>11}{'prepare s':>11}{'1st step s':>12}"
            f"{'driver MB':>11}{'data wkr MB':>13}{'train wkr MB':>14}")
    lines = ["data bench: WikiText-2 repeated to N tokens, BPE 8192, tiny GPT-2 teacher -> 1-block student, batch 8x64",
             head]
    for r in rows:
        lines.append(f"{r['case']:<10}{r['tokens'] / 1e6:>7.1f}M{r['cpus'] * (r.get('nodes') or 1) if r['case'] == 'two_node' else r['cpus']:>6}"
                     f"{r.get('nodes') or 1:>6}{r['tokens_per_s'] if r['case'] != 'cached' else 0:>11,}"
                     f"{r['prepare_s']:>11.1f}{r.get('first_step_s') or float('nan'):>12.1f}"
                     f"{r['driver_peak_rss_mb']:>11.0f}{r['data_worker_peak_rss_mb']:>13.0f}"
                     f"{r.get('train_worker_peak_rss_mb') or float('nan'):>14.0f}")
    if step:
        lines.append(f"step (Ray Train, A-B-B-A runs): shards {step['shards_step_s'] * 1e3:.2f} ms, in memory "
                     f"{step['memory_step_s'] * 1e3:.2f} ms, ratio {step['ratio']:.3f}; one micro-batch: "
                     f"{step['batch_ms_shards']:.3f} ms from shards, {step['batch_ms_memory']:.3f} ms in memory")
        if "interleaved" in step:
            i = step["interleaved"]
            lines.append(f"step (one process, alternating windows): shards {i['shards_step_s'] * 1e3:.2f} ms, in memory "
                         f"{i['memory_step_s'] * 1e3:.2f} ms, ratio {i['ratio']:.3f}")
    for name, t in targets.items():
        extra = f"; from the first piece to the last: {t['from_first_to_last_piece']}" \
            if "from_first_to_last_piece" in t else ""
        lines.append(f"target {name}: {t['value']} (target {'<=' if 'ratio' in name else '>='} {t['target']}): "
                     f"{'met' if t['met'] else 'NOT met'}{extra}")
    return "\n".join(lines)


if __name__ == "__main__":
    mode, payload = sys.argv[1], json.loads(sys.argv[2])
    result = child_prepare(payload) if mode == "prepare" else child_steps(payload)
    print(json.dumps(result), flush=True)
