"""Driver: start or join Ray, pretrain a teacher if asked (cached), and fit a TorchTrainer."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from raydistill.config import ExperimentConfig, TrainSpec, dump_config
from raydistill.errors import ConfigError
from raydistill.fsutil import write_text_atomic
from raydistill.monitoring import board as phases
from raydistill.monitoring.board import Monitor
from raydistill.train import checkpoints, cluster
from raydistill.train.faults import (Interrupted, RunFailure, clear_failure, failure_message, read_failure,
                                     skip_unsupported)
from raydistill.train.plan import Mode, RunPlan, prepare, pretrained_teacher_dir
from raydistill.train.progress import wait_for_writers

WRITER_EXIT_TIMEOUT_S = 10.0  # after SIGINT: how long the killed workers may take to exit
RAY_INIT_TIMEOUT_S = 60.0  # a reachable port that is not a Ray head: Ray would retry for minutes
STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"  # Ray Train's run view in the dashboard (off in Ray by default)
_USER_STATE_TRACKING = os.environ.get(STATE_TRACKING)  # read once: later runs in this process set it per run
# Ray Train's preemption watcher: an actor per run polling for cloud nodes being drained (on in Ray by default).
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_USER_PREEMPTION_WATCHER = os.environ.get(PREEMPTION_WATCHER)
HEALTH_CHECK = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_USER_HEALTH_CHECK = os.environ.get(HEALTH_CHECK)
# Ray Train's controller notices that the workers finished only when it polls them: at Ray's 2 s a tiny run
# returned 2-4 s after its export, at 0.5 s within a second (2-worker run on 2 cores). A poll costs the
# controller ~3 ms of CPU, so 0.5 s is ~0.5% of one core.
DEFAULT_HEALTH_CHECK_S = 0.5
ARENA_MAX = "MALLOC_ARENA_MAX"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's processes find the state API (the dashboard's)


class TrainingFailed(RunFailure):
    """Training did not complete (exit status 1); the message says why and what to do."""


def state_api_served(cfg: ExperimentConfig) -> bool:
    """Whether the run's cluster may serve Ray's state API (the dashboard does): not a local cluster raydistill
    started with ``ray.dashboard=false``. A sweep starts the dashboard whatever its trials' configs say; its
    trials know from ``RAY_API_SERVER_ADDRESS``, which raydistill then sets for the cluster's processes."""
    return cfg.ray.dashboard or joined_existing_cluster(cfg) or API_SERVER_ENV in os.environ


def state_tracking(cfg: ExperimentConfig) -> str:
    """The user's choice if they made one, else Ray Train's run view only where a dashboard can show it: on a
    local cluster started with ``ray.dashboard=false`` its state actor would only log failed connections."""
    if _USER_STATE_TRACKING is not None:
        return _USER_STATE_TRACKING
    return "0" if not joined_existing_cluster(cfg) and not cfg.ray.dashboard else "1"


def preemption_watcher(cfg: ExperimentConfig) -> str:
    """The user's choice if they made one, else Ray Train's preemption watcher only on a cluster raydistill joins:
    the local cluster it starts has no cloud nodes to drain, and the watcher would be one more process polling
    beside the workers on the same cores."""
    if _USER_PREEMPTION_WATCHER is not None:
        return _USER_PREEMPTION_WATCHER
    return "1" if joined_existing_cluster(cfg) else "0"


def health_check_interval(cfg: ExperimentConfig) -> str:
    """``ray.health_check_interval_s`` if set, else the user's RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, else 0.5 s."""
    if cfg.ray.health_check_interval_s is not None:
        return f"{cfg.ray.health_check_interval_s:g}"
    return _USER_HEALTH_CHECK if _USER_HEALTH_CHECK is not None else f"{DEFAULT_HEALTH_CHECK_S:g}"


def ray_train_switches(cfg: ExperimentConfig) -> dict[str, str]:
    """Ray Train's feature switches for this run, read where its controller is built (the driver, or the trial
    actors of a sweep)."""
    return {STATE_TRACKING: state_tracking(cfg), PREEMPTION_WATCHER: preemption_watcher(cfg),
            HEALTH_CHECK: health_check_interval(cfg)}


def worker_env(cfg: ExperimentConfig) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1",
           # Progress lines go straight to stdout; the print patch would log each twice.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           # Sweep trials build their trainers on the cluster: they need Ray Train's switches too.
           **ray_train_switches(cfg)}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed then uses gloo and its CPU accelerator
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.scaling.cpus_per_worker)))
    if cfg.scaling.keep_freed_host_memory and ARENA_MAX not in os.environ:
        # Ray Train runs the training loop in a thread, and glibc gives threads their own arenas, whose large
        # blocks are mmap'd and unmapped whatever mallopt says: one arena keeps them in the heap that
        # keep_freed_host_memory governs. Read by glibc at process start, so it goes in the workers' env.
        env[ARENA_MAX] = "1"
    return env


def joined_existing_cluster(cfg: ExperimentConfig) -> bool:
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def _watchdog(seconds: float, message: str) -> threading.Timer:
    """Exit with ``message`` (status 2) if not cancelled within ``seconds``: ray.init can block in native code."""
    def fire():
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def init_ray(cfg: ExperimentConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.update(ray_train_switches(cfg))  # the driver creates Ray Train's controller
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(runtime_env={"env_vars": worker_env(cfg)}, log_to_driver=cfg.ray.log_to_driver)
    if address is None:
        kwargs.update(include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1")
        if cfg.ray.dashboard:
            # Ray's processes find the State API (which Ray Train's placement-group cleaner needs to free a stopped
            # trial's workers) by looking for "the" local Ray instance; with several on the machine that fails
            # and a stopped trial's workers are never freed. Tell them where this cluster's dashboard is.
            port = _free_port()
            kwargs["dashboard_port"] = port
            kwargs["runtime_env"]["env_vars"][API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        # A driver killed with SIGKILL leaves its local cluster's agents running for a minute or two: stop those
        # of the sessions raydistill started (recorded in the cache directory) whose raylet and GCS are gone.
        stopped = cluster.cleanup_orphans(cluster.remembered_sessions(cfg.cache_dir))
        if stopped:
            print(f"[raydistill] stopped {len(stopped)} Ray processes left by a killed run (their raylet was gone): "
                  f"{stopped}", flush=True)
    else:
        cluster.check_address(address)  # a refused or silent address fails in seconds, not after minutes
    timer = _watchdog(RAY_INIT_TIMEOUT_S, f"ray.address {address!r}: no Ray cluster answered within "
                      f"{RAY_INIT_TIMEOUT_S:g} s; allowed: the address of a running Ray cluster's head") if address \
        else None
    try:
        ctx = ray.init(address=address, **kwargs)
    finally:
        if timer is not None:
            timer.cancel()
    if address is None:
        try:
            session = Path(ray._private.worker._global_node.get_session_dir_path()).name
        except Exception:  # noqa: BLE001 - private API: without it, orphans are left to exit by themselves
            session = None
        if session:
            cluster.remember_session(cfg.cache_dir, session)
            if cfg.ray.dashboard and cfg.monitoring.metrics:  # raydistill's panels in Ray's Grafana config
                from raydistill.monitoring.grafana import install_when_ready

                install_when_ready(ray._private.worker._global_node.get_session_dir_path())
    url = getattr(ctx, "dashboard_url", None)
    if url:
        print(dashboard_lines(url, local=address is None), flush=True)
        if "dashboard_port" in kwargs and not url.endswith(f":{kwargs['dashboard_port']}"):
            print(f"[raydistill] note: the dashboard took another port than {kwargs['dashboard_port']}; with "
                  "several Ray clusters on this machine, a trial a scheduler stops may keep its workers", flush=True)
    if cfg.monitoring.metrics:
        from raydistill.monitoring.metrics import metrics_endpoint

        endpoint = metrics_endpoint()
        print(f"[raydistill] metrics: Prometheus series ray_raydistill_*"
              + (f" at {endpoint} (this node; every node exports its own)" if endpoint else "")
              + "; `raydistill dashboard` explains the Grafana panels", flush=True)


def dashboard_lines(url: str, local: bool) -> str:
    """The dashboard's URL, how to log in (token authentication stays on) and, for a dashboard bound to this
    machine, how to reach it from another one without opening it to the network."""
    import socket

    host, _, port = url.rpartition(":")
    lines = [f"[raydistill] Ray dashboard: http://{url}"]
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        lines.append("[raydistill] dashboard login: the cluster's token, printed by `ray get-auth-token` on its head "
                     "node (stored in ~/.ray/auth_token)")
    if local and host in ("127.0.0.1", "localhost"):
        lines.append(f"[raydistill] from a laptop: ssh -N -L {port}:127.0.0.1:{port} {socket.gethostname()}, then "
                     f"open http://localhost:{port}")
    return "\n".join(lines)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_TRAINER_CLASS = None


def _trainer_class():
    """TorchTrainer whose ``fit`` leaves SIGINT to raydistill. Ray Train's own handler asks the controller to
    abort "gracefully", and the workers train on for several steps meanwhile; raydistill stops them at once."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        from ray.train.torch import TorchTrainer

        class Trainer(TorchTrainer):
            controller = None
            placement_group_cleaner = True

            def _register_sigint_handler(self, controller):  # noqa: D401 - Ray Train hook, called in fit()
                self.controller = controller

            def _create_default_callbacks(self):  # Ray Train hook, called in fit()
                # Two of Ray Train's callbacks start an actor per run (a process importing Ray Train and Ray Data,
                # ~1.5 s of a core, then waking ~100 times a second beside the workers) that has nothing to do:
                # - the datasets callback's dataset manager, started even when the trainer has no Ray Datasets
                #   (raydistill ships its packed corpus through the object store);
                # - the placement-group cleaner, which asks the state API every second whether the controller is
                #   alive, to free the workers' placement group when it is not (a trial a scheduler stops). The
                #   dashboard serves that API: without one each question fails, so the cleaner can never act, and
                #   it logs a warning every second.
                unused = set() if self.datasets else {"DatasetsCallback"}
                if not self.placement_group_cleaner:
                    unused.add("PlacementGroupCleanerCallback")
                return [c for c in super()._create_default_callbacks() if type(c).__name__ not in unused]

        _TRAINER_CLASS = Trainer
    return _TRAINER_CLASS


def _stop_controller(trainer) -> None:
    """Kill the run's controller; its workers, which it owns, go with it."""
    import ray

    controller = getattr(trainer, "controller", None)
    if controller is not None:
        try:
            ray.kill(controller, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _last_logged_step(out: Path) -> int | None:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, IndexError):
        return None


def latest_checkpoint_step(run_storage: Path) -> int | None:
    """The newest step a complete-looking checkpoint of the run holds (from the manifests; not verified)."""
    steps = [checkpoints.manifest_step(p) for p in run_storage.glob(f"{checkpoints.CHECKPOINT_PREFIX}*")
             if p.is_dir()] if run_storage.is_dir() else []
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None


def fit(plan: RunPlan, callbacks: list | None = None, storage_path: str | None = None,
        resource_timeout_s: float | None = None, reserved: list[dict[str, float]] = (),
        monitor: Monitor | None = None) -> dict:
    """Run the plan on Ray Train; return a summary with the final metrics (those of the last checkpoint).

    ``callbacks`` are Ray Train callbacks (a sweep forwards reports to Tune with one); ``storage_path`` is
    where Ray keeps checkpoints (default OUTPUT_DIR/ray; s3:// and gs:// pass through). ``resource_timeout_s``
    overrides how long to wait for the cluster to offer the workers' resources; ``reserved`` are bundles
    placed besides the workers (a sweep trial's driver); ``monitor`` tags the workers' metrics and carries the
    progress board they post to (default: the run's name, no board).

    Raises ``TrainingFailed`` (one message: a non-finite loss, a file that does not load, a worker error) and
    ``Interrupted`` (SIGINT: the workers are stopped at once)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from raydistill.train.entry import train_loop_per_worker

    cfg = plan.cfg
    if skip_unsupported(cfg):
        raise ConfigError(skip_unsupported(cfg))
    for note in plan.notes:
        print(f"[raydistill] note: {note}", flush=True)
    out = Path(plan.output_dir)
    # Refuse what the cluster cannot hold before Ray Train starts retrying to place the workers forever.
    timeout = resource_timeout_s if resource_timeout_s is not None else cluster.resource_timeout(
        cfg.scaling, joined_existing_cluster(cfg))
    cluster.ensure_fits(cfg.scaling, timeout, reserved=list(reserved),
                        what="the teacher's pretraining" if plan.mode == "teacher" else "the run")
    write_text_atomic(out / ("config.yaml" if plan.mode == "distill" else "teacher_config.yaml"), dump_config(cfg))
    if plan.blocks is not None:  # ship the packed corpus through the object store (works across nodes)
        plan.blocks_ref = ray.put(plan.blocks)
        plan.blocks = None
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {}),
                 **s.resources_per_worker}
    name = cfg.name if plan.mode == "distill" else f"{cfg.name}-teacher"
    run_storage = Path(storage_path or str(out / "ray")) / name
    attempt = uuid.uuid4().hex  # tags the reason the workers leave if they stop early
    monitor = monitor or Monitor(run=cfg.name, metrics=cfg.monitoring.metrics, peak_flops=cfg.monitoring.peak_flops)
    if plan.mode == "teacher":
        monitor = monitor.for_teacher()
    monitor.post(phase=phases.STARTING)
    clear_failure(out)
    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config={"plan": ray.put(plan), "attempt": attempt, "monitor": monitor},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path or str(out / "ray"), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             # Two at least: a damaged newest checkpoint leaves an intact one to resume from.
                             checkpoint_config=CheckpointConfig(num_to_keep=max(2, cfg.train.keep_checkpoints))))
    trainer.placement_group_cleaner = state_api_served(cfg)
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        _stop_controller(trainer)
        # The kill reaches the workers asynchronously: let rank 0 die before naming the last step it logged.
        wait_for_writers(out / "metrics.jsonl", WRITER_EXIT_TIMEOUT_S)
        step, ckpt = _last_logged_step(out), latest_checkpoint_step(run_storage)
        raise Interrupted(
            f"interrupted{f' after step {step}' if step else ''}; the workers were stopped. Rerun the same command "
            f"(same name and output_dir) to resume from "
            + (f"the latest checkpoint (step {ckpt})" if ckpt else "the start (no checkpoint was written yet)")
            + f" under {run_storage}") from None
    except Exception as e:  # Ray wraps worker errors; show the cause, keep the run resumable
        message = failure_message(e) or read_failure(out, attempt)
        if message:
            raise TrainingFailed(message) from None
        raise TrainingFailed(f"training failed: {e}\nrerun the same command to resume from the latest "
                             f"checkpoint under {run_storage}") from None
    message = read_failure(out, attempt)
    if message:
        raise TrainingFailed(message)
    metrics = dict(result.metrics or {})
    if metrics.get("step") is not None and metrics["step"] < cfg.train.max_steps:
        raise TrainingFailed(f"training ended at step {metrics['step']} of {cfg.train.max_steps} without an export "
                             "(the workers stopped early; see the log above)")
    summary = {"mode": plan.mode, "name": cfg.name, "export_dir": plan.export_dir,
               "wall_time_s": round(time.perf_counter() - start, 2), "final_metrics": metrics}
    write_text_atomic(out / ("summary.json" if plan.mode == "distill" else "teacher_summary.json"),
                      json.dumps(summary, indent=2))
    return summary


def ensure_teacher(cfg: ExperimentConfig, plan: RunPlan, monitor: Monitor | None = None) -> str | None:
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
    fit(prepare(teacher_cfg, mode="teacher"), monitor=monitor)
    if monitor is not None:
        monitor.for_teacher().post(phase=phases.DONE)
    return str(model_dir)


def with_teacher(cfg: ExperimentConfig, plan: RunPlan, monitor: Monitor | None = None) -> RunPlan:
    """Point a distillation plan at its pretrained teacher (training it first if it is not cached), then at its
    teacher cache (filling what the run needs first) when ``teacher_cache`` is set."""
    from raydistill.train import teacher_cache

    if plan.mode == "distill":
        teacher_dir = ensure_teacher(cfg, plan, monitor)
        if teacher_dir is not None:
            plan.teacher_source = teacher_dir
            plan.notes = [n for n in plan.notes if "randomly initialised" not in n]
        plan = teacher_cache.attach(cfg, plan, monitor)
    return plan


def run(cfg: ExperimentConfig, mode: Mode = "distill") -> dict:
    """Everything ``raydistill train`` / ``raydistill teacher`` does. All validation precedes ``ray.init``."""
    from raydistill.monitoring.terminal import Display

    with Display(cfg.monitoring.progress) as display:
        with display.phase(phases.PREPARING):
            plan = prepare(cfg, mode=mode)
        return _run(cfg, plan, display)


def _run(cfg: ExperimentConfig, plan: RunPlan, display) -> dict:
    import ray

    from raydistill.monitoring.board import start_board

    if skip_unsupported(cfg):
        raise ConfigError(skip_unsupported(cfg))
    owned = not ray.is_initialized()
    try:
        with display.phase("starting Ray"):
            init_ray(cfg)
        board = start_board(cfg.monitoring.metrics)
        display.attach(board)
        monitor = Monitor(run=cfg.name, board=board, metrics=cfg.monitoring.metrics,
                          peak_flops=cfg.monitoring.peak_flops)
        summary = fit(with_teacher(cfg, plan, monitor), monitor=monitor)
        monitor.post(phase=phases.DONE)
        return summary
    except KeyboardInterrupt:  # outside a fit (starting Ray): nothing to stop yet
        display.close()  # no poll of the board while Ray shuts down
        _shutdown(owned)
        raise Interrupted("interrupted before training started; rerun the same command to start") from None
    except (RunFailure, Interrupted):
        display.close()
        _shutdown(owned)  # now, not at exit: Ray's last buffered log lines come before the message, not after it
        raise


def _shutdown(owned: bool) -> None:
    import ray

    if owned and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
