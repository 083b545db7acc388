"""``raydistill sweep``: run a sweep file on Ray Tune (Train V2 pattern), or resume an interrupted one."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from raydistill.errors import ConfigError, RaydistillError
from raydistill.fsutil import write_text_atomic
from raydistill.monitoring import board as phases
from raydistill.monitoring.board import Monitor
from raydistill.monitoring.metrics import SweepMetrics
from raydistill.monitoring.terminal import Display, describe
from raydistill.sweep import results as R
from raydistill.sweep import teacher as teacher_bench
from raydistill.sweep.spec import Sweep
from raydistill.sweep.space import grid_size, param_space
from raydistill.sweep.trial import INTERRUPTED, trial_driver
from raydistill.train.faults import Interrupted, skip_unsupported

try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a hard dependency
    _TuneCallback = object


class _Interrupt:
    """This process's sweep interruption: set by the SIGINT handler the monitor installs, read by the monitor
    (statuses) and ``run_sweep`` (exit status, resume hint). ``ended`` holds the trials that had ended (finished,
    stopped by the scheduler, failed) before the signal: only the others are "interrupted"."""

    def __init__(self):
        self.event = threading.Event()
        self.ended: set[str] = set()
        self.marker: Path | None = None

    def reset(self, marker: Path | None) -> None:
        self.event.clear()
        self.ended = set()
        self.marker = marker
        if marker is not None:
            try:
                marker.unlink()  # left by a sweep killed while winding down: trials must not wait for it
            except FileNotFoundError:
                pass

    def set(self) -> None:
        if self.event.is_set():
            return
        self.event.set()
        if self.marker is not None:
            try:
                self.marker.touch()  # trial drivers Tune starts from now on do no work
            except OSError:
                pass
        print("[raydistill] interrupted: no new trial starts; stopping the running trials and saving the sweep's "
              "state (press Ctrl-C again to stop at once)", flush=True)

    def status(self, trial, status: str) -> str:
        """``status`` (from ``raydistill.ranking.trial_status``), or "interrupted" for a trial the signal cut short."""
        if not self.event.is_set() or status in ("finished", "failed", "pending"):
            return status
        if status == "running" or trial.trial_id not in self.ended:
            return "interrupted"
        return status


INTERRUPT = _Interrupt()
# This process's progress display. Module state, like INTERRUPT, because Tune pickles its callbacks into
# tuner.pkl and a resumed sweep gets the pickled SweepMonitor back: the monitor must not hold the display.
DISPLAY: list[Display] = []


class _QuietTuneInterrupt(logging.Filter):
    """Tune's own interrupt messages point at its Python API (Tuner.restore); raydistill prints its command."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("Tuner.restore(" in msg or "Stop signal received" in msg or "Trials did not complete" in msg)


class _ExplainedTrialFailures(logging.Filter):
    """Tune logs every failed trial with the traceback of its Ray task. A raydistill error (a value the config
    refuses, a non-finite loss, a worker's stated failure) is one message, which SweepMonitor prints in one line
    and the results table keeps: its traceback is dropped. Any other exception keeps Tune's traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Trial task failed") and isinstance(error, RaydistillError))


class SweepMonitor(_TuneCallback):
    """Keeps the results table current and shows the table of trials (status, phase, step, main metric): in
    place in a terminal (the display redraws it with each trial's phase from the progress board), else
    printed when a trial starts or ends and every ``status_every_s`` seconds. Exports the sweep's series."""

    def __init__(self, sweep: Sweep, directory: str):
        self.sweep, self.directory = sweep, directory
        self._last_print = 0.0
        self._last_table = ""
        self._rows: list[dict[str, Any]] = []
        metrics = sweep.base_config().monitoring.metrics
        self.series = SweepMetrics(sweep.spec.name, sweep.spec.metric, sweep.spec.mode, enabled=metrics)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A monitor from tuner.pkl; one pickled by an earlier raydistill lacks the fields added since."""
        self.__dict__.update(state)
        self.__dict__.setdefault("_rows", [])
        if "series" not in self.__dict__:
            self.series = SweepMetrics(self.sweep.spec.name, self.sweep.spec.metric, self.sweep.spec.mode,
                                       enabled=self.sweep.base_config().monitoring.metrics)

    @property
    def display(self) -> Display | None:
        return DISPLAY[-1] if DISPLAY else None

    def _trial_keys(self) -> set[str]:
        return {str(r["trial"]) for r in self._rows}

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        """Hand the table to a live display; chain raydistill's interrupt bookkeeping before Tune's SIGINT
        handler (installed just before this)."""
        display = self.display
        if display is not None and display.live_mode:
            display.table = self.table
            display.table_keys = self._trial_keys
        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            INTERRUPT.set()
            if callable(tune_handler):
                tune_handler(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

    def on_step_begin(self, iteration, trials, **info):
        if not INTERRUPT.event.is_set():
            INTERRUPT.ended = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

    def _update(self, trials, force_print: bool = False) -> None:
        if not INTERRUPT.event.is_set():
            INTERRUPT.ended |= {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        rows = sweep_rows(self.sweep, trials)
        self._rows = rows
        self.series.update(rows)
        # Object storage (s3://, gs://, file://) gets the table when a trial changes state, not on every result.
        if self.sweep.is_local or force_print:
            R.write_table(self.directory, rows)
        if self.display is not None and self.display.live_mode:
            return  # the display redraws the table in place
        now = time.monotonic()
        if force_print or now - self._last_print >= self.sweep.spec.status_every_s:
            self._print(rows)
            self._last_print = now

    def table(self, snapshot: dict[str, dict[str, Any]] | None = None) -> str:
        """The trial table as text, with each running trial's phase from the progress board."""
        import pandas as pd

        rows = self._rows
        if not rows:
            return "[raydistill] trials: waiting for the first trial"
        if snapshot is None:
            snapshot = self.display.snapshot() if self.display is not None else {}
        now = time.time()
        shown = [{**r, "phase": describe(snapshot[str(r["trial"])], now)
                  if r["status"] == "running" and str(r["trial"]) in snapshot else ""} for r in rows]
        frame = pd.DataFrame(shown)
        metric = self.sweep.spec.metric
        cols = ["trial", "status", "phase", "step"] + [c for c in frame.columns if c.startswith("config/")]
        cols += [c for c in (metric, "loss") if c in frame.columns and c not in cols]
        counts = frame["status"].value_counts().to_dict()
        title = "[raydistill] trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return R.render(frame, [c for c in cols if c in frame.columns], title=title)

    def _print(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        table = self.table()
        if table != self._last_table:
            print(table, flush=True)
            self._last_table = table

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trials, force_print=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not INTERRUPT.event.is_set():
            INTERRUPT.ended.add(trial.trial_id)
        self._update(trials, force_print=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[raydistill] trial {trial.trial_id} failed: {R.trial_row(self.sweep, trial)['error']}", flush=True)
        self._update(trials, force_print=True)

    def on_experiment_end(self, trials, **info):
        self._update(trials, force_print=True)


def sweep_rows(sweep: Sweep, trials) -> list[dict[str, Any]]:
    rows = []
    for t in trials:
        row = R.trial_row(sweep, t)
        row["status"] = INTERRUPT.status(t, row["status"])
        rows.append(row)
    return rows


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def tracker_callbacks(sweep: Sweep) -> list:
    """Ray Tune's own logger callbacks for the sweep file's ``callbacks:`` section. Unset values fall back to
    the trackers' usual environment variables, then to the sweep's name. Tune adds its TensorBoard logger by
    itself; ``tensorboard: false`` turns Tune's automatic loggers off and keeps its CSV and JSON ones."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    spec = sweep.spec.callbacks
    out: list = []
    if spec.tensorboard:
        out.append(TBXLoggerCallback())
    else:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        out += [CSVLoggerCallback(), JsonLoggerCallback()]
    if spec.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        m = spec.mlflow
        uri = m.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri and uri.startswith("file:"):  # asked for by name: MLflow 3.x refuses its file store unless told
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        out.append(MLflowLoggerCallback(
            tracking_uri=uri,
            experiment_name=m.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or sweep.spec.name,
            tags={"sweep": sweep.spec.name, **m.tags}, save_artifact=m.save_artifact))
    if spec.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        w = spec.wandb
        if w.mode:  # Ray checks for an API key unless WANDB_MODE says offline/disabled
            os.environ["WANDB_MODE"] = w.mode
        extra = {k: v for k, v in (("entity", w.entity), ("mode", w.mode), ("dir", w.dir),
                                   ("tags", w.tags or None)) if v is not None}
        out.append(WandbLoggerCallback(
            project=w.project or os.environ.get("WANDB_PROJECT") or sweep.spec.name,
            group=w.group or os.environ.get("WANDB_RUN_GROUP") or sweep.spec.name,
            api_key_file=w.api_key_file, **extra))
    return out


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
    # The generator takes the concurrency limit itself (Tune would ignore, with a warning, a second one).
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=concurrency)


def tune_config(sweep: Sweep, concurrency: int):
    """The TuneConfig: the concurrency limit is passed once, where it is used (the basic generator's own
    ``max_concurrent``; a Searcher such as Optuna gets Tune's ``max_concurrent_trials``)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = _search_alg(sweep, concurrency)
    own_limit = isinstance(search, BasicVariantGenerator)
    return tune.TuneConfig(num_samples=sweep.spec.num_samples, search_alg=search, scheduler=_scheduler(sweep),
                           max_concurrent_trials=None if own_limit else concurrency,
                           trial_name_creator=trial_name, trial_dirname_creator=trial_name)


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    s = sweep.spec.scheduler
    metric, mode = s.metric or sweep.spec.metric, s.mode  # its mode resolved for its metric (sweep.spec)
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


def run_sweep(sweep: Sweep, resume_path: str | None = None, display: Display | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; return where its outputs are and the best trial. ``display``: the command's
    progress display (default: one of its own, as ``monitoring.progress`` of the base config says).

    SIGINT: no new trial starts, running trials stop, the table marks them "interrupted" and ``Interrupted``
    (exit status 130) says how to resume."""
    if display is None:
        with Display(sweep.base_config().monitoring.progress) as display:
            return run_sweep(sweep, resume_path, display)
    import ray

    from raydistill.train.launcher import _shutdown

    owned = not ray.is_initialized()
    DISPLAY.append(display)
    try:
        return _run_sweep(sweep, resume_path, display)
    except KeyboardInterrupt:  # before Tune started, or a second Ctrl-C while it wound down
        display.close()  # no poll of the board while Ray shuts down
        _shutdown(owned)
        started = sweep.is_local and (Path(sweep.dir) / "tuner.pkl").exists()
        raise Interrupted("interrupted; " + (f"resume with: raydistill sweep --resume {sweep.dir}" if started else
                                             "no trial had started: rerun the same command")) from None
    except Interrupted:
        display.close()
        _shutdown(owned)  # Ray's buffered log lines before the message, not after it
        raise
    finally:
        DISPLAY.remove(display)


def _check_cluster(sweep: Sweep, timeout_s: float) -> None:
    """A trial the cluster can never hold is refused before Tune starts (unless scaling is swept: then each
    trial checks its own)."""
    from raydistill.train import cluster

    if any(d.path == "scaling" or d.path.startswith("scaling.") for d in sweep.dims):
        return
    cluster.ensure_fits(sweep.base_config().scaling, timeout_s, reserved=[{"CPU": sweep.spec.driver_cpus}],
                        what="each trial")


def _run_sweep(sweep: Sweep, resume_path: str | None, display: Display) -> dict[str, Any]:
    from ray import tune

    from raydistill.monitoring.board import start_board
    from raydistill.train import cluster
    from raydistill.train.launcher import init_ray, joined_existing_cluster, with_teacher
    from raydistill.train.plan import prepare

    spec = sweep.spec
    check_scheduler(sweep)
    base_cfg = sweep.base_config()
    if skip_unsupported(base_cfg):
        raise ConfigError(skip_unsupported(base_cfg))
    if not base_cfg.ray.dashboard and not (base_cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        # Ray Train frees a stopped trial's worker placement group through the State API, which the
        # dashboard serves: without it, the first trial a scheduler stops blocks every later one.
        print("[raydistill] note: sweeps start the Ray dashboard (ray.dashboard=false ignored): Ray Train needs "
              "it to release the workers of trials a scheduler stops", flush=True)
        base_cfg = base_cfg.model_copy(update={"ray": base_cfg.ray.model_copy(update={"dashboard": True})})
    # Schedulers tolerate results without their metric (evaluations are periodic, scores come at the end).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    with display.phase("starting Ray"):
        init_ray(base_cfg)
    board = start_board(base_cfg.monitoring.metrics)
    display.attach(board)
    # Trials tag their series with the sweep's name and their trial id; the shared teacher is trial "teacher".
    monitor = Monitor(run=spec.name, board=board, metrics=base_cfg.monitoring.metrics,
                      peak_flops=base_cfg.monitoring.peak_flops)
    timeout = cluster.resource_timeout(base_cfg.scaling, joined_existing_cluster(base_cfg))
    _check_cluster(sweep, timeout)
    # Train a preset teacher once here, so concurrent trials find it cached instead of racing to train it.
    with display.phase(phases.PREPARING):
        plan = prepare(base_cfg)
    plan = with_teacher(base_cfg, plan, replace(monitor, trial="teacher", key="teacher"))
    directory = sweep.dir
    INTERRUPT.reset(Path(directory) / INTERRUPTED if sweep.is_local else None)
    if sweep.is_local:
        Path(directory).mkdir(parents=True, exist_ok=True)
        if resume_path is None:
            write_text_atomic(Path(directory) / R.SWEEP_FILE, sweep.to_yaml())
    elif resume_path is None:  # object storage: raydistill results/report/--resume read it there
        R.write_bytes_to(directory, R.SWEEP_FILE, sweep.to_yaml().encode())
    trainable = tune.with_resources(tune.with_parameters(trial_driver, sweep=sweep, resource_timeout_s=timeout,
                                                         monitor=monitor), {"CPU": spec.driver_cpus})
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
            trainable, param_space=space, tune_config=tune_config(sweep, concurrency),
            run_config=tune.RunConfig(name=spec.name, storage_path=_storage(spec.storage_path), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      callbacks=[SweepMonitor(sweep, directory), *tracker_callbacks(sweep)]))
    # The teacher's own scores (teacher/bench.json), as a Ray task beside the trials: collected after them.
    teacher_ref = teacher_bench.start(sweep, base_cfg, plan, resume=resume_path is not None)
    filters = [(logging.getLogger("ray.tune.tune"), _QuietTuneInterrupt()),
               (logging.getLogger("ray.tune.execution.tune_controller"), _ExplainedTrialFailures())]
    for logger, quiet in filters:
        logger.addFilter(quiet)
    try:
        grid = tuner.fit()
    finally:
        for logger, quiet in filters:
            logger.removeFilter(quiet)
        if INTERRUPT.marker is not None and INTERRUPT.marker.exists():
            INTERRUPT.marker.unlink()
    if INTERRUPT.event.is_set():
        raise Interrupted(interrupted_summary(sweep, directory, grid))
    if teacher_ref is not None:
        with display.phase(phases.BENCHMARKS, key="teacher"):  # the teacher is scored beside the trials
            teacher_scores = teacher_bench.collect(teacher_ref)
    else:
        teacher_scores = None
    display.close()  # its last state stays on screen; the leaderboard follows it
    out = finish(sweep, directory, grid)
    if plan.teacher_cache is not None:
        from raydistill.train.teacher_cache import sweep_reuse

        rows = sweep_rows(sweep, list(getattr(grid, "_experiment_analysis").trials))
        out["teacher_cache"] = sweep_reuse(base_cfg, plan.teacher_cache, rows)
    if teacher_scores is not None:
        out["teacher"] = teacher_scores
    out["free_cpus"], out["total_cpus"] = _settled_cpus()
    print(f"[raydistill] cluster after the sweep: {out['free_cpus']:g} of {out['total_cpus']:g} CPUs free", flush=True)
    return out


def interrupted_summary(sweep: Sweep, directory: str, grid) -> str:
    """Write the table as the interruption left it; return the message: counts and how to resume."""
    trials = list(getattr(grid, "_experiment_analysis").trials)
    rows = sweep_rows(sweep, trials)
    R.write_table(directory, rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return (f"sweep {sweep.spec.name} interrupted ({states}); finished trials are kept. Resume with: "
            f"raydistill sweep --resume {directory}")


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
