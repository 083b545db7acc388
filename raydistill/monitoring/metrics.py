"""Prometheus series of runs and sweeps, through ``ray.util.metrics``.

Ray's metrics agent on each node exports what the processes of that node record, on the node's metrics
export port, as ``ray_<name>`` (counters with ``_total``, histograms as ``_bucket``/``_sum``/``_count``),
with Ray's own labels (session, node) added. ``SERIES`` is the catalogue: the Grafana dashboard's queries
and the tests are checked against it.

Training workers record at the logging interval from the host floats the step loop already holds (the
loss terms are reduced over workers for logging anyway): no barrier and no device synchronisation is added
to a step. The sweep driver records trial counts, the best metric and benchmark scores."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from raydistill.ranking import DONE

PREFIX = "raydistill_"
RUN_TAGS = ("run", "trial", "rank")  # trial: the Tune trial id in sweeps, "" for `raydistill train`
DURATION_BUCKETS_S = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]
SWEEP_STATES = ("pending", "running", "finished", "stopped", "interrupted", "failed")


@dataclass(frozen=True)
class Series:
    name: str
    kind: Literal["gauge", "counter", "histogram"]
    description: str
    tags: tuple[str, ...]

    def exported(self) -> list[str]:
        """The names Prometheus sees for this series."""
        base = f"ray_{self.name}"
        if self.kind == "counter":
            return [f"{base}_total"]
        if self.kind == "histogram":
            return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
        return [base]


SERIES: dict[str, Series] = {s.name: s for s in [
    # Every rank, at the logging interval.
    Series("raydistill_train_step", "gauge", "last logged optimiser step", RUN_TAGS),
    Series("raydistill_train_progress", "gauge", "fraction of train.max_steps done", RUN_TAGS),
    Series("raydistill_train_tokens_per_s", "gauge", "non-padding tokens per second on this rank", RUN_TAGS),
    Series("raydistill_train_tokens", "counter", "non-padding tokens trained on by this rank", RUN_TAGS),
    Series("raydistill_train_step_time_s", "gauge", "mean seconds per optimiser step since the previous log",
           RUN_TAGS),
    Series("raydistill_train_flops_per_s", "gauge", "estimated achieved FLOP/s of this rank's device "
           "(6N + 12LdT per trained token, 2N + 4LdT per teacher token)", RUN_TAGS),
    Series("raydistill_train_mfu", "gauge", "model FLOP utilisation: estimated FLOP/s over the device's peak "
           "(where known or set in monitoring.peak_flops)", RUN_TAGS),
    Series("raydistill_gpu_memory_bytes", "gauge", "CUDA memory of this rank: allocated, reserved, peak "
           "allocated", RUN_TAGS + ("kind",)),
    Series("raydistill_train_updated_timestamp_s", "gauge", "unix time of this rank's last logged step "
           "(time() minus it: how long a run has been silent)", RUN_TAGS),
    Series("raydistill_checkpoint_seconds", "histogram", "time to write and report one checkpoint", RUN_TAGS),
    Series("raydistill_export_seconds", "histogram", "time to export the student (save_pretrained layout)",
           RUN_TAGS),
    # Rank 0 (the values are the same on every rank: reduced over workers).
    Series("raydistill_train_loss", "gauge", "total weighted training loss", RUN_TAGS),
    Series("raydistill_train_loss_term", "gauge", "each logged loss term (and objectives' diagnostics)",
           RUN_TAGS + ("term",)),
    Series("raydistill_train_lr", "gauge", "learning rate", RUN_TAGS),
    Series("raydistill_val", "gauge", "validation metrics (val/loss, val/ce, val/ppl, terms, rougeL)",
           ("run", "trial", "metric")),
    Series("raydistill_val_iia", "gauge", "interchange-intervention agreement per aligned pair (and mean)",
           ("run", "trial", "pair")),
    # The progress board (one actor per driver): the phase each run or trial is in.
    Series("raydistill_phase", "gauge", "1 for the phase a run or trial is in, 0 for the phases it left",
           ("run", "trial", "phase")),
    # The sweep driver.
    Series("raydistill_sweep_trials", "gauge", "trials of a sweep by state", ("run", "state")),
    Series("raydistill_sweep_best", "gauge", "best value of the sweep's metric so far", ("run", "metric")),
    Series("raydistill_sweep_bench_score", "gauge", "benchmark score of a finished trial (bench/<task>/<metric>)",
           ("run", "trial", "score")),
]}

_OBJECTS: dict[str, Any] = {}  # one ray.util.metrics object per series and process


def _metric(name: str):
    obj = _OBJECTS.get(name)
    if obj is None:
        from ray.util import metrics

        s = SERIES[name]
        if s.kind == "gauge":
            obj = metrics.Gauge(name, s.description, s.tags)
        elif s.kind == "counter":
            obj = metrics.Counter(name, s.description, s.tags)
        else:
            obj = metrics.Histogram(name, s.description, DURATION_BUCKETS_S, s.tags)
        _OBJECTS[name] = obj
    return obj


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Recorder:
    """Records series; a failure to record (never expected) costs one warning and the metrics, not the run."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def _set(self, name: str, value: float, tags: dict[str, str]) -> None:
        if _finite(value):
            _metric(name).set(float(value), tags=tags)

    def _guarded(self, fn, *args) -> None:
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - monitoring must never end a run
            self.enabled = False
            print(f"[raydistill] warning: metrics export failed ({type(e).__name__}: {e}); the run goes on "
                  "without it", flush=True)


class RunMetrics(_Recorder):
    """One rank's series of one run. ``log`` takes the row the loop has just built at a logging step."""

    def __init__(self, run: str, trial: str, rank: int, max_steps: int, flops_per_token: float | None,
                 peak_flops: float | None, device=None, enabled: bool = True):
        super().__init__(enabled)
        self.tags = {"run": run, "trial": trial, "rank": str(rank)}
        self.rank, self.max_steps = rank, max_steps
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.cuda = device is not None and getattr(device, "type", None) == "cuda"
        self.device = device

    def log(self, metrics: dict[str, Any], terms: list[str], tokens: int, seconds: float) -> None:
        """``metrics``: the logged row (step, loss, terms, lr, tokens_per_s, step_time_s, val/*); ``terms``: its
        loss-term keys; ``tokens``: this rank's tokens since the previous log, trained in ``seconds``."""
        self._guarded(self._log, metrics, terms, tokens, seconds)

    def _log(self, metrics: dict[str, Any], terms: list[str], tokens: int, seconds: float) -> None:
        t = self.tags
        step = metrics["step"]
        self._set("raydistill_train_step", step, t)
        self._set("raydistill_train_progress", step / self.max_steps, t)
        # The row's tokens_per_s is the run's (every rank's tokens); this rank's own is what its device did (ranks
        # differ where rows differ in length: prompt + response).
        rank_tps = tokens / max(seconds, 1e-9)
        self._set("raydistill_train_tokens_per_s", rank_tps, t)
        self._set("raydistill_train_step_time_s", metrics["step_time_s"], t)
        if tokens > 0:
            _metric("raydistill_train_tokens").inc(float(tokens), tags=t)
        if self.flops_per_token:
            flops = self.flops_per_token * rank_tps
            self._set("raydistill_train_flops_per_s", flops, t)
            if self.peak_flops:
                self._set("raydistill_train_mfu", flops / self.peak_flops, t)
        if self.cuda:
            import torch

            # The caching allocator's counters: host-side, no synchronisation.
            for kind, value in (("allocated", torch.cuda.memory_allocated(self.device)),
                                ("reserved", torch.cuda.memory_reserved(self.device)),
                                ("peak_allocated", torch.cuda.max_memory_allocated(self.device))):
                self._set("raydistill_gpu_memory_bytes", value, {**t, "kind": kind})
        self._set("raydistill_train_updated_timestamp_s", time.time(), t)
        if self.rank != 0:
            return
        self._set("raydistill_train_loss", metrics.get("loss"), t)
        self._set("raydistill_train_lr", metrics.get("lr"), t)
        for term in terms:
            if term != "loss":
                self._set("raydistill_train_loss_term", metrics.get(term), {**t, "term": term})
        run_trial = {"run": t["run"], "trial": t["trial"]}
        for key, value in metrics.items():
            if key.startswith("val/iia/"):
                self._set("raydistill_val_iia", value, {**run_trial, "pair": key[len("val/iia/"):]})
            elif key.startswith("val/"):
                self._set("raydistill_val", value, {**run_trial, "metric": key[len("val/"):]})

    def duration(self, what: Literal["checkpoint", "export"], seconds: float) -> None:
        self._guarded(lambda: _metric(f"raydistill_{what}_seconds").observe(float(seconds), tags=self.tags))


class SweepMetrics(_Recorder):
    """The sweep driver's series: trials by state, the best metric so far, each finished trial's scores."""

    def __init__(self, sweep: str, metric: str, mode: str, enabled: bool = True):
        super().__init__(enabled)
        self.sweep, self.metric, self.mode = sweep, metric, mode

    def update(self, rows: list[dict[str, Any]]) -> None:
        self._guarded(self._update, rows)

    def _update(self, rows: list[dict[str, Any]]) -> None:
        counts = {state: 0 for state in SWEEP_STATES}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        for state, n in counts.items():
            self._set("raydistill_sweep_trials", n, {"run": self.sweep, "state": state})
        # Ranked trials only (raydistill.ranking): a failed, interrupted or running trial's value is intermediate.
        values = [row[self.metric] for row in rows if row.get("status") in DONE and _finite(row.get(self.metric))]
        if values:
            best = min(values) if self.mode == "min" else max(values)
            self._set("raydistill_sweep_best", best, {"run": self.sweep, "metric": self.metric})
        for row in rows:
            for key, value in row.items():
                if key.startswith("bench/"):
                    self._set("raydistill_sweep_bench_score", value,
                              {"run": self.sweep, "trial": str(row["trial"]), "score": key[len("bench/"):]})


def metrics_endpoints() -> dict[str, str]:
    """Node id -> the Prometheus endpoint of every alive node of the connected cluster (what Prometheus scrapes;
    ``ray metrics launch-prometheus`` finds them through Ray's service discovery file)."""
    import ray

    return {n["NodeID"]: f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")}


def metrics_endpoint() -> str | None:
    """This driver's node's Prometheus endpoint."""
    import ray

    try:
        return metrics_endpoints().get(ray.get_runtime_context().get_node_id())
    except Exception:  # noqa: BLE001 - only used to tell the user where to look
        return None


# ----------------------------------------------------------------------------------------------- FLOPs
def _head_params(model) -> int:
    out = model.get_output_embeddings()
    return 0 if out is None else out.weight.numel()


def _matmul_params(model, head: bool = True) -> int:
    """Parameters that take part in a matrix multiply per token: all but the input and position embeddings,
    plus the output head when it shares the input embedding's weight (it is a V x H product per token).
    ``head=False``: without the output head, for a pass that never computes the full logits."""
    n = model.num_parameters(exclude_embeddings=True)
    out, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out is not None and embed is not None and out.weight is embed.weight
    return n + (_head_params(model) if tied else 0) - (0 if head else _head_params(model))


def flops_per_token(student, teacher, layers: tuple[int, int | None], hidden: tuple[int, int | None],
                    seq_len: int, teacher_runs: bool, *, student_head: bool = True, teacher_head: bool = True,
                    student_head_search: bool = False) -> float:
    """Estimated FLOPs per trained token of a standard step (PaLM's appendix B): 6N + 12LdT for the student
    (forward and backward), 2N + 4LdT for the teacher's forward when an objective uses it; each model's output
    head (V x H) counted only where the step computes its full logits (``student_head``, ``teacher_head``), and
    the student's once more forward only for a search over the whole vocabulary without them
    (``student_head_search``: td's fused head). IIT's extra partial passes, generation and a fused head's K
    gathered columns are not counted, so MFU is a lower bound for them."""
    s_layers, t_layers = layers
    s_hidden, t_hidden = hidden
    total = 6.0 * _matmul_params(student, student_head) + 12.0 * s_layers * s_hidden * seq_len
    if student_head_search and not student_head:
        total += 2.0 * _head_params(student)
    if teacher is not None and teacher_runs and t_layers and t_hidden:
        total += 2.0 * _matmul_params(teacher, teacher_head) + 4.0 * t_layers * t_hidden * seq_len
    return total


def step_flops_per_token(module, teacher, seq_len: int, sequences: dict[str | None, int],
                         cached_topk: bool = False) -> float:
    """``flops_per_token`` of a ``DistillModule``'s step, per stream as its objectives run it (the main batch,
    key None, and each extra stream by name), weighted by the stream's ``sequences`` per step: the teacher
    only where that stream's objectives run it, a head only where they ask for full logits (not for a fused
    td head, cosine alone, a teacher asked for block outputs, or top-K read from the teacher cache
    (``cached_topk``))."""
    info = module.info
    needs = {None: module.needs, **module.stream_needs}
    total = 0.0
    for name, n in needs.items():
        total += sequences[name] * flops_per_token(
            module.student, teacher, (info.student_layers, info.teacher_layers),
            (info.student_hidden, info.teacher_hidden), seq_len, n.teacher_runs(cached_topk),
            student_head=n.student_logits, student_head_search=n.student_vocab_search,
            teacher_head=n.teacher_logits or (n.teacher_topk > 0 and not cached_topk))
    return total / sum(sequences[name] for name in needs)


# Dense peak FLOP/s per device (vendor data sheets; SXM parts unless named): 16-bit tensor cores, and fp32
# without TF32 (PyTorch's default for matmuls). Matched word by word against torch.cuda.get_device_name
# ("NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB"): a substring match would take an L40 for an L4 and an H100 NVL
# for an SXM part. First match wins, so a named variant comes before its family.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200 NVL", 835e12, 60e12),
    ("H200", 989e12, 67e12),
    ("H100 NVL", 835e12, 60e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("GH200", 989e12, 67e12),
    ("B200", 2250e12, 75e12),
    ("A100", 312e12, 19.5e12),
    ("A10G", 70e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    ("L40S", 362e12, 91.6e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 30.3e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def peak_flops_of(name: str, precision: str) -> float | None:
    """The dense peak FLOP/s of the GPU called ``name`` at ``precision``, if the table has it."""
    words = _words(name)
    for key, half, single in PEAK_FLOPS:
        k = _words(key)
        if any(words[i:i + len(k)] == k for i in range(len(words) - len(k) + 1)):
            return single if precision == "fp32" else half
    return None


def device_peak_flops(device, precision: str) -> float | None:
    """The device's dense peak FLOP/s at the run's precision, if raydistill knows the device (CUDA only)."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return peak_flops_of(torch.cuda.get_device_name(device), precision)


def peak_flops(device, precision: str) -> tuple[float | None, str]:
    """``device``'s dense peak FLOP/s at ``precision`` and where the number comes from: the data-sheet table for
    known GPUs, a measured matrix multiply on CPU (the best a GEMM reaches with this process's threads)."""
    if getattr(device, "type", None) == "cuda":
        import torch

        value = device_peak_flops(device, precision)
        return value, f"data sheet ({torch.cuda.get_device_name(device)})" if value else "unknown GPU"
    return measured_gemm_flops(precision), "measured GEMM (CPU)"


def measured_gemm_flops(precision: str = "fp32", n: int = 1024, seconds: float = 0.5, device="cpu") -> float:
    """FLOP/s of an n x n x n matrix multiply at ``precision``: the best of several timed batches."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up (thread pool, kernel choice)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if getattr(torch.device(device), "type", "cpu") == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2.0 * n ** 3 / (time.perf_counter() - start))
    return best


def counted_flops(fn) -> float:
    """FLOPs of what ``fn()`` runs, counted by ``torch.utils.flop_counter`` (matrix multiplies, convolutions and
    attention, forward and backward; element-wise work is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # torch counts the CUDA attention kernels but not the CPU flash kernel (what SDPA takes without dropout,
    # e.g. a teacher in eval mode): the same formulas apply.
    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return float(counter.get_total_flops())


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s (counted FLOPs per token x tokens/s) over the device's peak."""
    return flops_per_token * tokens_per_s / peak if peak else None


def peak_memory_bytes(device) -> int:
    """This process's peak memory so far: CUDA's peak allocated bytes on a GPU, the peak resident set on CPU.
    Host-side counters: no device synchronisation."""
    if getattr(device, "type", None) == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux
