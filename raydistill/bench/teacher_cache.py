"""``raydistill bench teacher-cache``: what a sweep saves by reading the teacher's top-K signals from the
teacher cache instead of running the teacher in every trial.

A sweep-like comparison in one process, side by side in one invocation: N trials (learning rates spread
around the base one) of sparse KD (``kd`` with ``top_k``) from a teacher several times the student's size,
each trial first with the teacher online and then from the cache, alternating which runs first (A-B-B-A)
so that load from other processes shifts both sides alike. The cache is filled once, before the cached
trials, by the same code a sweep's driver runs (``teacher_cache.attach``; here in this process, with Ray
not started). Each trial is a plain PyTorch loop over the real DistillModule, objectives, batches and cache
reader (no Ray, no DeepSpeed, whose fixed costs are the same on both sides): wall time counts building the
models (the teacher only online) and the steps. Reported: teacher forward passes (counted by a hook on the
teacher), estimated FLOPs (the monitoring's per-token estimate), wall time per trial and for the whole
sweep (fill included), the bytes stored, and how far the cached trials' losses are from the online ones."""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time

import torch

from raydistill.config import load_config
from raydistill.data.blocks import BatchSampler
from raydistill.models.loading import build_model
from raydistill.monitoring.metrics import flops_per_token
from raydistill.objectives import build_objectives
from raydistill.train import teacher_cache as TC
from raydistill.train.plan import prepare
from raydistill.train.step import DistillModule

TEACHER = {"n_layer": 8, "n_embd": 256, "n_head": 4}
STUDENT = {"n_embd": 64, "n_head": 4}


def _config(out: str, cache: str, steps: int, top_k: int, batch_size: int, block_size: int, dtype: str):
    over = [f"teacher.config_overrides.{k}={v}" for k, v in TEACHER.items()] + \
        [f"student.config_overrides.{k}={v}" for k, v in STUDENT.items()]
    return load_config(None, [
        "teacher.name=tiny-gpt2", *over, "student.num_layers=2", "student.init=random", f"output_dir={out}",
        f"cache_dir={cache}", "objectives.task.weight=0", "objectives.kd.weight=1", f"objectives.kd.top_k={top_k}",
        "data.builtin.num_documents=1000", f"data.block_size={block_size}", f"train.batch_size={batch_size}",
        f"train.max_steps={steps}", "train.eval_batches=1", "scaling.num_workers=1",
        f"teacher_cache.top_k={top_k}", f"teacher_cache.dtype={dtype}", f"teacher_cache.uri={cache}/teacher_cache"])


class _Counter:
    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def _trial(cfg, plan, lr: float, cached: bool) -> dict:
    """One trial's training, online (teacher loaded and run) or from the cache (no teacher)."""
    t = cfg.train
    start = time.perf_counter()
    torch.manual_seed(t.seed)
    teacher, counter = None, None
    if not cached:
        with torch.random.fork_rng(devices=[]):  # as the workers: the student's init does not depend on it
            teacher = build_model(plan.teacher_config, plan.teacher_source).eval().requires_grad_(False)
        counter = _Counter(teacher)
    student = build_model(plan.student_config, plan.student_source)
    module = DistillModule(student, build_objectives(plan.objectives, plan.info), plan.info)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    data = BatchSampler(plan.blocks[0], plan.token_info, batch_size=t.batch_size, grad_accum=1, rank=0,
                        world_size=1, seed=t.seed)
    reader = TC.Reader(plan.teacher_cache, 0) if cached else None
    losses = []
    for step in range(1, t.max_steps + 1):
        batch = data.batch(step, 0)
        if reader is not None:
            batch = reader.signals(batch, step, 0)
        loss, _ = module(batch, teacher)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"wall_s": time.perf_counter() - start, "teacher_forwards": counter.calls if counter else 0,
            "losses": losses}


def bench_teacher_cache(trials: int = 4, steps: int = 20, top_k: int = 64, batch_size: int = 8,
                        block_size: int = 128, dtype: str = "float16", threads: int = 1) -> dict:
    # One thread, as each Ray worker with one CPU gets: two threads on a busy 2-core machine spin-wait (a teacher
    # forward measured 4.7x slower with 2 threads than with 1 while other processes ran).
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench(trials, steps, top_k, batch_size, block_size, dtype)
    finally:
        torch.set_num_threads(previous)


def _bench(trials: int, steps: int, top_k: int, batch_size: int, block_size: int, dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(f"{tmp}/run", f"{tmp}/cache", steps, top_k, batch_size, block_size, dtype)
        with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout is the result
            plan = prepare(cfg)
        teacher = build_model(plan.teacher_config, None)
        student = build_model(plan.student_config, None)
        info = plan.info
        per_token = {
            "teacher_forward": flops_per_token(student, teacher, (info.student_layers, info.teacher_layers),
                                               (info.student_hidden, info.teacher_hidden), block_size, True)
            - flops_per_token(student, None, (info.student_layers, None), (info.student_hidden, None), block_size,
                              False),
            "student_step": flops_per_token(student, None, (info.student_layers, None), (info.student_hidden, None),
                                            block_size, False)}
        del teacher, student
        lrs = [cfg.train.lr * f for f in (0.5, 1.0, 2.0, 4.0, 0.25, 8.0)][:trials] + \
            [cfg.train.lr] * max(0, trials - 6)
        began = time.perf_counter()
        plan = TC.attach(cfg, plan, out=sys.stderr)  # the sweep's fill: once, before the cached trials
        fill_s = time.perf_counter() - began
        manifest = TC.read_manifest(plan.teacher_cache.root)
        stored = sum(e["bytes"] for e in manifest["entries"].values())
        positions = sum(e["positions"] for e in manifest["entries"].values())
        online, cached = [], []
        for i, lr in enumerate(lrs):  # A-B, B-A, ...: neither side always runs first
            order = (False, True) if i % 2 == 0 else (True, False)
            for use_cache in order:
                (cached if use_cache else online).append(_trial(cfg, plan, lr, use_cache))
    tokens = steps * batch_size * block_size
    rows = {
        "online": {"teacher_forwards": sum(r["teacher_forwards"] for r in online),
                   "flops": trials * tokens * (per_token["teacher_forward"] + per_token["student_step"]),
                   "wall_s_per_trial": statistics.mean(r["wall_s"] for r in online),
                   "sweep_wall_s": sum(r["wall_s"] for r in online), "bytes_stored": 0},
        "cache": {"teacher_forwards": plan.teacher_cache.stats["teacher_forwards"],
                  "flops": trials * tokens * per_token["student_step"] + per_token["teacher_forward"] * positions,
                  "wall_s_per_trial": statistics.mean(r["wall_s"] for r in cached), "fill_s": fill_s,
                  "sweep_wall_s": fill_s + sum(r["wall_s"] for r in cached), "bytes_stored": stored},
    }
    gap = max(abs(a - b) for r_on, r_c in zip(online, cached) for a, b in zip(r_on["losses"], r_c["losses"]))
    ratio = rows["cache"]["sweep_wall_s"] / rows["online"]["sweep_wall_s"]
    machine = f"{platform.machine()} {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    table = "\n".join([
        f"teacher-cache bench: {trials} trials x {steps} steps of kd top_k={top_k}, batch {batch_size}x{block_size}, "
        f"teacher {TEACHER} ({per_token['teacher_forward'] / 1e6:.1f} MFLOP/token forward) vs student 2 blocks "
        f"{STUDENT} ({per_token['student_step'] / 1e6:.1f} MFLOP/token forward+backward); cache {dtype}; {machine}",
        f"{'':<8}{'teacher fwd':>12}{'GFLOP':>10}{'s/trial':>10}{'fill s':>9}{'sweep s':>10}{'MB stored':>11}",
        *(f"{name:<8}{r['teacher_forwards']:>12}{r['flops'] / 1e9:>10.1f}{r['wall_s_per_trial']:>10.2f}"
          f"{r.get('fill_s', 0.0):>9.2f}{r['sweep_wall_s']:>10.2f}{r['bytes_stored'] / 1e6:>11.2f}"
          for name, r in rows.items()),
        f"sweep wall time with / without the cache: {ratio:.3f} (target <= 0.5); largest loss difference "
        f"cached - online: {gap:.2e}"])
    return {"rows": rows, "ratio": ratio, "target": 0.5, "trials": trials, "steps": steps, "top_k": top_k,
            "dtype": dtype, "batch_size": batch_size, "block_size": block_size, "flops_per_token": per_token,
            "bytes_per_token": stored / max(positions, 1), "max_loss_gap": gap, "machine": machine, "table": table}


if __name__ == "__main__":
    print(json.dumps(bench_teacher_cache(), indent=2))
