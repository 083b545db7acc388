"""``raydistill sweep``: run a sweep file on Ray Tune (Train V2 pattern), or resume an interrupted one."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from raydistill.errors import ConfigError
from raydistill.sweep import results as R
from raydistill.sweep.spec import Sweep
from raydistill.sweep.space import grid_size, param_space
from raydistill.sweep.trial import trial_driver

try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a hard dependency
    _TuneCallback = object


class SweepMonitor(_TuneCallback):
    """Keeps the results table current and prints a live table of trials (status, step, main metric)."""

    def __init__(self, sweep: Sweep, directory: str):
        self.sweep, self.directory = sweep, directory
        self._last_print = 0.0
        self._last_table = ""

    def _update(self, trials, force_print: bool = False) -> None:
        rows = [R.trial_row(self.sweep, t) for t in trials]
        if self.sweep.is_local:
            R.write_table(self.directory, rows)
        now = time.monotonic()
        if force_print or now - self._last_print >= self.sweep.spec.status_every_s:
            self._print(rows)
            self._last_print = now

    def _print(self, rows: list[dict[str, Any]]) -> None:
        import pandas as pd

        if not rows:
            return
        frame = pd.DataFrame(rows)
        metric = self.sweep.spec.metric
        cols = ["trial", "status", "step"] + [c for c in frame.columns if c.startswith("config/")]
        cols += [c for c in (metric, "loss") if c in frame.columns and c not in cols]
        counts = frame["status"].value_counts().to_dict()
        title = "[raydistill] trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        table = R.render(frame, [c for c in cols if c in frame.columns], title=title)
        if table != self._last_table:
            print(table, flush=True)
            self._last_table = table

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trials, force_print=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trials, force_print=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trials, force_print=True)

    def on_experiment_end(self, trials, **info):
        self._update(trials, force_print=True)


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _search_alg(sweep: Sweep, concurrency: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = sweep.spec
    if spec.search.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("search.algorithm optuna needs optuna: pip install 'raydistill[optuna]'") from None
        return OptunaSearch(metric=spec.metric, mode=spec.mode, seed=spec.search.seed)
    # Tune ignores max_concurrent_trials for a generator: it takes the limit itself.
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=concurrency)


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    s = sweep.spec.scheduler
    metric, mode = s.metric or sweep.spec.metric, s.mode or sweep.spec.mode
    if s.kind == "asha":
        # stop_last_trials=False: a trial reaching max_t ends by itself, after scoring its student.
        return ASHAScheduler(time_attr="step", metric=metric, mode=mode, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, max_t=s.max_t or sweep.base["train"]["max_steps"],
                             stop_last_trials=False)
    if s.kind == "median":
        return MedianStoppingRule(time_attr="step", metric=metric, mode=mode, grace_period=s.grace_period,
                                  min_samples_required=2)
    return FIFOScheduler()


def check_scheduler(sweep: Sweep) -> None:
    """An early-stopping scheduler needs intermediate reports carrying its metric."""
    s = sweep.spec.scheduler
    if s.kind == "fifo":
        return
    train = sweep.base["train"]
    metric = s.metric or sweep.spec.metric
    swept = any(d.path.startswith("train.") for d in sweep.dims)
    if metric.startswith("bench/"):
        raise ConfigError(f"scheduler {s.kind}: metric {metric!r} is a benchmark score, known only when a trial "
                          "ends; set scheduler.metric to a validation metric such as val/loss")
    if not swept and not train["eval_every"] and not (train["report_every"] and not metric.startswith("val/")):
        raise ConfigError(f"scheduler {s.kind} acts on intermediate results, but trials report {metric!r} only "
                          "at the end; set train.eval_every (under 'set') in the sweep")


def default_concurrency(sweep: Sweep) -> int:
    import ray

    scaling = sweep.base["scaling"]
    have = ray.cluster_resources()
    cpu_need = scaling["num_workers"] * scaling["cpus_per_worker"]
    limit = int(have.get("CPU", 1) // max(cpu_need, 1e-9))
    if scaling["use_gpu"]:
        limit = min(limit, int(have.get("GPU", 0) // max(scaling["num_workers"] * scaling["gpus_per_worker"], 1e-9)))
    return max(1, limit)


def _grid_space(sweep: Sweep) -> dict:
    """search.algorithm grid: every categorical dimension enumerated (choice counts as grid)."""
    from ray import tune

    numeric = [d.path for d in sweep.dims if d.size is None or d.kind not in ("choice", "grid")]
    if numeric:
        raise ConfigError(f"search.algorithm grid enumerates values; {numeric} are sampled distributions: use "
                          "choice/grid for them, or algorithm random")
    return {d.path: tune.grid_search(list(d.names)) for d in sweep.dims}


def run_sweep(sweep: Sweep, resume_path: str | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; return where its outputs are and the best trial."""
    from ray import tune

    from raydistill.train.launcher import init_ray, with_teacher
    from raydistill.train.plan import prepare

    spec = sweep.spec
    check_scheduler(sweep)
    base_cfg = sweep.base_config()
    if not base_cfg.ray.dashboard and not (base_cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        # Ray Train frees a stopped trial's worker placement group through the State API, which the
        # dashboard serves: without it, the first trial a scheduler stops blocks every later one.
        print("[raydistill] note: sweeps start the Ray dashboard (ray.dashboard=false ignored): Ray Train needs "
              "it to release the workers of trials a scheduler stops", flush=True)
        base_cfg = base_cfg.model_copy(update={"ray": base_cfg.ray.model_copy(update={"dashboard": True})})
    # Schedulers tolerate results without their metric (evaluations are periodic, scores come at the end).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    init_ray(base_cfg)
    # Train a preset teacher once here, so concurrent trials find it cached instead of racing to train it.
    with_teacher(base_cfg, prepare(base_cfg))
    directory = sweep.dir
    if sweep.is_local:
        Path(directory).mkdir(parents=True, exist_ok=True)
        if resume_path is None:
            (Path(directory) / R.SWEEP_FILE).write_text(sweep.to_yaml())
    trainable = tune.with_resources(tune.with_parameters(trial_driver, sweep=sweep), {"CPU": spec.driver_cpus})
    concurrency = spec.max_concurrent_trials or default_concurrency(sweep)
    if resume_path is not None:
        tuner = tune.Tuner.restore(resume_path, trainable, resume_unfinished=True, resume_errored=True)
        print(f"[raydistill] resuming sweep {spec.name} from {resume_path}", flush=True)
    else:
        space = _grid_space(sweep) if spec.search.algorithm == "grid" else param_space(sweep.dims)
        n = spec.num_samples * (grid_size(sweep.dims) if spec.search.algorithm != "optuna" else 1)
        print(f"[raydistill] sweep {spec.name}: {n} trials, up to {concurrency} at a time -> {directory}",
              flush=True)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(num_samples=spec.num_samples, search_alg=_search_alg(sweep, concurrency),
                                        scheduler=_scheduler(sweep), max_concurrent_trials=concurrency,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=spec.name, storage_path=_storage(spec.storage_path), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      callbacks=[SweepMonitor(sweep, directory)]))
    grid = tuner.fit()
    out = finish(sweep, directory, grid)
    out["free_cpus"], out["total_cpus"] = _settled_cpus()
    print(f"[raydistill] cluster after the sweep: {out['free_cpus']:g} of {out['total_cpus']:g} CPUs free", flush=True)
    return out


def _settled_cpus(timeout_s: float = 30.0) -> tuple[float, float]:
    """Free and total CPUs once the last trial's workers are gone (stopped trials release theirs asynchronously)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        total, free = ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)
        if free >= total or time.monotonic() > deadline:
            return free, total
        time.sleep(1.0)


def _storage(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def finish(sweep: Sweep, directory: str, grid) -> dict[str, Any]:
    """Write the final table, the best config and student; print the leaderboard."""
    import pandas as pd

    trials = [r for r in getattr(grid, "_experiment_analysis").trials]
    rows = [R.trial_row(sweep, t) for t in trials]
    out: dict[str, Any] = {"directory": directory, "trials": len(rows),
                           "failed": sum(r["status"] == "failed" for r in rows)}
    if not sweep.is_local:
        print("[raydistill] results table, best config and best student are written for local storage only; "
              f"Tune's own results are under {directory}", flush=True)
        return out
    R.write_table(directory, rows)
    best = R.best_row(rows, sweep.spec.metric, sweep.spec.mode)
    if best is not None:
        trial = next(t for t in trials if t.trial_id == best["trial"])
        out.update(best_trial=best["trial"], best_metric=best[sweep.spec.metric],
                   **R.write_best(sweep, directory, best, trial.config))
    print(R.format_leaderboard(pd.DataFrame(rows), sweep), flush=True)
    print(f"[raydistill] results: {directory}/results.csv (.parquet)", flush=True)
    for key in ("best_config", "best_student"):
        if key in out:
            print(f"[raydistill] {key.replace('_', ' ')}: {out[key]}", flush=True)
    if best is None:
        print(f"[raydistill] no finished trial reported {sweep.spec.metric!r}", flush=True)
    return out
