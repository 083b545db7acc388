"""``raydistill bench throughput``: the distillation step's speed in a bare PyTorch loop, through DeepSpeed's
engine alone (in this process) and through Ray Train + DeepSpeed (one worker), side by side in one invocation,
on whatever device is present.

All sides run raydistill's own ``DistillModule``, models, objectives and batches at the same batch, sequence
length and precision. The bare loop is what the step costs without the framework: the batch built and moved,
forward (bf16 autocast where asked), backward, gradient clipping, AdamW (fused on CUDA), nothing else. The
DeepSpeed side takes turns with it window by window. Each framework run (``raydistill train`` in a
subprocess) is time-sliced with it on CPU (``raydistill.bench.timeslice``: the run frozen while a bare window
runs) and has a bare run before and after it on a GPU (B F B ...), so a machine whose speed drifts moves both
alike. Times are medians of ``window``-step windows after a warm-up window (the framework's are its
``metrics.jsonl`` rows, logged every ``window`` steps).

FLOPs per token are counted on one bare step with ``torch.utils.flop_counter`` (matrix multiplies and
attention of the student's forward and backward and the teacher's forward); achieved FLOP/s is that times
tokens/s, MFU that over the device's dense peak (``monitoring.metrics.peak_flops``: data sheet on GPUs, a
measured GEMM on CPU)."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from raydistill.bench.timeslice import SlicedRun
from raydistill.config import dump_config, load_config
from raydistill.data.blocks import BatchSampler
from raydistill.errors import ConfigError, RaydistillError
from raydistill.models.loading import build_model, init_from_teacher, prepare_student, teacher_dtype
from raydistill.monitoring.metrics import counted_flops, mfu, peak_flops, peak_memory_bytes, step_flops_per_token
from raydistill.objectives import build_objectives
from raydistill.train.ds_config import deepspeed_config, import_deepspeed
from raydistill.train.host_memory import keep_freed_host_memory
from raydistill.train.plan import prepare
from raydistill.train.step import DistillModule
from raydistill.train.worker import adamw, param_groups

# GPT-2-medium's shape (24 blocks x 1024, 16 heads, its 50,257-token vocabulary; random weights): its size, not
# its tokenizer, sets the work, so the corpus keeps its small trained tokenizer and the model its full head.
GPT2_MEDIUM = {"n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024, "vocab_size": 50257}

PRESETS: dict[str, dict] = {
    # One to three minutes on 2 CPU cores. 16 x 256 tokens: at 16 x 128 (a ~135 ms step) DeepSpeed's fixed
    # per-step work alone (ZeRO-2's gradient hooks, a world-size-1 all-reduce, its flat-partition step: ~7 ms,
    # profiled) is ~5% of the step, a cost that does not grow with the tokens and so says little of real steps.
    "cpu": dict(teacher="tiny-gpt2", teacher_overrides={}, student_layers=2, batch_size=16, block_size=256,
                precision="fp32", steps=40),
    # The GPU case: GPT-2-medium-sized teacher -> 12-block student initialised from it (use block_size=1024 too).
    "gpt2-medium": dict(teacher="tiny-gpt2", teacher_overrides=GPT2_MEDIUM, student_layers=12, batch_size=16,
                        block_size=512, precision="bf16", steps=30),
}
TARGET = 1.05
# Config keys the bench sets from its own options (or fixes: one worker, its run directories, its windows);
# ``--set`` refuses them so that the report's columns describe what ran.
OWN_KEYS = {"teacher.name": "--teacher", "student.num_layers": "--student-layers", "train.batch_size": "--batch-size",
            "data.block_size": "--block-size", "train.precision": "--precision", "deepspeed.zero_stage": "--zero-stage",
            "train.max_steps": "--steps", "train.log_every": None, "output_dir": None, "cache_dir": None,
            "scaling.num_workers": None, "scaling.use_gpu": None,
            # no evaluation, checkpoint or Ray report before the end: the windows time training steps only (a
            # row's step time leaves those out, and a freeze that fell in one would be taken out twice)
            "train.eval_every": None, "train.checkpoint_every": None, "train.report_every": None,
            "ray.address": None}  # the framework run starts a local cluster of its own, frozen while bare windows run


def bench_config(out: str, cache: str, *, teacher: str, teacher_overrides: dict, student_layers: int, batch_size: int,
                 block_size: int, precision: str, objectives: tuple[str, ...], zero_stage: int, steps: int,
                 window: int, use_gpu: bool, overrides: tuple[str, ...] = ()):
    """The experiment config both sides run: ``steps`` timed steps after one warm-up window. ``overrides``
    (``key=value``, as ``raydistill train`` takes them) come last, so they win over the bench's own."""
    return load_config(None, [
        f"teacher.name={teacher}", *(f"teacher.config_overrides.{k}={v}" for k, v in teacher_overrides.items()),
        f"student.num_layers={student_layers}", f"output_dir={out}", f"cache_dir={cache}",
        *(f"objectives.{name}.weight=1" for name in objectives), "data.builtin.num_documents=1000",
        f"data.block_size={block_size}", f"train.batch_size={batch_size}", f"train.max_steps={steps + window}",
        f"train.precision={precision}", f"train.log_every={window}", "train.eval_batches=1", "train.grad_clip=1.0",
        "train.eval_every=0", "train.checkpoint_every=0", "train.report_every=0",
        f"deepspeed.zero_stage={zero_stage}", "scaling.num_workers=1", f"scaling.use_gpu={str(use_gpu).lower()}",
        "ray.dashboard=false", "ray.log_to_driver=false", "monitoring.progress=plain", *overrides])


class BareLoop:
    """The reference: raydistill's modules, optimizer and batches in a plain loop on one device."""

    def __init__(self, cfg, device: torch.device):
        plan = prepare(cfg)
        t = cfg.train
        self.device, self.cuda = device, device.type == "cuda"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # as the Ray worker gets
        torch.manual_seed(t.seed)
        # Built as the worker builds them (model options, dtypes, checkpointing/compile of the student).
        teacher = build_model(plan.teacher_config, plan.teacher_source, None, cfg.teacher).eval().requires_grad_(False)
        student = build_model(plan.student_config, plan.student_source, None, cfg.student)
        init_from_teacher(student, teacher, plan.init_layers, plan.block_paths[0])
        prepare_student(student, cfg.student, plan.block_paths[0])
        self.module = DistillModule(student, build_objectives(plan.objectives, plan.info), plan.info,
                                    plan.block_paths).to(device)
        self.teacher = teacher.to(device=device, dtype=teacher_dtype(cfg))
        self.optimizer = adamw(param_groups(self.module, t.weight_decay), t, device)
        self.grad_clip = t.grad_clip
        self.data = BatchSampler(plan.blocks[0], plan.token_info, batch_size=t.batch_size, grad_accum=1, rank=0,
                                 world_size=1, seed=t.seed)
        self.seq_len = cfg.data.block_size

    def step(self, n: int) -> int:
        """One optimiser step on batch ``n``; returns its (non-padding) tokens, counted on the host."""
        cpu = self.data.batch(n)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss, _ = self.module(self._moved(cpu), self.teacher, host=cpu)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(cpu["attention_mask"].sum())

    def _moved(self, cpu: dict) -> dict:
        return {k: (v.pin_memory() if self.cuda else v).to(self.device, non_blocking=True) for k, v in cpu.items()}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def window(self, first: int, window: int) -> tuple[float, int]:
        """(seconds, tokens) of ``window`` steps from batch ``first``."""
        self.sync()
        start, tokens = time.perf_counter(), 0
        for n in range(first, first + window):
            tokens += self.step(n)
        self.sync()
        return time.perf_counter() - start, tokens

    def windows(self, steps: int, window: int) -> list[tuple[float, int]]:
        """(seconds, tokens) of each ``window``-step window after a warm-up window."""
        return interleaved([self], steps, window)[0]

    def flops_per_token(self, n: int = 1) -> tuple[float, float]:
        """(counted, estimated) FLOPs per token of one step: the flop counter's, and the 6N + 2N_teacher +
        attention estimate the training metrics use (``monitoring.metrics.step_flops_per_token``)."""
        tokens = []
        counted = counted_flops(lambda: tokens.append(self.step(n)))
        # Per position: the counter sees every position, padding included, as the device computes them.
        positions = self.data.batch_size * self.seq_len
        estimate = step_flops_per_token(self.module, self.teacher, self.seq_len, {None: self.data.batch_size})
        return counted / positions, estimate


class EngineLoop(BareLoop):
    """The bare loop's step through DeepSpeed's engine as the workers configure it (ZeRO stage, precision,
    clipping, ``deepspeed.extra``), in this process and without Ray: what DeepSpeed alone adds to the step."""

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        deepspeed = import_deepspeed()
        self.engine = deepspeed.initialize(model=self.module, optimizer=self.optimizer,
                                           config=deepspeed_config(cfg, 1), dist_init_required=False)[0]

    def step(self, n: int) -> int:
        cpu = self.data.batch(n)
        loss, _ = self.engine(self._moved(cpu), self.teacher, host=cpu)
        self.engine.backward(loss)
        self.engine.step()
        return int(cpu["attention_mask"].sum())


@contextlib.contextmanager
def one_process_group(device: torch.device):
    """A one-rank process group for DeepSpeed in this process (gloo on CPU, NCCL on a GPU), unless one exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    # What a launcher sets and DeepSpeed asks for; put back afterwards, so that a Ray cluster started later
    # from this process does not hand them to its workers.
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    if device.type == "cpu":
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")  # as the launcher sets it for CPU workers
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/store",
                                    rank=0, world_size=1)
            try:
                yield
            finally:
                comm = sys.modules.get("deepspeed.comm.comm")
                if comm is not None and comm.cdb is not None:
                    # DeepSpeed's, which also drops the groups it cached (its clone of the world group): a later
                    # engine in this process would otherwise look them up in the destroyed group's place.
                    comm.destroy_process_group()
                else:
                    dist.destroy_process_group()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def interleaved(loops: list[BareLoop], steps: int, window: int) -> list[list[tuple[float, int]]]:
    """Each loop's windows, one window of each in turn (after a warm-up window each): a machine whose speed
    drifts slows them alike, so their ratio is steadier than that of runs one after another."""
    out: list[list[tuple[float, int]]] = [[] for _ in loops]
    for w in range(steps // window + 1):
        for loop, windows in zip(loops, out):
            timed = loop.window(1 + w * window, window)
            if w:
                windows.append(timed)
    return out


Windows = list[tuple[float, int]]  # (seconds, tokens) of each timed window


def window_ratios(numerator: Windows, denominator: Windows) -> list[float]:
    """The time ratio of each window pair (run back to back)."""
    return [a / b for (a, _), (b, _) in zip(numerator, denominator)]


def paired_ratio(numerator: Windows, denominator: Windows) -> float:
    """The median over window pairs (run back to back) of their time ratio."""
    return statistics.median(window_ratios(numerator, denominator))


def _framework(cfg, window: int, bare: BareLoop | None = None) -> tuple[Windows, tuple[Windows, Windows], int | None]:
    """One framework run: ``raydistill train`` on ``cfg`` in a subprocess, with its own local Ray cluster (shut
    down when it exits, as the command does: Ray's idle daemons must not share the machine with later bare
    runs). With ``bare`` (CPU) the run is time-sliced (``raydistill.bench.timeslice``): after each of its rows
    but the last, the whole run is frozen while ``bare`` runs the next window's batches alone, and the frozen
    time is taken out of the framework's window. Returns the framework's timed windows, the sliced pairs (the
    framework's windows, and the bare windows run inside them) and the worker's peak memory."""
    out = Path(cfg.output_dir)
    config = out.with_suffix(".yaml")
    config.write_text(dump_config(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a local cluster of its own
    last = cfg.train.max_steps
    run = SlicedRun([sys.executable, "-m", "raydistill.cli", "train", str(config)], out / "metrics.jsonl",
                    out.with_suffix(".log"), reference=(lambda row: bare.window(row["step"] + 1, window))
                    if bare is not None else None, slice_after=lambda row: row["step"] < last, env=env,
                    name="the framework run (raydistill train)")
    rows = run.run()
    # Rows every `window` steps, each the mean of the steps since the one before; the first holds the warm-up.
    frozen = {s.after_step + window: s for s in run.slices}
    windows, paired, bare_windows = [], [], []
    for r in rows:
        if r["step"] <= window:
            continue
        cut = frozen.get(r["step"])
        windows.append((r["step_time_s"] * window - (cut.frozen_s if cut else 0.0),
                        r["tokens_per_s"] * r["step_time_s"] * window))
        if cut:
            paired.append(windows[-1])
            bare_windows.append(cut.result)
    if bare is not None and not paired:
        raise RaydistillError(f"bench: no window of the framework run could be paired with a bare one ({len(rows)} "
                              f"rows); allowed: --steps of at least 2 windows ({2 * window})")
    return windows, (paired, bare_windows), max((r.get("peak_memory_bytes") or 0 for r in rows), default=None)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A bootstrap interval of the median of ``values`` (scipy's percentile bootstrap, fixed seed): how far the
    ratio could move on this machine's noise. None for fewer than 5 values."""
    if len(values) < 5:
        return None
    from scipy.stats import bootstrap

    ci = bootstrap((values,), statistics.median, vectorized=False, confidence_level=confidence, n_resamples=2000,
                   method="percentile", random_state=0).confidence_interval
    return float(ci.low), float(ci.high)


def round_ratios(bare_runs: list[list[float]], framework_runs: list[list[float]]) -> list[float]:
    """Each framework run's median window over the median of the bare windows on either side of it (bare run r
    before framework run r, bare run r + 1 after): one ratio per round, drift between rounds cancelled."""
    return [statistics.median(fw) / statistics.median(bare_runs[r] + bare_runs[r + 1])
            for r, fw in enumerate(framework_runs)]


def _side(windows: list[tuple[float, int]], window: int, fpt: float, peak: float | None, memory) -> dict:
    step = statistics.median(s for s, _ in windows) / window
    tps = statistics.median(tok / s for s, tok in windows)
    return {"tokens_per_s": tps, "step_time_s": step, "flops_per_s": fpt * tps, "mfu": mfu(fpt, tps, peak),
            "peak_memory_bytes": memory, "windows": len(windows),
            # every window's step time, in the order run (the bare loop's: before the framework, then after)
            "window_step_times_s": [s / window for s, _ in windows]}


def steal_share(before, after) -> float | None:
    """The share of the machine's CPU time that the hypervisor gave to other guests (``steal``) between two
    ``psutil.cpu_times()`` readings; None where the OS reports no steal time. On a shared VM a busy host slows
    the framework's extra processes along with its worker, so the bench reports this beside its ratio."""
    if not hasattr(before, "steal"):
        return None
    # guest time is already counted in user and nice (as psutil's own cpu_percent does)
    total = lambda t: sum(t) - getattr(t, "guest", 0) - getattr(t, "guest_nice", 0)  # noqa: E731
    elapsed = total(after) - total(before)
    return (after.steal - before.steal) / elapsed if elapsed > 0 else None


def bench_throughput(preset: str = "cpu", *, teacher: str | None = None, teacher_overrides: dict | None = None,
                     student_layers: int | None = None, batch_size: int | None = None, block_size: int | None = None,
                     precision: str | None = None, objectives: tuple[str, ...] = ("task", "kd"), zero_stage: int = 2,
                     steps: int | None = None, window: int = 5, framework: bool = True, rounds: int = 1,
                     overrides: tuple[str, ...] = ()) -> dict:
    """A bare run, DeepSpeed's windows in turns with the bare loop's, then ``rounds`` framework runs: on CPU
    each time-sliced with the bare loop (its round ratio: the median of its pairs' ratios), on a GPU each
    between two bare runs (B F B F B ..., ``round_ratios``). The ratio is the median over all pairs on CPU, of
    the rounds' ratios on a GPU; the sides' columns are medians over all their windows."""
    if rounds < 1:
        raise ConfigError(f"rounds: {rounds!r} is not a number of rounds; allowed: an integer >= 1")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in OWN_KEYS or key.startswith("objectives.") and key.endswith(".weight"):
            option = OWN_KEYS.get(key, "--objectives")
            raise ConfigError(f"--set {item!r}: the bench sets {key} itself; allowed: "
                              + (f"its option {option}" if option else "any other config key"))
    base = PRESETS[preset]
    setup = dict(teacher=teacher or base["teacher"],
                 teacher_overrides=base["teacher_overrides"] if teacher_overrides is None else teacher_overrides,
                 student_layers=student_layers or base["student_layers"], batch_size=batch_size or base["batch_size"],
                 block_size=block_size or base["block_size"], precision=precision or base["precision"],
                 objectives=tuple(objectives), zero_stage=zero_stage, steps=steps or base["steps"], window=window)
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    cpu_before = psutil.cpu_times()
    with tempfile.TemporaryDirectory() as tmp:
        # Every round's framework run writes its own run directory; the config is checked before anything runs.
        configs = [bench_config(f"{tmp}/run{r}", f"{tmp}/cache", use_gpu=use_gpu, overrides=tuple(overrides),
                                **setup) for r in range(rounds if framework else 1)]
        if not use_gpu:
            keep_freed_host_memory()  # as training workers do (scaling.keep_freed_host_memory)
        cfg = configs[0]
        bare = BareLoop(cfg, device)
        peak, peak_source = peak_flops(device, setup["precision"])
        if use_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        bare_runs = [bare.windows(setup["steps"], window)]
        counted, estimate = bare.flops_per_token()
        bare_memory = peak_memory_bytes(device)
        engine_windows: list[tuple[float, int]] = []
        deepspeed_ratio = None
        if framework:  # DeepSpeed's share of the framework's cost, window by window against the bare loop
            with one_process_group(device):
                engine = EngineLoop(cfg, device)
                bare_windows, engine_windows = interleaved([bare, engine], setup["steps"], window)
                deepspeed_ratio = paired_ratio(engine_windows, bare_windows)
                bare_runs[0] += bare_windows
                del engine
        # On CPU each framework run is time-sliced with the bare loop; on a GPU (where a frozen run's queued
        # kernels keep running) it runs between two bare runs, the bare loop freed so the worker has the device.
        sliced = not use_gpu
        if not sliced:
            del bare
            torch.cuda.empty_cache()  # the cached blocks too: the worker is another process
        fw_runs, fw_memory, ratios, pair_ratios = [], None, [], []
        for r, run_cfg in enumerate(configs if framework else []):
            print(f"[raydistill] bench: framework run {r + 1}/{len(configs)} (Ray Train + DeepSpeed, 1 worker"
                  + (", time-sliced with the bare loop)" if sliced else ")"), file=sys.stderr, flush=True)
            fw_windows, pairs, memory = _framework(run_cfg, window, bare if sliced else None)
            fw_runs.append(fw_windows)
            fw_memory = max(fw_memory or 0, memory or 0) or None
            if sliced:
                bare_runs.append(pairs[1])
                round_pairs = window_ratios(*pairs)
                ratios.append(statistics.median(round_pairs))
                pair_ratios += round_pairs
            else:
                again = BareLoop(cfg, device)
                bare_runs.append(again.windows(setup["steps"], window))
                del again
                torch.cuda.empty_cache()
        if fw_runs and not sliced:
            ratios = round_ratios([[s for s, _ in run] for run in bare_runs],
                                  [[s for s, _ in run] for run in fw_runs])
    rows = {"bare": _side([w for run in bare_runs for w in run], window, counted, peak, bare_memory)}
    if engine_windows:  # its memory is not its own: it shares this process (and device) with the bare loop
        rows["deepspeed"] = _side(engine_windows, window, counted, peak, None)
    if fw_runs:
        rows["framework"] = _side([w for run in fw_runs for w in run], window, counted, peak, fw_memory)
    name = torch.cuda.get_device_name(device) if use_gpu else f"CPU ({torch.get_num_threads()} threads)"
    result = {"preset": preset, "device": name, **setup, "rounds": rounds, "overrides": list(overrides),
              "flops_per_token": counted, "flops_per_token_estimate": estimate, "peak_flops": peak,
              "peak_flops_source": peak_source, "bare": rows["bare"], "deepspeed": rows.get("deepspeed"),
              "framework": rows.get("framework"),
              # sliced (CPU): the median over every pair of every round; else the median of the rounds' ratios
              "ratio": statistics.median(pair_ratios or ratios) if ratios else None,
              "ratio_interval": median_interval(pair_ratios), "pairs": len(pair_ratios) or None,
              "round_ratios": ratios or None, "deepspeed_ratio": deepspeed_ratio, "target": TARGET,
              "steal": steal_share(cpu_before, psutil.cpu_times())}
    result["table"] = _table(result)
    return result


def _table(r: dict) -> str:
    head = (f"throughput bench on {r['device']}: {r['teacher']} teacher -> {r['student_layers']}-block student, "
            f"{'+'.join(r['objectives'])}, batch {r['batch_size']}x{r['block_size']}, {r['precision']}, "
            f"ZeRO-{r['zero_stage']}, {r['steps']} timed steps per side"
            + (f" and round, {r['rounds']} rounds" if r["rounds"] > 1 else "")
            + (f"; set {' '.join(r['overrides'])}" if r["overrides"] else "") + "\n"
            f"counted {r['flops_per_token'] / 1e9:.4g} GFLOP/token (estimate {r['flops_per_token_estimate'] / 1e9:.4g})")
    if r["peak_flops"]:
        head += f"; peak {r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_flops_source']})"
    lines = [head, f"{'loop':<24}{'tokens/s':>12}{'step (ms)':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak mem (MB)':>15}"]
    for label, key in (("bare PyTorch", "bare"), ("DeepSpeed, no Ray", "deepspeed"),
                       ("Ray Train + DeepSpeed", "framework")):
        side = r.get(key)
        if side:
            mem = side["peak_memory_bytes"]
            lines.append(f"{label:<24}{side['tokens_per_s']:>12.0f}{side['step_time_s'] * 1e3:>11.2f}"
                         f"{side['flops_per_s'] / 1e12:>10.3f}{(side['mfu'] or 0) * 100:>7.1f}%"
                         + (f"{mem / 2**20:>15.0f}" if mem else f"{'-':>15}"))
    if r["ratio"] is not None:
        rounds = ", ".join(f"{x:.3f}" for x in r["round_ratios"])
        if r["pairs"]:
            how = f"median of {r['pairs']} window pairs" + (f"; rounds {rounds}" if len(r["round_ratios"]) > 1 else "")
            if r["ratio_interval"]:
                how += "; 95% interval {:.3f}-{:.3f}".format(*r["ratio_interval"])
        else:
            how = f"median of the rounds' {rounds}" if len(r["round_ratios"]) > 1 else ""
        lines.append(f"ratio (framework / bare step time): {r['ratio']:.3f}   target <= {r['target']:.2f}"
                     + (f"   ({how})" if how else ""))
    if r["deepspeed_ratio"] is not None:
        lines.append(f"of which DeepSpeed's engine (in this process, windows interleaved with the bare loop's): "
                     f"{r['deepspeed_ratio']:.3f}")
    if r["steal"] is not None:
        lines.append(f"CPU time the hypervisor gave to other guests during the bench (steal): {r['steal']:.1%}")
    return "\n".join(lines)
