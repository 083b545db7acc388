"""Driver: start or join Ray, pretrain a teacher if asked (cached), and fit a TorchTrainer."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from raydistill.config import ExperimentConfig, TrainSpec, dump_config
from raydistill.errors import RaydistillError
from raydistill.train.plan import Mode, RunPlan, prepare, pretrained_teacher_dir


class TrainingFailed(RaydistillError):
    pass


def worker_env(cfg: ExperimentConfig) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1",
           # Progress lines go straight to stdout; the print patch would log each twice.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed then uses gloo and its CPU accelerator
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.scaling.cpus_per_worker)))
    return env


def init_ray(cfg: ExperimentConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(runtime_env={"env_vars": worker_env(cfg)}, log_to_driver=cfg.ray.log_to_driver)
    if address is None:
        kwargs.update(include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1")
    ctx = ray.init(address=address, **kwargs)
    url = getattr(ctx, "dashboard_url", None)
    if url:
        print(f"[raydistill] Ray dashboard: http://{url}", flush=True)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fit(plan: RunPlan, callbacks: list | None = None, storage_path: str | None = None) -> dict:
    """Run the plan on Ray Train; return a summary with the final metrics (those of the last checkpoint).

    ``callbacks`` are Ray Train callbacks (a sweep forwards reports to Tune with one); ``storage_path`` is
    where Ray keeps checkpoints (default OUTPUT_DIR/ray; s3:// and gs:// pass through)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydistill.train.worker import train_loop_per_worker

    cfg = plan.cfg
    for note in plan.notes:
        print(f"[raydistill] note: {note}", flush=True)
    out = Path(plan.output_dir)
    _write_atomic(out / ("config.yaml" if plan.mode == "distill" else "teacher_config.yaml"), dump_config(cfg))
    if plan.blocks is not None:  # ship the packed corpus through the object store (works across nodes)
        plan.blocks_ref = ray.put(plan.blocks)
        plan.blocks = None
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {}),
                 **s.resources_per_worker}
    name = cfg.name if plan.mode == "distill" else f"{cfg.name}-teacher"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path or str(out / "ray"), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)))
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the cause, keep the run resumable
        raise TrainingFailed(f"training failed: {e}\nrerun the same command to resume from the latest "
                             f"checkpoint under {out / 'ray' / name}") from None
    metrics = dict(result.metrics or {})
    summary = {"mode": plan.mode, "name": cfg.name, "export_dir": plan.export_dir,
               "wall_time_s": round(time.perf_counter() - start, 2), "final_metrics": metrics}
    _write_atomic(out / ("summary.json" if plan.mode == "distill" else "teacher_summary.json"),
                  json.dumps(summary, indent=2))
    return summary


def ensure_teacher(cfg: ExperimentConfig, plan: RunPlan) -> str | None:
    """If the teacher is a preset with ``pretrain`` set, train it once (cached) and return its directory."""
    pre = cfg.teacher.pretrain
    if pre is None or plan.teacher_source is not None:
        return None
    cache = pretrained_teacher_dir(cfg, plan.tokenizer)
    model_dir = cache / "teacher"
    if (model_dir / "config.json").is_file():
        print(f"[raydistill] using cached teacher {model_dir}", flush=True)
        return str(model_dir)
    print(f"[raydistill] pretraining the teacher ({pre.max_steps} steps) -> {model_dir}", flush=True)
    teacher_cfg = cfg.model_copy(update={
        "output_dir": str(cache),
        "train": TrainSpec(max_steps=pre.max_steps, lr=pre.lr, batch_size=pre.batch_size, seed=cfg.train.seed,
                           log_every=max(1, pre.max_steps // 10), warmup_ratio=0.05, lr_schedule="linear"),
        "scaling": cfg.scaling.model_copy(update={"num_workers": pre.num_workers or cfg.scaling.num_workers}),
    })
    fit(prepare(teacher_cfg, mode="teacher"))
    return str(model_dir)


def with_teacher(cfg: ExperimentConfig, plan: RunPlan) -> RunPlan:
    """Point a distillation plan at its pretrained teacher (training it first if it is not cached)."""
    if plan.mode == "distill":
        teacher_dir = ensure_teacher(cfg, plan)
        if teacher_dir is not None:
            plan.teacher_source = teacher_dir
            plan.notes = [n for n in plan.notes if "randomly initialised" not in n]
    return plan


def run(cfg: ExperimentConfig, mode: Mode = "distill") -> dict:
    """Everything ``raydistill train`` / ``raydistill teacher`` does. All validation precedes ``ray.init``."""
    plan = prepare(cfg, mode=mode)
    init_ray(cfg)
    return fit(with_teacher(cfg, plan))
