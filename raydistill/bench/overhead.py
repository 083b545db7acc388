"""``raydistill bench overhead``: the framework's cost per step, as ``bench throughput`` measures it.

The same standard-KD step (task + kd) runs in a bare PyTorch loop and through ``raydistill train`` on Ray
Train + DeepSpeed with one worker, in one invocation (see ``raydistill.bench.throughput``); this view keeps
the step times and their ratio."""

from __future__ import annotations

from raydistill.bench.throughput import TARGET, bench_throughput


def bench_overhead(steps: int = 30, preset: str = "tiny-bert", zero_stage: int = 2, batch_size: int = 16,
                   block_size: int = 128) -> dict:
    r = bench_throughput("cpu", teacher=preset, teacher_overrides={}, student_layers=2, batch_size=batch_size,
                         block_size=block_size, precision="fp32", zero_stage=zero_stage, steps=steps)
    bare, framework = r["bare"]["step_time_s"], r["framework"]["step_time_s"]
    table = "\n".join([
        f"overhead bench: {preset} teacher -> 2-block student, task+kd, batch {batch_size}x{block_size}, "
        f"{steps} timed steps, ZeRO-{zero_stage}, 1 worker",
        f"{'loop':<34}{'median step (ms)':>18}",
        f"{'bare PyTorch':<34}{bare * 1e3:>18.2f}",
        f"{'Ray Train + DeepSpeed':<34}{framework * 1e3:>18.2f}",
        f"{'ratio (framework / bare)':<34}{r['ratio']:>18.3f}   target <= {TARGET:.2f}"])
    return {"ratio": r["ratio"], "target": TARGET, "bare_step_s": bare, "framework_step_s": framework,
            "preset": preset, "zero_stage": zero_stage, "batch_size": batch_size, "block_size": block_size,
            "steps": steps, "table": table}
