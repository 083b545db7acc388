"""``raydistill bench throughput``: the distillation step's speed in a bare PyTorch loop and through
Ray Train + DeepSpeed (one worker), side by side in one invocation, on whatever device is present.

Both sides run raydistill's own ``DistillModule``, models, objectives and batches at the same batch, sequence
length and precision. The bare loop is what the step costs without the framework: the batch built and moved,
forward (bf16 autocast where asked), backward, gradient clipping, AdamW (fused on CUDA), nothing else. It runs
before and after the framework (A-B-A), so a machine whose load drifts shifts both alike. Times are medians of
``window``-step windows after a warm-up window (the framework's are its ``metrics.jsonl`` rows, logged every
``window`` steps).

FLOPs per token are counted on one bare step with ``torch.utils.flop_counter`` (matrix multiplies and
attention of the student's forward and backward and the teacher's forward); achieved FLOP/s is that times
tokens/s, MFU that over the device's dense peak (``monitoring.metrics.peak_flops``: data sheet on GPUs, a
measured GEMM on CPU)."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from raydistill.config import load_config
from raydistill.data.blocks import BatchSampler
from raydistill.models.loading import build_model, init_from_teacher, prepare_student, teacher_dtype
from raydistill.monitoring.metrics import counted_flops, flops_per_token, mfu, peak_flops, peak_memory_bytes
from raydistill.objectives import build_objectives
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


def bench_config(out: str, cache: str, *, teacher: str, teacher_overrides: dict, student_layers: int, batch_size: int,
                 block_size: int, precision: str, objectives: tuple[str, ...], zero_stage: int, steps: int,
                 window: int, use_gpu: bool):
    """The experiment config both sides run: ``steps`` timed steps after one warm-up window."""
    return load_config(None, [
        f"teacher.name={teacher}", *(f"teacher.config_overrides.{k}={v}" for k, v in teacher_overrides.items()),
        f"student.num_layers={student_layers}", f"output_dir={out}", f"cache_dir={cache}",
        *(f"objectives.{name}.weight=1" for name in objectives), "data.builtin.num_documents=1000",
        f"data.block_size={block_size}", f"train.batch_size={batch_size}", f"train.max_steps={steps + window}",
        f"train.precision={precision}", f"train.log_every={window}", "train.eval_batches=1", "train.grad_clip=1.0",
        f"deepspeed.zero_stage={zero_stage}", "scaling.num_workers=1", f"scaling.use_gpu={str(use_gpu).lower()}",
        "ray.dashboard=false", "ray.log_to_driver=false", "monitoring.progress=plain"])


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
        self.info, self.seq_len = plan.info, cfg.data.block_size

    def step(self, n: int) -> int:
        """One optimiser step on batch ``n``; returns its (non-padding) tokens, counted on the host."""
        cpu = self.data.batch(n)
        batch = {k: (v.pin_memory() if self.cuda else v).to(self.device, non_blocking=True) for k, v in cpu.items()}
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss, _ = self.module(batch, self.teacher)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(cpu["attention_mask"].sum())

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def windows(self, steps: int, window: int, first: int = 1) -> list[tuple[float, int]]:
        """(seconds, tokens) of each ``window``-step window after a warm-up window."""
        out, n = [], first
        for w in range(steps // window + 1):
            self.sync()
            start, tokens = time.perf_counter(), 0
            for _ in range(window):
                tokens += self.step(n)
                n += 1
            self.sync()
            if w:
                out.append((time.perf_counter() - start, tokens))
        return out

    def flops_per_token(self, n: int = 1) -> tuple[float, float]:
        """(counted, estimated) FLOPs per token of one step: the flop counter's, and the 6N + 2N_teacher +
        attention estimate the training metrics use (``monitoring.metrics.flops_per_token``)."""
        tokens = []
        counted = counted_flops(lambda: tokens.append(self.step(n)))
        # Per position: the counter sees every position, padding included, as the device computes them.
        positions = self.data.batch_size * self.seq_len
        i = self.info
        estimate = flops_per_token(self.module.student, self.teacher, (i.student_layers, i.teacher_layers),
                                   (i.student_hidden, i.teacher_hidden), self.seq_len,
                                   self.module.needs.teacher_runs())
        return counted / positions, estimate


def _framework(cfg, window: int) -> tuple[list[tuple[float, int]], int | None]:
    from raydistill.train.launcher import run

    run(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    # Rows every `window` steps, each the mean of the steps since the one before; the first holds the warm-up.
    timed = [r for r in rows if r["step"] > window]
    return ([(r["step_time_s"] * window, r["tokens_per_s"] * r["step_time_s"] * window) for r in timed],
            max((r.get("peak_memory_bytes") or 0 for r in rows), default=None))


def _side(windows: list[tuple[float, int]], window: int, fpt: float, peak: float | None, memory) -> dict:
    step = statistics.median(s for s, _ in windows) / window
    tps = statistics.median(tok / s for s, tok in windows)
    return {"tokens_per_s": tps, "step_time_s": step, "flops_per_s": fpt * tps, "mfu": mfu(fpt, tps, peak),
            "peak_memory_bytes": memory, "windows": len(windows),
            # every window's step time, in the order run (the bare loop's: before the framework, then after)
            "window_step_times_s": [s / window for s, _ in windows]}


def bench_throughput(preset: str = "cpu", *, teacher: str | None = None, teacher_overrides: dict | None = None,
                     student_layers: int | None = None, batch_size: int | None = None, block_size: int | None = None,
                     precision: str | None = None, objectives: tuple[str, ...] = ("task", "kd"), zero_stage: int = 2,
                     steps: int | None = None, window: int = 5, framework: bool = True) -> dict:
    base = PRESETS[preset]
    setup = dict(teacher=teacher or base["teacher"],
                 teacher_overrides=base["teacher_overrides"] if teacher_overrides is None else teacher_overrides,
                 student_layers=student_layers or base["student_layers"], batch_size=batch_size or base["batch_size"],
                 block_size=block_size or base["block_size"], precision=precision or base["precision"],
                 objectives=tuple(objectives), zero_stage=zero_stage, steps=steps or base["steps"], window=window)
    use_gpu = torch.cuda.is_available()
    if not use_gpu:
        keep_freed_host_memory()  # as training workers do (scaling.keep_freed_host_memory)
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(f"{tmp}/run", f"{tmp}/cache", use_gpu=use_gpu, **setup)
        # A-B-A: the bare loop before and after the framework, its windows pooled.
        bare = BareLoop(cfg, device)
        peak, peak_source = peak_flops(device, setup["precision"])
        if use_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        bare_windows = bare.windows(setup["steps"], window)
        counted, estimate = bare.flops_per_token()
        bare_memory = peak_memory_bytes(device)
        del bare
        fw_windows, fw_memory = _framework(cfg, window) if framework else ([], None)
        if framework:
            again = BareLoop(cfg, device)
            bare_windows += again.windows(setup["steps"], window)
            del again
    rows = {"bare": _side(bare_windows, window, counted, peak, bare_memory)}
    if fw_windows:
        rows["framework"] = _side(fw_windows, window, counted, peak, fw_memory)
    ratio = rows["framework"]["step_time_s"] / rows["bare"]["step_time_s"] if "framework" in rows else None
    name = torch.cuda.get_device_name(device) if use_gpu else f"CPU ({torch.get_num_threads()} threads)"
    result = {"preset": preset, "device": name, **setup, "flops_per_token": counted,
              "flops_per_token_estimate": estimate, "peak_flops": peak, "peak_flops_source": peak_source,
              "bare": rows["bare"], "framework": rows.get("framework"), "ratio": ratio, "target": TARGET}
    result["table"] = _table(result)
    return result


def _table(r: dict) -> str:
    head = (f"throughput bench on {r['device']}: {r['teacher']} teacher -> {r['student_layers']}-block student, "
            f"{'+'.join(r['objectives'])}, batch {r['batch_size']}x{r['block_size']}, {r['precision']}, "
            f"ZeRO-{r['zero_stage']}, {r['steps']} timed steps per side\n"
            f"counted {r['flops_per_token'] / 1e9:.4g} GFLOP/token (estimate {r['flops_per_token_estimate'] / 1e9:.4g})")
    if r["peak_flops"]:
        head += f"; peak {r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_flops_source']})"
    lines = [head, f"{'loop':<24}{'tokens/s':>12}{'step (ms)':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak mem (MB)':>15}"]
    for label, key in (("bare PyTorch", "bare"), ("Ray Train + DeepSpeed", "framework")):
        side = r.get(key)
        if side:
            mem = side["peak_memory_bytes"]
            lines.append(f"{label:<24}{side['tokens_per_s']:>12.0f}{side['step_time_s'] * 1e3:>11.2f}"
                         f"{side['flops_per_s'] / 1e12:>10.3f}{(side['mfu'] or 0) * 100:>7.1f}%"
                         f"{(mem or 0) / 2**20:>15.0f}")
    if r["ratio"] is not None:
        lines.append(f"ratio (framework / bare step time): {r['ratio']:.3f}   target <= {r['target']:.2f}")
    return "\n".join(lines)
