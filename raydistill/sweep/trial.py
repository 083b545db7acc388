"""One sweep trial: the Tune function trainable ("driver") of the Train V2 pattern.

It turns Tune's sampled point into an experiment config, fits a TorchTrainer whose reports Tune receives
through ``TuneReportCallback`` (so schedulers see every evaluation), then scores the exported student on
the benchmark tasks as Ray tasks with their own resources and reports the scores as the trial's last
result. It returns None: a returned dict would count as one more result."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from raydistill.fsutil import write_text_atomic
from raydistill.monitoring import board as phases
from raydistill.monitoring.board import Monitor
from raydistill.sweep import results as R
from raydistill.sweep.spec import Sweep
from raydistill.sweep.space import trial_values

TRIAL_LOG = "trial.jsonl"  # one line per driver start and end: how resumes are audited
FINAL_RESULT = "final_result.json"  # the trial's last report, written before its end event
INTERRUPTED = ".interrupted"  # in the sweep directory while an interrupted sweep winds down
INTERRUPT_WAIT_S = 60.0


def _log(trial_dir: Path, event: str, **fields: Any) -> None:
    with open(trial_dir / TRIAL_LOG, "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        f.flush()


def events(trial_dir: str | Path) -> list[dict[str, Any]]:
    try:
        lines = (Path(trial_dir) / TRIAL_LOG).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            pass
    return out


def finished_result(trial_dir: str | Path) -> dict[str, Any] | None:
    """The last report of a trial that finished (its end event and saved result), or None: what a resumed sweep
    reports again instead of running the trial a second time."""
    trial_dir = Path(trial_dir)
    if not any(e.get("event") == "end" for e in events(trial_dir)):
        return None
    try:
        return json.loads((trial_dir / FINAL_RESULT).read_text())
    except (OSError, ValueError):
        return None


def bench_scores(summary) -> dict[str, float]:
    """``bench/<task>/<metric>`` -> mean over seeds, from an evaluation summary."""
    return {f"bench/{row.task}/{row.metric}": float(row.mean) for row in summary}


def bench_settings(sweep: Sweep, cfg):
    """The EvalSettings every model of the sweep is scored with (trials' students and the teacher)."""
    from raydistill.eval.settings import EvalSettings

    # The built-in tasks come from the same generated world as the training corpus.
    return EvalSettings(**{"builtin_seed": cfg.data.builtin.seed, **sweep.spec.eval.settings})


def bench_json(report) -> str:
    """``bench.json``: an evaluation report's summary (what ``raydistill report`` reads), rows, time and notes."""
    from dataclasses import asdict

    return json.dumps({"summary": [asdict(r) for r in report.summary], "rows": [asdict(r) for r in report.rows],
                       "wall_s": report.wall_s, "notes": report.notes}, indent=2)


def run_benchmarks(sweep: Sweep, cfg, model_dir: str, trial_dir: Path) -> dict[str, float]:
    from raydistill.eval.runner import evaluate

    spec = sweep.spec.eval
    if not spec.tasks:
        return {}
    report = evaluate(model_dir, spec.tasks, bench_settings(sweep, cfg), spec.data_dir, use_ray=True)
    write_text_atomic(trial_dir / "bench.json", bench_json(report))
    return bench_scores(report.summary)


UPLOADED = ("metrics.jsonl", "summary.json", "bench.json", "config.yaml", "config.resolved.json")


def upload_outputs(sweep: Sweep, trial_dir: Path, export_dir: str) -> str:
    """Object-storage sweeps (s3://, gs://, file://): the trial's run wrote into Tune's node-local staging
    folder, so its student, metrics, TensorBoard events and scores are copied to STORAGE/NAME/trial_ID/, where
    the best student, ``raydistill report`` and TensorBoard find them from any machine. Returns the student's
    URI."""
    remote = R.uri_join(sweep.dir, trial_dir.name)
    for name in UPLOADED:
        if (trial_dir / name).is_file():
            R.write_bytes_to(remote, name, (trial_dir / name).read_bytes())
    if (trial_dir / "tensorboard").is_dir():
        R.copy_dir_to(str(trial_dir / "tensorboard"), remote, "tensorboard")
    return R.copy_dir_to(export_dir, remote, "student")


def _wait_if_interrupted(sweep: Sweep) -> None:
    """A trial Tune starts while an interrupted sweep winds down does no work: it waits to be stopped (Tune's
    saved state still lists it as unfinished, so ``--resume`` runs it)."""
    marker = Path(sweep.dir) / INTERRUPTED
    if not (sweep.is_local and marker.exists()):
        return
    deadline = time.monotonic() + INTERRUPT_WAIT_S
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if marker.exists():
        raise RuntimeError("the sweep was interrupted before this trial started; raydistill sweep --resume runs it")


def trial_driver(config: dict[str, Any], sweep: Sweep, resource_timeout_s: float | None = None,
                 monitor: Monitor | None = None) -> None:
    """``monitor``: the sweep's (its name, its progress board); the trial adds its id."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydistill.train.launcher import fit, with_teacher
    from raydistill.train.plan import prepare

    ctx = tune.get_context()
    # Tune's trial dir is a per-session staging folder; with local storage the run writes straight into
    # the sweep directory instead, so exports and checkpoints outlive the session (resume, best student).
    trial_dir = Path(ctx.get_trial_dir())
    if sweep.is_local:
        trial_dir = Path(sweep.dir) / trial_dir.name
    trial_dir.mkdir(parents=True, exist_ok=True)
    _wait_if_interrupted(sweep)
    trial_id = ctx.get_trial_id()
    monitor = replace(monitor or Monitor(run=sweep.spec.name), trial=trial_id, key=trial_id)
    begun = time.monotonic()
    done = finished_result(trial_dir)
    if done is not None:  # finished before the sweep was interrupted or killed: report it again, run nothing
        _log(trial_dir, "restored", trial_id=trial_id)
        monitor.post(phase=phases.DONE)
        tune.report(done)
        return
    _log(trial_dir, "start", trial_id=trial_id)
    monitor.post(phase=phases.PREPARING)
    values = trial_values(sweep.dims, config)
    cfg = sweep.trial_config(values, output_dir=str(trial_dir), name=trial_id)
    monitor = replace(monitor, metrics=cfg.monitoring.metrics, peak_flops=cfg.monitoring.peak_flops)
    write_text_atomic(trial_dir / "config.resolved.json", json.dumps(cfg.model_dump(mode="json"), indent=2))
    plan = with_teacher(cfg, prepare(cfg), monitor)
    # Checkpoints go to the sweep's storage (shared or cloud storage on a multi-node cluster).
    storage = None if sweep.is_local else R.uri_join(sweep.dir, f"{trial_dir.name}/train")
    summary = fit(plan, callbacks=[TuneReportCallback()], storage_path=storage, resource_timeout_s=resource_timeout_s,
                  reserved=[{"CPU": sweep.spec.driver_cpus}], monitor=monitor)
    final = {k: v for k, v in (summary["final_metrics"] or {}).items() if isinstance(v, (int, float))}
    if sweep.spec.eval.tasks:
        monitor.post(phase=phases.BENCHMARKS)
    scores = run_benchmarks(sweep, cfg, plan.export_dir, trial_dir)
    export_dir = plan.export_dir if sweep.is_local else upload_outputs(sweep, trial_dir, plan.export_dir)
    cache = {f"teacher_cache/{k}": plan.teacher_cache.stats[k] for k in ("reused_files", "computed_files")} \
        if plan.teacher_cache is not None else {}
    # runtime_s: the trial's own wall time, saved with its result, so a resumed sweep that reports a finished trial
    # again keeps it (Tune's time_total_s then counts only the restored session's few seconds).
    result = {**final, **scores, **cache, "step": cfg.train.max_steps, "export_dir": export_dir, "finished": 1,
              "runtime_s": round(time.monotonic() - begun, 2)}
    # Saved, then the end event, then reported: once the end event exists the trial never runs again.
    write_text_atomic(trial_dir / FINAL_RESULT, json.dumps(result))
    _log(trial_dir, "end", **scores)
    monitor.post(phase=phases.DONE)
    tune.report(result)
