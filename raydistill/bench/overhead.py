"""``raydistill bench overhead``: the framework's cost per step.

The same standard-KD step (task + kd, same models, batch and thread count) runs first in a bare PyTorch
loop (no Ray, no DeepSpeed) and then through ``raydistill train`` on Ray Train + DeepSpeed with one
worker, in one invocation. Step times are medians over the timed steps, after warm-up."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from raydistill.config import load_config
from raydistill.data.blocks import BatchSampler
from raydistill.models.loading import build_model, init_from_teacher
from raydistill.objectives import build_objectives
from raydistill.train.plan import prepare
from raydistill.train.step import DistillModule

WARMUP = 5  # steps; also the framework's logging window, so each timed row averages 5 steps


def _config(preset: str, steps: int, out: str, cache: str, zero_stage: int, batch_size: int, block_size: int):
    return load_config(None, [
        f"teacher.name={preset}", "student.num_layers=2", f"output_dir={out}", f"cache_dir={cache}",
        "objectives.task.weight=1", "objectives.kd.weight=1", "data.builtin.num_documents=1000",
        f"data.block_size={block_size}", f"train.batch_size={batch_size}", f"train.max_steps={steps + WARMUP}",
        f"train.log_every={WARMUP}", "train.eval_batches=1", "train.grad_clip=1.0", f"deepspeed.zero_stage={zero_stage}",
        "scaling.num_workers=1", "ray.dashboard=false", "ray.log_to_driver=false"])


def bare_step_times(cfg, steps: int) -> list[float]:
    """The reference: the same modules, optimizer and batches in a plain loop."""
    plan = prepare(cfg)
    t = cfg.train
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # as the Ray worker gets
    torch.manual_seed(t.seed)
    teacher = build_model(plan.teacher_config, plan.teacher_source).eval().requires_grad_(False)
    student = build_model(plan.student_config, plan.student_source)
    init_from_teacher(student, teacher, plan.init_layers)
    module = DistillModule(student, build_objectives(plan.objectives, plan.info), plan.info)
    opt = torch.optim.AdamW(module.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    data = BatchSampler(plan.blocks[0], plan.token_info, batch_size=t.batch_size, grad_accum=1, rank=0,
                        world_size=1, seed=t.seed)
    times = []
    for step in range(1, steps + WARMUP + 1):
        start = time.perf_counter()
        loss, _ = module(data.batch(step), teacher)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > WARMUP:
            times.append(time.perf_counter() - start)
    return times


def framework_step_times(cfg) -> list[float]:
    from raydistill.train.launcher import run

    run(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    # Each row averages the steps since the previous one; the last also holds the final evaluation.
    return [r["step_time_s"] for r in rows[:-1] if r["step"] > WARMUP]


def bench_overhead(steps: int = 30, preset: str = "tiny-bert", zero_stage: int = 2, batch_size: int = 16,
                   block_size: int = 128) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(preset, steps, f"{tmp}/run", f"{tmp}/cache", zero_stage, batch_size, block_size)
        bare = statistics.median(bare_step_times(cfg, steps))
        framework = statistics.median(framework_step_times(cfg))
    ratio = framework / bare
    table = "\n".join([
        f"overhead bench: {preset} teacher -> 2-block student, task+kd, batch {batch_size}x{block_size}, "
        f"{steps} timed steps, ZeRO-{zero_stage}, 1 worker",
        f"{'loop':<34}{'median step (ms)':>18}",
        f"{'bare PyTorch':<34}{bare * 1e3:>18.2f}",
        f"{'Ray Train + DeepSpeed':<34}{framework * 1e3:>18.2f}",
        f"{'ratio (framework / bare)':<34}{ratio:>18.3f}   target <= 1.10"])
    return {"ratio": ratio, "target": 1.10, "bare_step_s": bare, "framework_step_s": framework, "preset": preset,
            "zero_stage": zero_stage, "batch_size": batch_size, "block_size": block_size, "steps": steps,
            "table": table}
