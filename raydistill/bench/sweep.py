"""``raydistill bench sweep``: what running trials as a Tune sweep costs or saves.

The same N trials (tiny offline runs differing in ``train.lr``) run once as one ``raydistill sweep`` and
once back to back as N ``raydistill train`` commands, on the same machine in one invocation. Both sides are
separate CLI processes, as a user would run them (each ``train`` starts its own local Ray cluster; the sweep
starts one). The machine's CPU utilisation is sampled every second during each side."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from raydistill.bench.sampling import Sampler

LRS = (3e-3, 2e-3, 1e-3, 5e-4, 3e-4, 2e-4, 1e-4, 5e-5)


def tiny_base(cache_dir: str, steps: int) -> dict:
    return {
        "teacher": {"name": "tiny-gpt2"}, "student": {"num_layers": 1}, "tokenizer": {"vocab_size": 512},
        "cache_dir": cache_dir,
        "data": {"builtin": {"num_documents": 400}, "block_size": 32},
        "objectives": {"task": {"weight": 1.0}, "kd": {"weight": 1.0}},
        "train": {"max_steps": steps, "batch_size": 8, "warmup_ratio": 0, "log_every": max(1, steps // 2),
                  "eval_every": steps, "eval_batches": 1},
        "scaling": {"num_workers": 1}, "ray": {"log_to_driver": False},
    }


class CpuSampler(Sampler):
    """Mean machine-wide CPU utilisation (%) over the sampled interval."""

    def __init__(self):
        super().__init__(1.0)
        self.samples: list[float] = []

    def start(self) -> None:
        import psutil

        psutil.cpu_percent(None)  # the first reading only sets the reference point

    def sample(self) -> None:
        import psutil

        self.samples.append(psutil.cpu_percent(None))

    @property
    def mean(self) -> float:
        return round(statistics.fmean(self.samples), 1) if self.samples else 0.0


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"raydistill {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def bench_sweep(trials: int = 4, steps: int = 30, concurrency: int | None = None) -> dict:
    from raydistill.sweep.space import trial_values
    from raydistill.sweep.spec import load_sweep

    if not 1 <= trials <= len(LRS):
        raise ValueError(f"trials must be in [1, {len(LRS)}]")
    with tempfile.TemporaryDirectory(prefix="raydistill-bench-sweep-") as tmp:
        root = Path(tmp)
        base = tiny_base(str(root / "cache"), steps)
        spec = {"name": "bench", "base": base, "storage_path": str(root / "sweeps"), "status_every_s": 1000,
                "space": {"train.lr": {"grid": list(LRS[:trials])}}, "metric": "val/loss", "eval": {"tasks": None}}
        if concurrency:
            spec["max_concurrent_trials"] = concurrency
        (root / "sweep.yaml").write_text(yaml.safe_dump(spec))
        sweep = load_sweep(root / "sweep.yaml")
        configs = []
        for i, lr in enumerate(LRS[:trials]):
            cfg = sweep.trial_config(trial_values(sweep.dims, {"train.lr": lr}), str(root / f"train{i}"), f"train{i}")
            path = root / f"train{i}.yaml"
            path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            configs.append(path)
        # Warm the caches both sides share (tokenizer, packed data) so neither pays for them.
        from raydistill.config import load_config
        from raydistill.train.plan import prepare

        prepare(load_config(configs[0]))
        with CpuSampler() as cpu_sweep:
            sweep_s = _run(["sweep", str(root / "sweep.yaml")])
        with CpuSampler() as cpu_seq:
            seq_s = sum(_run(["train", str(p)]) for p in configs)
    rows = [{"side": "sweep", "trials": trials, "wall_s": round(sweep_s, 1), "cpu_util_pct": cpu_sweep.mean},
            {"side": "train x N", "trials": trials, "wall_s": round(seq_s, 1), "cpu_util_pct": cpu_seq.mean}]
    table = "\n".join([f"{'side':<10} {'trials':>6} {'wall s':>8} {'CPU %':>6}"] +
                      [f"{r['side']:<10} {r['trials']:>6} {r['wall_s']:>8} {r['cpu_util_pct']:>6}" for r in rows])
    return {"ratio": round(sweep_s / seq_s, 3), "sweep_s": round(sweep_s, 1), "sequential_s": round(seq_s, 1),
            "cpu_util_sweep_pct": cpu_sweep.mean, "cpu_util_sequential_pct": cpu_seq.mean,
            "steps_per_trial": steps, "rows": rows, "table": table + f"\nratio (sweep / back-to-back) "
            f"{sweep_s / seq_s:.3f}"}
