"""``raydistill bench td``: peak memory and time of the ``td`` objective against full-vocabulary ``kd``.

Two kinds of rows, side by side in one invocation, for each vocabulary size (32k, 150k):

- ``objective``: forward + backward of the objective alone, from the same inputs a training step hands it:
  the student's final hidden state (B x T x H, requires_grad) and output head (a V x H linear layer, H = 64,
  the tiny body's width), and the teacher's B x T x V logits. ``kd`` projects the hidden state to its
  B x T x V logits (the head's forward and backward are part of what kd costs); ``td`` with top-k action
  sets, k in {8, 64, 512}, computes only the gathered columns from the head (``fused_head``, the default);
  ``td-logits`` (k = ``ratio_k``) is td gathering from the full logits instead (``fused_head: false``).
  Both run td's default ``shift: vocab``: td also finds each position's vocabulary argmax, under no_grad,
  by a blocked search over the head's weight (fused) or the full logits (td-logits), and gathers its
  column too, so its time includes one more B x T x V x H product (in blocks of bounded memory);
- ``step``: a whole training step as a worker runs it without DeepSpeed: teacher forward, student forward
  and the objective (``DistillModule``), backward and an AdamW step, ``kd`` against ``td`` at ``ratio_k``.
  Models: a tiny GPT-2 body (teacher 4 blocks, student 2, width 64) with the vocabulary under test and
  random weights (the cost does not depend on them).

Memory. Every memory figure comes from its own fresh process (forked from a forkserver that has only
imported the libraries), so no allocator state or cached buffer of one measurement is inherited by
another. The process builds its inputs (objective: the two logits tensors; step: models, optimizer,
batch), runs one warm-up repetition (one-time library state, the optimizer's moments), and measures the
peak above that baseline over one more repetition:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` at the baseline (tensor memory; the caching allocator's reserve is not counted).
- CPU: the process's resident set. The peak-RSS high-water mark is reset at the baseline by writing 5
  to ``/proc/self/clear_refs`` and read back as ``VmHWM`` from ``/proc/self/status``; the figure is
  ``VmHWM - VmRSS(baseline)``. glibc is told (``mallopt``) to serve every allocation of 64 KiB or more
  with mmap, so freed tensors leave the resident set at once and the high-water mark follows live memory
  rather than reused heap. The kernel's RSS counters are approximate to a few
  hundred KiB, which only matters for tiny sizes. Without /proc (not Linux) it falls back to
  ``ru_maxrss`` deltas, a lower bound; each row names its method.

An objective's figure is thus what it allocates above its inputs: temporaries, tensors saved for backward,
and the gradients it produces (the head's V x H, the hidden state's B x T x H).

Time. All variants of one (vocabulary, dtype) run in one more fresh process, alternating repetition by
repetition with the order flipped each time (so drift in the load of a shared machine hits every variant
alike), after one warm-up round; times are medians.

Sizes. The default case is 4 sequences of 128 tokens (CPU-sized); ``--batch-size`` / ``--seq-len`` change it
and ``--gpu-sizes`` adds the GPU-sized case 16 x 512 (every row of every size; rows carry their ``batch_size``
and ``seq_len``, ``by_size`` has each size's ratios and the top-level ones stay the default case's).

``memory_ratio`` is td (k = ``ratio_k``) over kd for the largest vocabulary, in float32 (``--bf16`` measures the
objective rows in bfloat16 too, one ratio per dtype in ``memory_ratios``). ``step_ratio`` is the td step time
over the kd step time for the same vocabulary, in float32.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import platform
import resource
import sys
import time
import traceback
from statistics import median

import torch

MEMORY_TARGET = 0.10
STEP_TARGET = 1.10
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MMAP_THRESHOLD = 64 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_PRELOAD = ("raydistill.bench.td", "raydistill.objectives", "raydistill.train.step", "raydistill.models.presets",
            "raydistill.data.masking", "transformers.models.gpt2.modeling_gpt2")
_MAXRSS_UNIT = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux


# ------------------------------------------------------------------------------------------ in the subprocess
class _PeakWindow:
    """Peak memory above a baseline: CUDA allocator statistics, or on CPU the resident set's high-water mark
    (reset through /proc/self/clear_refs). Without /proc, ru_maxrss: the window then has to open before the
    warm-up, and earlier peaks of the process can hide part of the measurement (a lower bound)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "cuda"
        elif _status_kib("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK):
            self.method = "VmHWM"
        else:
            self.method = "ru_maxrss"
        self.base = 0.0

    def open(self) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = float(torch.cuda.memory_allocated(self.device))
        elif self.method == "VmHWM":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS") * 1024.0
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT

    def peak_mib(self) -> float:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            peak = float(torch.cuda.max_memory_allocated(self.device))
        elif self.method == "VmHWM":
            peak = _status_kib("VmHWM") * 1024.0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT
        return round((peak - self.base) / 2**20, 2)


def _status_kib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WIDTH = 64  # the tiny body's hidden size


def _settings(objective: str, k: int | None):
    from raydistill.objectives import REGISTRY

    if objective in ("td", "td-logits"):
        return REGISTRY["td"].Settings(action_space={"kind": "top_k", "k": k}, fused_head=objective == "td")
    return REGISTRY[objective].Settings()


def _name(objective: str) -> str:
    return "td" if objective == "td-logits" else objective


def _batch(spec: dict, device: torch.device) -> dict[str, torch.Tensor]:
    from raydistill.data.masking import next_token_labels

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, spec["vocab"], (spec["batch_size"], spec["seq_len"]), generator=gen)
    attn = torch.ones_like(ids)
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": attn, "labels": next_token_labels(ids, attn)}.items()}


def _objective_runs(spec: dict, device: torch.device, variants: list[tuple[str, int | None]]) -> dict:
    """Forward + backward of each objective alone, from one student hidden state + head and teacher logits."""
    from raydistill.objectives import build_objectives
    from raydistill.objectives.base import ForwardResult, HeadInput, ModelInfo, Step

    B, T, V, dtype = spec["batch_size"], spec["seq_len"], spec["vocab"], DTYPES[spec["dtype"]]
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, WIDTH, generator=gen).to(device, dtype).requires_grad_(True)
    head = torch.nn.Linear(WIDTH, V, bias=False).to(device, dtype)
    teacher = (2 * torch.randn(B, T, V, generator=gen)).to(device, dtype)
    info = ModelInfo(is_encoder=False, vocab_size=V, student_layers=2, student_hidden=WIDTH)
    batch = _batch(spec, device)

    def make(label: str, k: int | None):
        name = _name(label)
        obj = build_objectives({name: _settings(label, k)}, info)[name]
        needs = obj.needs()

        def run():
            # What the step hands the objective: the head's output only where it asks for the full logits.
            student = ForwardResult(head(hidden) if needs.student_logits else None,
                                    head=HeadInput(hidden, head) if needs.student_head else None)
            step = Step(batch=batch, student=student, teacher=ForwardResult(teacher), student_model=None,
                        teacher_model=None, info=info)
            obj(step)[name].backward()
            hidden.grad = head.weight.grad = None

        return run

    return {(label, k): make(label, k) for label, k in variants}


def _step_runs(spec: dict, device: torch.device, variants: list[tuple[str, int | None]]) -> dict:
    """A whole training step per objective: teacher and student forward, objective, backward, AdamW."""
    from transformers import AutoModelForCausalLM

    from raydistill.models.presets import preset_config
    from raydistill.objectives import build_objectives
    from raydistill.objectives.base import ModelInfo
    from raydistill.train.step import DistillModule

    V, dtype = spec["vocab"], DTYPES[spec["dtype"]]
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(preset_config("tiny-gpt2", V, special))
    student = AutoModelForCausalLM.from_config(preset_config("tiny-gpt2", V, special, {"n_layer": 2}))
    teacher = teacher.to(device, dtype).eval().requires_grad_(False)
    student = student.to(device, dtype).train()
    info = ModelInfo(is_encoder=False, vocab_size=V, student_layers=2, student_hidden=64, teacher_layers=4,
                     teacher_hidden=64)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    batch = _batch(spec, device)

    def make(label: str, k: int | None):
        module = DistillModule(student, build_objectives({_name(label): _settings(label, k)}, info), info)

        def run():
            loss, _ = module(batch, teacher)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    return {(label, k): make(label, k) for label, k in variants}


def _memory(run, device: torch.device) -> dict:
    window = _PeakWindow(device)
    if window.method == "ru_maxrss":
        window.open()
    run()  # warm-up: one-time state (kernels, optimizer moments) is not per-step memory
    if window.method != "ru_maxrss":
        window.open()
    run()
    return {"peak_mib": window.peak_mib(), "memory": window.method}


def _times(runs: dict, reps: int, device: torch.device) -> dict:
    keys = list(runs)
    times: dict = {k: [] for k in keys}
    for i in range(reps + 1):
        for key in keys if i % 2 == 0 else reversed(keys):
            _sync(device)
            start = time.perf_counter()
            runs[key]()
            _sync(device)
            if i > 0:  # round 0 warms up
                times[key].append(time.perf_counter() - start)
    return {f"{name}:{k}": round(median(ts) * 1e3, 3) for (name, k), ts in times.items()}


def _limit_heap() -> None:
    """Serve every allocation of 64 KiB or more with mmap (glibc), so freed tensors leave the resident set at
    once and its high-water mark follows live memory rather than reused heap."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: the resident set may then keep freed heap
        pass


def _measure(spec: dict) -> dict:
    """``mode`` 'memory' measures the single variant of ``variants``; 'time' times all of them."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    variants = [(name, k) for name, k in spec["variants"]]
    runs = (_objective_runs if spec["what"] == "objective" else _step_runs)(spec, device, variants)
    return _memory(runs[variants[0]], device) if spec["mode"] == "memory" else _times(runs, spec["reps"], device)


def _child(spec: dict, conn) -> None:
    try:
        _limit_heap()
        conn.send(("ok", _measure(spec)))
    except BaseException:  # noqa: BLE001 - reported to the driver, which raises
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ in the driver
def _context():
    """Fresh processes forked from a forkserver that has imported torch, transformers and raydistill once
    (and run no torch kernel, so forking it is safe): a new process per measurement costs milliseconds."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


def _isolated(spec: dict) -> dict:
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, send), daemon=True)
    proc.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        status, payload = "error", "the measurement process died without a result"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"bench td: measurement {spec} failed (exit {proc.exitcode}):\n{payload}")
    return payload


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def _rows(common: dict, what: str, vocab: int, dtype: str, variants: list[tuple[str, int | None]]) -> list[dict]:
    """One row per variant (the first is kd): memory each in its own process, times in one shared one."""
    spec = {**common, "what": what, "vocab": vocab, "dtype": dtype}
    times = _isolated({**spec, "mode": "time", "variants": variants})
    rows = []
    for name, k in variants:
        memory = _isolated({**spec, "mode": "memory", "variants": [(name, k)]})
        rows.append({"what": what, "vocab": vocab, "dtype": dtype, "objective": name, "k": k, **memory,
                     "time_ms": times[f"{name}:{k}"]})
    kd = rows[0]
    for row in rows[1:]:
        row["memory_vs_kd"] = _ratio(row["peak_mib"], kd["peak_mib"])
        row["time_vs_kd"] = _ratio(row["time_ms"], kd["time_ms"])
    return rows


def _find(rows: list[dict], **keys) -> dict:
    return next(r for r in rows if all(r.get(k) == v for k, v in keys.items()))


def _table(rows: list[dict]) -> str:
    def num(value, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = [f"{'what':<10}{'B x T':>10}{'vocab':>8}{'dtype':>10}{'objective':>11}{'k':>6}{'peak MiB':>11}"
             f"{'time ms':>10}{'mem/kd':>8}{'time/kd':>9}"]
    for r in rows:
        lines.append(f"{r['what']:<10}{_size(r['batch_size'], r['seq_len']):>10}{r['vocab']:>8}{r['dtype']:>10}"
                     f"{r['objective']:>11}{r['k'] or '-':>6}{r['peak_mib']:>11.1f}{r['time_ms']:>10.1f}"
                     f"{num(r.get('memory_vs_kd'), '.3f'):>8}{num(r.get('time_vs_kd'), '.3f'):>9}")
    return "\n".join(lines)


def _size(batch_size: int, seq_len: int) -> str:
    return f"{batch_size}x{seq_len}"


# The issue's GPU case (``--gpu-sizes``): 16 sequences of 512 tokens; on CPU its 150k-vocabulary logits need
# about 5 GB each.
GPU_SIZES = ((16, 512),)


def bench_td(vocabs: tuple[int, ...] | list[int] = (32_000, 150_000), ks: tuple[int, ...] | list[int] = (8, 64, 512),
             *, ratio_k: int = 64, batch_size: int = 4, seq_len: int = 128, reps: int = 3,
             bf16: bool = False, device: str | None = None,
             extra_sizes: tuple[tuple[int, int], ...] | list[tuple[int, int]] = ()) -> dict:
    """Measure every row, each memory figure in its own process. ``bf16``: also measure the objective rows
    in bfloat16. The top-level ratios are those of ``batch_size`` x ``seq_len``; ``extra_sizes`` (batch,
    seq_len) pairs add their rows and their ratios under ``by_size``."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ks = sorted({*ks, ratio_k})
    ratio_vocab = max(vocabs)
    objectives = [("kd", None), *(("td", k) for k in ks), ("td-logits", ratio_k)]
    dtypes = ["float32", "bfloat16"] if bf16 else ["float32"]
    sizes = list(dict.fromkeys([(batch_size, seq_len), *((int(b), int(t)) for b, t in extra_sizes)]))
    rows: list[dict] = []
    by_size: dict[str, dict] = {}
    for b, t in sizes:
        common = {"device": dev, "threads": torch.get_num_threads(), "batch_size": b, "seq_len": t, "reps": reps}
        mine: list[dict] = []
        for dtype in dtypes:
            for vocab in vocabs:
                mine += _rows(common, "objective", vocab, dtype, objectives)
        for vocab in vocabs:
            mine += _rows(common, "step", vocab, "float32", [("kd", None), ("td", ratio_k)])
        for row in mine:
            row.update(batch_size=b, seq_len=t)
        ratio_rows = {d: _find(mine, what="objective", vocab=ratio_vocab, dtype=d, objective="td", k=ratio_k)
                      for d in dtypes}
        step = _find(mine, what="step", vocab=ratio_vocab, objective="td")
        by_size[_size(b, t)] = {"batch_size": b, "seq_len": t, "memory_ratio": ratio_rows["float32"]["memory_vs_kd"],
                                "memory_ratios": {d: r["memory_vs_kd"] for d, r in ratio_rows.items()},
                                "step_ratio": step["time_vs_kd"], "step_memory_ratio": step["memory_vs_kd"]}
        rows += mine
    main = by_size[_size(batch_size, seq_len)]
    where = (torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda")
             else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    return {"memory_ratio": main["memory_ratio"], "memory_ratio_dtype": "float32",
            "memory_target": MEMORY_TARGET, "memory_ratios": main["memory_ratios"],
            "memory_ratio_of": f"td (top_k, k={ratio_k}) / kd, objective forward+backward from the student's "
                               f"hidden state and head, vocab {ratio_vocab}",
            "step_ratio": main["step_ratio"], "step_ratio_dtype": "float32", "step_target": STEP_TARGET,
            "step_ratio_of": f"td (k={ratio_k}) / kd training step time, vocab {ratio_vocab}",
            "step_memory_ratio": main["step_memory_ratio"], "dtype": "float32", "dtypes": dtypes,
            "device": where, "memory_method": "cuda max_memory_allocated delta" if dev.startswith("cuda") else
            "fresh process per row; VmHWM after a clear_refs reset minus VmRSS at the baseline",
            "batch_size": batch_size, "seq_len": seq_len, "reps": reps, "vocabs": list(vocabs), "ks": ks,
            "by_size": by_size, "rows": rows, "table": _table(rows)}
