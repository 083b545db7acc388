"""The teacher's own benchmark scores, once per sweep: ``STORAGE/NAME/teacher/bench.json``.

Scored on the sweep's ``eval.tasks`` with the trials' settings, by a Ray task started before the trials (it
waits on the evaluation's own Ray tasks, which take their resources from the cluster like the trials' do), so
no trial waits for it; the runner collects it when the trials are done. ``raydistill report`` reads the file
for its teacher row and the teacher–baseline gap. A failure is reported and never fails the sweep."""

from __future__ import annotations

import json
import time
from typing import Any

from raydistill.sweep import results as R
from raydistill.sweep.spec import Sweep

FOLDER = "teacher"
BENCH = "bench.json"


def teacher_model(cfg, plan) -> tuple[str | None, str]:
    """(what to score, why not): the teacher the trials distil from, as ``raydistill eval`` names a model."""
    if plan.teacher_source is None:
        return None, ("the teacher is a randomly initialised preset (each trial draws its own; set "
                      "teacher.pretrain to train one)")
    if cfg.teacher.revision and plan.teacher_source == cfg.teacher.name:
        return None, f"teacher.revision {cfg.teacher.revision!r} is set and raydistill eval scores a hub id's default"
    return plan.teacher_source, ""


def existing_scores(sweep: Sweep) -> dict[str, Any] | None:
    """A readable ``teacher/bench.json`` already in the sweep's storage, or None."""
    try:
        data = R.read_bytes_from(R.uri_join(sweep.dir, FOLDER), BENCH)
        bench = json.loads(data) if data else None
    except Exception:  # noqa: BLE001 - unreadable or unreachable: score again
        return None
    return bench if isinstance(bench, dict) and bench.get("summary") else None


def score_teacher(sweep: Sweep, cfg, model: str) -> dict[str, Any]:
    """Runs as a Ray task: score ``model`` and write ``teacher/bench.json`` (atomically, local or object
    storage). Returns {"scores", "path", "wall_s"} or {"error"}: the driver reports it."""
    from raydistill.eval.runner import evaluate
    from raydistill.sweep.trial import bench_json, bench_scores, bench_settings

    start = time.perf_counter()
    try:
        spec = sweep.spec.eval
        report = evaluate(model, spec.tasks, bench_settings(sweep, cfg), spec.data_dir, use_ray=True)
        path = R.write_bytes_to(R.uri_join(sweep.dir, FOLDER), BENCH, bench_json(report).encode())
    except Exception as e:  # noqa: BLE001 - reported by the driver, the sweep goes on
        first = (str(e).strip().splitlines() or [""])[0]
        return {"error": f"{type(e).__name__}: {first[:300]}"}
    return {"scores": bench_scores(report.summary), "path": str(path), "wall_s": time.perf_counter() - start}


def start(sweep: Sweep, cfg, plan, resume: bool):
    """Start scoring the teacher (a Ray ObjectRef), or None when off, done already (``--resume``) or impossible
    (said why)."""
    spec = sweep.spec.eval
    if not spec.teacher or not spec.tasks:
        return None
    if resume and existing_scores(sweep) is not None:
        print(f"[raydistill] teacher scores: reusing {R.uri_join(sweep.dir, FOLDER + '/' + BENCH)}", flush=True)
        return None
    model, why = teacher_model(cfg, plan)
    if model is None:
        print(f"[raydistill] note: the teacher is not scored (eval.teacher): {why}", flush=True)
        return None
    import ray

    print(f"[raydistill] scoring the teacher on {spec.tasks} alongside the trials", flush=True)
    try:
        return ray.remote(num_cpus=0, max_retries=0)(score_teacher).remote(sweep, cfg, model)
    except Exception as e:  # noqa: BLE001 - the sweep goes on without the teacher's scores
        print(f"[raydistill] warning: scoring the teacher failed to start: {type(e).__name__}: {e}", flush=True)
        return None


def collect(ref) -> dict[str, Any] | None:
    """Wait for the teacher's scores and say what came of them; None when there were none to wait for."""
    if ref is None:
        return None
    import ray

    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        print("[raydistill] waiting for the teacher's scores", flush=True)
    try:
        out = ray.get(ref)
    except Exception as e:  # noqa: BLE001 - the task itself died (node lost, out of memory)
        out = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
    if "error" in out:
        print(f"[raydistill] warning: scoring the teacher failed (the sweep's results are unaffected; the report "
              f"shows no teacher row): {out['error']}", flush=True)
    else:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(out["scores"].items()))
        print(f"[raydistill] teacher scores ({out['wall_s']:.0f} s): {shown} -> {out['path']}", flush=True)
    return out
