"""Faults without a cluster: non-finite losses, damaged checkpoints, the export's files, what the cluster can hold,
unreachable addresses, orphaned Ray processes, interrupted and resumed sweeps, exit statuses."""

import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raydistill.errors import ConfigError
from raydistill.train import checkpoints, cluster
from raydistill.train.faults import (MAX_CONSECUTIVE_SKIPPED, DivergenceWatch, Interrupted, LossDiverged, NonFiniteGuard,
                                     NonFiniteLoss, RunFailure, clear_failure, failure_message, read_failure, write_failure)


# ----------------------------------------------------------------------------------------------- non-finite loss
def test_a_nonfinite_term_stops_the_run_naming_the_step_and_the_terms():
    guard = NonFiniteGuard()
    assert guard.check(1, {"loss": 3.2, "kd": 1.0, "task": 2.2}, applied=True) is None
    with pytest.raises(NonFiniteLoss) as err:
        guard.check(7, {"loss": math.nan, "kd": math.nan, "task": 2.1, "lm/kd": math.inf}, applied=True,
                    checkpoint_step=5)
    msg = str(err.value)
    assert "step 7" in msg and "kd=nan" in msg and "loss=nan" in msg and "lm/kd=inf" in msg and "task" not in msg
    assert "nothing was exported" in msg and "checkpoint (step 5) is intact" in msg and "train.nonfinite" in msg


def test_skip_policy_counts_steps_deepspeed_skipped_and_stops_on_an_applied_one():
    guard = NonFiniteGuard("skip")
    note = guard.check(3, {"loss": math.inf}, applied=False)
    assert "step 3" in note and "skipped" in note and guard.skipped == 1
    guard.check(4, {"loss": 1.0}, applied=True)
    with pytest.raises(NonFiniteLoss, match="applied the update"):
        guard.check(5, {"loss": math.nan}, applied=True)


def test_every_update_skipped_by_deepspeed_overflow_is_a_failure():
    # fp16 overflow on every step: the loss is finite but DeepSpeed skips every update ("OVERFLOW! Skipping step").
    guard = NonFiniteGuard()
    for step in range(1, 21):
        guard.check(step, {"loss": 2.0}, applied=False)
    with pytest.raises(NonFiniteLoss, match="skipped every one of the 20 updates"):
        guard.check_trained(20)
    long = NonFiniteGuard()
    with pytest.raises(NonFiniteLoss, match=f"skipped the last {MAX_CONSECUTIVE_SKIPPED} updates"):
        for step in range(1, MAX_CONSECUTIVE_SKIPPED + 1):
            long.check(step, {"loss": 2.0}, applied=False)
    ok = NonFiniteGuard()  # a few overflows while the fp16 loss scale settles are normal
    for step in range(1, 10):
        ok.check(step, {"loss": 2.0}, applied=step > 4)
    ok.check_trained(9)


# ------------------------------------------------------------------------------------------- finite divergence
def _feed(watch: DivergenceWatch, losses) -> list[tuple[int, str]]:
    return [(step, note) for step, loss in enumerate(losses, 1) if (note := watch.check(step, loss))]


def test_an_exploding_loss_is_warned_about_once_per_factor_and_named():
    # The run (lr=10, grad_clip=0): 3.3 falling a little, then climbing to thousands.
    losses = [3.3, 3.2, 3.1, 3.0, 2.9, 2.9, 3.5, 8, 30, 120, 500, 2000, 9284, 9000, 9100]
    watch = DivergenceWatch("warn", factor=4.0)
    notes = _feed(watch, losses)
    assert notes and notes[0][0] == watch.diverged_at
    step, first = notes[0]
    # By hand, EMA with weight 0.1: 3.3, 3.29, 3.271, 3.2439, 3.20951 (the start, step 5), 3.179 (the lowest,
    # step 6), 3.211, 3.690, 6.321 (< 4 x 3.179 = 12.7), then 17.69 at step 10.
    assert step == 10 and "diverging at step 10" in first and "lower train.lr or set train.grad_clip" in first
    assert "smoothed 17.69" in first and "above its start (3.21)" in first and "5.56x its lowest (3.179)" in first
    # Repeated only each time the smoothed loss grows another 4x (65.9 < 4 x 17.69; 259.3 >= it), not every step.
    assert [s for s, _ in notes] == [10, 12, 13]
    stop = DivergenceWatch("stop", factor=4.0)
    with pytest.raises(LossDiverged, match="diverging at step 10.*nothing was exported"):
        _feed(stop, losses)
    assert _feed(DivergenceWatch("off"), losses) == []


def test_normal_training_and_noise_near_zero_never_warn():
    gen = torch.Generator().manual_seed(0)
    # A converging loss with 50% multiplicative noise, ending near zero (where ratios are large), and a loss
    # that spikes 3x for a few steps: neither rises above where it started.
    falling = [10 * math.exp(-s / 20) * (1 + 0.5 * float(torch.rand((), generator=gen))) for s in range(400)]
    spiky = [5.0 - s * 0.01 for s in range(100)] + [12.0] * 3 + [4.0] * 50
    for losses in (falling, spiky):
        watch = DivergenceWatch("stop", factor=4.0)
        assert _feed(watch, losses) == [] and watch.diverged_at is None
    # Non-finite values are the NonFiniteGuard's, not this watch's.
    assert DivergenceWatch("stop").check(1, math.nan) is None


def test_a_run_whose_every_update_was_skipped_stays_refused_after_a_resume():
    # DeepSpeed's own counters survive resumes: a rerun that resumes at max_steps still refuses the export.
    with pytest.raises(NonFiniteLoss, match="skipped every one of the 6 updates"):
        NonFiniteGuard().check_trained(6, updates=6, skipped=6)
    NonFiniteGuard().check_trained(6, updates=6, skipped=5)


def test_skipping_nonfinite_steps_is_refused_where_deepspeed_does_not_check_overflow():
    from raydistill.config import load_config
    from raydistill.train.faults import skip_unsupported

    def cfg(*overrides):
        return load_config(None, ["teacher.name=tiny-gpt2", *overrides])

    assert skip_unsupported(cfg("train.nonfinite=skip")) is None
    assert "deepspeed.zero_stage=0" in skip_unsupported(cfg("train.nonfinite=skip", "deepspeed.zero_stage=0"))
    assert skip_unsupported(cfg("train.nonfinite=skip", "train.precision=bf16")) is None  # raydistill turns it on
    assert "check_grad_overflow=False" in skip_unsupported(cfg("train.nonfinite=skip", "train.precision=bf16",
                                                              "deepspeed.extra={bf16: {check_grad_overflow: false}}"))
    assert skip_unsupported(cfg("deepspeed.zero_stage=0")) is None


def test_the_failure_behind_a_ray_train_error_is_one_line():
    from ray.train import WorkerGroupError

    err = WorkerGroupError("long traceback ...", {0: RunFailure("cannot load the teacher weights in /m: bad"),
                                                  1: RuntimeError("collateral")})
    assert failure_message(err) == "cannot load the teacher weights in /m: bad"
    assert failure_message(WorkerGroupError("x", {0: RuntimeError("bug")})) is None
    import pickle

    again = pickle.loads(pickle.dumps(NonFiniteLoss("non-finite loss at step 3")))
    assert type(again) is NonFiniteLoss and again.message == "non-finite loss at step 3"


def test_failure_note_is_read_back_only_by_its_attempt(tmp_path):
    write_failure(tmp_path, "a1", "non-finite loss at step 2")
    assert read_failure(tmp_path, "a1") == "non-finite loss at step 2"
    assert read_failure(tmp_path, "other") is None
    clear_failure(tmp_path)
    assert read_failure(tmp_path, "a1") is None


# ----------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(run: Path, name: str, step: int, world: int = 2) -> Path:
    """A checkpoint folder as Ray Train merges it: each rank's files and manifest."""
    final = run / name
    for rank in range(world):
        tmp = run / f"tmp_{name}_{rank}"
        (tmp / "state").mkdir(parents=True)
        if rank == 0:
            (tmp / "latest").write_text("state")
            (tmp / "state" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096) + bytes([step]))
        (tmp / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(2048))
        checkpoints.write_manifest(tmp, rank, world, step)
        for p in tmp.rglob("*"):
            if p.is_file():
                dst = final / p.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                p.replace(dst)
    return final


def test_manifest_detects_truncated_deleted_corrupt_and_missing_rank_files(tmp_path):
    ckpt = _checkpoint(tmp_path, "checkpoint_a", 10)
    assert checkpoints.inspect(ckpt).intact and checkpoints.inspect(ckpt).step == 10
    model = ckpt / "state" / "mp_rank_00_model_states.pt"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])  # cut in half
    assert "mp_rank_00_model_states.pt has 2048 bytes, 4097 were written" in checkpoints.inspect(ckpt).problem
    model.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    assert "does not match its checksum" in checkpoints.inspect(ckpt).problem
    model.write_bytes(data)
    (ckpt / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in checkpoints.inspect(ckpt).problem
    other = _checkpoint(tmp_path, "checkpoint_b", 20)
    (other / "raydistill_manifest_rank1.json").unlink()  # a rank's upload never arrived
    assert "rank(s) [1] of 2 is missing" in checkpoints.inspect(other).problem


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    old = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01.000000", 5)
    mid = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02.000000", 10)
    new = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-03.000000", 15)
    chosen, rejected = checkpoints.choose(new)
    assert chosen.path == new and not rejected
    model = new / "state" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])
    chosen, rejected = checkpoints.choose(new)
    assert chosen.path == mid and chosen.step == 10 and [r.path for r in rejected] == [new]
    import shutil

    shutil.rmtree(mid)  # a whole checkpoint deleted: the latest Ray knows may not exist at all
    chosen, rejected = checkpoints.choose(mid)
    assert chosen.path == old and rejected[0].problem == "the folder does not exist"
    (old / "latest").unlink()
    chosen, rejected = checkpoints.choose(new)
    assert chosen is None and len(rejected) == 2


def test_a_checkpoint_without_manifest_is_taken_as_it_is(tmp_path):
    legacy = tmp_path / "checkpoint_x"
    (legacy / "state").mkdir(parents=True)
    (legacy / "latest").write_text("state")
    state = checkpoints.inspect(legacy)
    assert state.intact and state.legacy


# ----------------------------------------------------------------------------------------------- files
def test_atomic_writes_leave_no_partial_file_and_the_umask_mode(tmp_path):
    from raydistill.fsutil import write_atomic, write_text_atomic

    target = tmp_path / "sweep.yaml"
    write_text_atomic(target, "a: 1\n")
    with pytest.raises(RuntimeError):
        def broken(p):
            p.write_text("half")
            raise RuntimeError("disk full")
        write_atomic(target, broken)
    assert target.read_text() == "a: 1\n" and [p.name for p in tmp_path.iterdir()] == ["sweep.yaml"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _export_worker(tmp_path: Path, model, tokenizer):
    from raydistill.train.worker import Worker

    worker = Worker.__new__(Worker)
    worker.is_main, worker.rank, worker.world = True, 0, 1
    worker.cfg = SimpleNamespace(deepspeed=SimpleNamespace(zero_stage=2), name="t", data=SimpleNamespace(block_size=32))

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = model

    worker.engine = SimpleNamespace(module=Module())
    worker.plan = SimpleNamespace(export_dir=str(tmp_path / "student"), tokenizer=tokenizer, mode="distill")
    worker._probe = lambda: {"logits": torch.zeros(1)}
    return worker


def test_export_files_share_their_siblings_mode_and_student_never_disappears(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from raydistill.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 20, "bpe", 300)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=32))
    worker = _export_worker(tmp_path, model, tok)
    worker.export(3)
    student = tmp_path / "student"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in student.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~_umask(), modes
    assert stat.S_IMODE((tmp_path / "student_probe.pt").stat().st_mode) == 0o666 & ~_umask()
    assert json.loads((student / "raydistill.json").read_text())["step"] == 3

    gaps, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (student / "config.json").is_file():
                gaps.append(time.monotonic())

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for step in range(4, 10):  # re-exports (a resumed run, a retried trial) replace the student
            worker.export(step)
    finally:
        stop.set()
        reader.join()
    assert not gaps, f"student/ was missing {len(gaps)} times during re-exports"
    assert json.loads((student / "raydistill.json").read_text())["step"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "student_probe.pt"]


# ----------------------------------------------------------------------------------------------- the cluster
def _scaling(**kw):
    base = dict(num_workers=2, use_gpu=False, cpus_per_worker=1, gpus_per_worker=1, resources_per_worker={})
    return SimpleNamespace(**{**base, **kw})


NODE = {"CPU": 2.0, "memory": 8e9, "object_store_memory": 2e9, "node:10.0.0.1": 1.0}


def test_requests_the_cluster_cannot_hold_are_refused_naming_the_field():
    assert cluster.unmet(_scaling(), [NODE]) is None
    msg = cluster.unmet(_scaling(cpus_per_worker=64), [NODE])
    assert msg.startswith("scaling.cpus_per_worker=64:") and "64 CPU" in msg and "1 node: 2 CPUs, no GPU" in msg
    msg = cluster.unmet(_scaling(use_gpu=True), [NODE])
    assert msg.startswith("scaling.use_gpu=true:") and "no GPU" in msg
    msg = cluster.unmet(_scaling(num_workers=3), [NODE])
    assert msg.startswith("scaling.num_workers=3: only 2 workers")
    msg = cluster.unmet(_scaling(resources_per_worker={"TPU": 1}), [NODE])
    assert msg.startswith("scaling.resources_per_worker.TPU=1:")
    # A sweep trial's driver takes a sliver of a CPU: two 1-CPU workers no longer fit 2 CPUs.
    assert cluster.unmet(_scaling(), [NODE], reserved=[{"CPU": 0.01}]).startswith("scaling.num_workers=2")
    two = [NODE, {**NODE, "CPU": 4.0, "GPU": 1.0}]
    assert cluster.workers_that_fit(two, {"CPU": 1.0}, 10) == 6
    assert cluster.workers_that_fit(two, {"CPU": 1.0, "GPU": 1.0}, 10) == 1


def test_waiting_for_an_autoscaling_cluster_is_bounded(monkeypatch):
    monkeypatch.setattr(cluster, "alive_nodes", lambda: [NODE])
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"scaling.cpus_per_worker=64.*waited 0.3 s"):
        cluster.ensure_fits(_scaling(cpus_per_worker=64), timeout_s=0.3)
    assert time.monotonic() - start < 5
    grown = iter([[NODE], [NODE, {"CPU": 64.0}], [NODE, {"CPU": 64.0}]])
    monkeypatch.setattr(cluster, "alive_nodes", lambda: next(grown))
    cluster.ensure_fits(_scaling(cpus_per_worker=64, num_workers=1), timeout_s=30)  # a node joined


def test_an_unreachable_ray_address_fails_within_seconds():
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"ray.address '127.0.0.1:1': cannot connect .*refused"):
        cluster.check_address("127.0.0.1:1")
    assert time.monotonic() - start < 5
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        cluster.check_address(f"127.0.0.1:{server.getsockname()[1]}")  # something listens: Ray takes over
    finally:
        server.close()
    cluster.check_address("auto")


def test_an_unreachable_ray_address_fails_the_command_before_ray_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", "train", "sweeps/configs/debug.yaml",
                           f"output_dir={tmp_path / 'run'}", "ray.address=127.0.0.1:1", "train.max_steps=1",
                           f"cache_dir={tmp_path / 'cache'}", "data.builtin.num_documents=200"],
                          capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ray.address '127.0.0.1:1': cannot connect")
    assert "Traceback" not in proc.stderr


def _spawn(argv0: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # a Ray process holds its session's log files open
    return subprocess.Popen(["bash", "-c", f'exec -a "{argv0}" sleep 120'], env={**os.environ, **(env or {})},
                            stdout=out)


def test_ray_processes_whose_session_has_no_raylet_left_are_found_and_stopped(tmp_path):
    from raydistill.train.cluster import remember_session, remembered_sessions

    remember_session(tmp_path / "cache", "session_2026-01-01_00-00-00_000001_1")
    assert remembered_sessions(tmp_path / "cache") == {"session_2026-01-01_00-00-00_000001_1"}
    dead, live = tmp_path / "session_2026-01-01_00-00-00_000001_1", tmp_path / "session_2026-01-01_00-00-00_000002_2"
    for s in (dead, live):
        (s / "logs").mkdir(parents=True)
    raylet = _spawn(f"/x/ray/core/src/ray/raylet/raylet --raylet_socket_name={live}/sockets/raylet")
    orphan = _spawn("ray::DashboardAgent", log=dead / "logs" / "dashboard_agent.out")
    served = _spawn("ray::RuntimeEnvAgent", log=live / "logs" / "runtime_env_agent.out")
    unrelated = _spawn("ray::Other")  # no session files open: never touched
    try:
        time.sleep(0.5)
        mine = {dead.name, live.name}  # only this test's sessions: other Ray processes here are not its own
        found = cluster.orphaned_ray_processes(mine)
        assert found == [orphan.pid]
        assert cluster.cleanup_orphans(mine) == [orphan.pid]
        assert orphan.wait(timeout=10) in (-signal.SIGTERM, -signal.SIGKILL)
        assert served.poll() is None and unrelated.poll() is None
    finally:
        for p in (raylet, orphan, served, unrelated):
            if p.poll() is None:
                p.kill()
                p.wait()


# ----------------------------------------------------------------------------------------------- sweeps
def _sweep(tmp_path, **spec):
    from raydistill.sweep.spec import load_sweep
    import yaml

    path = tmp_path / "sweep.yaml"
    data = {"name": "s", "base": {"teacher": {"name": "tiny-gpt2"}}, "storage_path": str(tmp_path / "sweeps"),
            "space": {"train.lr": {"grid": [1e-3, 2e-3]}}, "metric": "val/loss", "mode": "min", **spec}
    path.write_text(yaml.safe_dump(data))
    return load_sweep(path)


def test_the_concurrency_limit_is_passed_once_where_it_is_used(tmp_path):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raydistill.sweep.runner import tune_config

    cfg = tune_config(_sweep(tmp_path), 3)
    # Tune warns "max_concurrent_trials requires a Searcher instance ... will be ignored" when both are given.
    assert cfg.max_concurrent_trials is None
    assert isinstance(cfg.search_alg, BasicVariantGenerator) and cfg.search_alg.max_concurrent == 3
    optuna = tune_config(_sweep(tmp_path, space={"train.lr": {"loguniform": [1e-4, 1e-2]}},
                                search={"algorithm": "optuna", "seed": 0}), 3)
    assert optuna.max_concurrent_trials == 3


def _trial(trial_id, status, last=None):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=last or {}, config={}, path="",
                           error_file="")


def test_trials_cut_short_by_an_interrupt_are_interrupted_not_stopped(tmp_path):
    from raydistill.sweep import runner

    sweep = _sweep(tmp_path)
    state = runner._Interrupt()
    state.reset(None)
    stopped = _trial("a", "TERMINATED", {"step": 4})  # stopped by the scheduler before the signal
    done = _trial("b", "TERMINATED", {"finished": 1, "step": 12})
    cut = _trial("c", "TERMINATED", {"step": 6})  # stopped by Tune's cleanup after the signal
    running, pending = _trial("d", "RUNNING"), _trial("e", "PENDING")
    state.ended = {"a", "b"}
    state.event.set()
    from raydistill.sweep import results as R

    statuses = [state.status(t, R.trial_row(sweep, t)["status"]) for t in (stopped, done, cut, running, pending)]
    assert statuses == ["stopped", "finished", "interrupted", "interrupted", "pending"]


def test_a_trial_whose_end_event_was_written_is_finished_and_never_runs_again(tmp_path, monkeypatch):
    import ray.tune

    from raydistill.sweep import results as R
    from raydistill.sweep import trial as T

    sweep = _sweep(tmp_path)
    trial_dir = Path(sweep.dir) / "trial_t1"
    trial_dir.mkdir(parents=True)
    saved = {"val/loss": 2.5, "step": 12, "finished": 1, "export_dir": str(trial_dir / "student")}
    (trial_dir / T.FINAL_RESULT).write_text(json.dumps(saved))
    T._log(trial_dir, "start", trial_id="t1")
    T._log(trial_dir, "end")
    # The driver was killed right after: Tune's saved state still says RUNNING, its last result has no 'finished'.
    assert R.trial_row(sweep, _trial("t1", "RUNNING", {"step": 8}))["status"] == "finished"

    reports = []
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_dir=lambda: str(trial_dir),
                                                                       get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "report", reports.append)
    import raydistill.train.launcher as launcher

    monkeypatch.setattr(launcher, "fit", lambda *a, **k: pytest.fail("a finished trial ran again"))
    T.trial_driver({"train.lr": 1e-3}, sweep)
    assert reports == [saved]
    assert [e["event"] for e in T.events(trial_dir)] == ["start", "end", "restored"]


def test_a_trial_started_after_the_interrupt_does_no_work(tmp_path, monkeypatch):
    from raydistill.sweep import trial as T

    sweep = _sweep(tmp_path)
    Path(sweep.dir).mkdir(parents=True)
    (Path(sweep.dir) / T.INTERRUPTED).touch()
    monkeypatch.setattr(T, "INTERRUPT_WAIT_S", 0.5)
    with pytest.raises(RuntimeError, match="interrupted before this trial started"):
        T._wait_if_interrupted(sweep)


# ----------------------------------------------------------------------------------------------- exit statuses
@pytest.mark.parametrize("raised, code", [(Interrupted("interrupted after step 3; rerun"), 130),
                                          (RunFailure("non-finite loss at step 2"), 1),
                                          (ConfigError("train.lr: bad"), 2), ("sigint", 130)])
def test_exit_status_says_what_happened(monkeypatch, capsys, raised, code):
    from raydistill import cli
    import raydistill.train.launcher as launcher

    def run(cfg, mode="distill"):
        if raised == "sigint":  # Ctrl-C outside raydistill's own handling (click reports "Aborted!")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        raise raised

    monkeypatch.setattr(launcher, "run", run)
    monkeypatch.setattr(sys, "argv", ["raydistill", "train", "sweeps/configs/debug.yaml"])
    previous = signal.getsignal(signal.SIGINT)
    cli._SIGINT.clear()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert exit_.value.code == code
    if raised != "sigint":
        err = capsys.readouterr().err.strip()
        assert err == (str(raised) if code == 130 else f"error: {raised}")


def test_a_weight_file_that_does_not_load_on_a_worker_is_one_line_naming_it(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from raydistill.train.worker import Worker

    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "teacher")
    weights = tmp_path / "teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])  # cut short after the driver's checks
    with pytest.raises(RunFailure) as err:
        Worker._load("teacher", config, str(tmp_path / "teacher"), None)
    msg = err.value.message
    assert msg.startswith(f"cannot load the teacher weights in {tmp_path / 'teacher'} (model.safetensors):")
    assert "\n" not in msg


def test_an_agreed_failure_ends_the_workers_cleanly_with_a_note_for_the_driver(tmp_path):
    from raydistill.train.worker import Worker

    worker = Worker.__new__(Worker)
    worker.is_main, worker.output_dir, worker.attempt = True, tmp_path, "a7"

    def fail():
        raise NonFiniteLoss("non-finite loss at step 4: loss=nan")

    worker._run = fail
    worker.run()  # returns: Ray Train neither retries nor prints a traceback
    assert read_failure(tmp_path, "a7") == "non-finite loss at step 4: loss=nan"


def test_a_trial_failure_raydistill_explains_loses_tunes_traceback_and_no_other_does():
    """Tune logs each failed trial with its task's traceback. For a raydistill error (raised on the trial driver,
    it reaches Tune as Ray's RayTaskError subclass of it) the one-line reason printed by the sweep replaces it;
    an unexpected error keeps its traceback."""
    import logging

    import ray.exceptions

    from raydistill.errors import ConfigError
    from raydistill.sweep.runner import _ExplainedTrialFailures
    from raydistill.train.launcher import TrainingFailed

    def record(error: BaseException, msg: str = "Trial task failed for trial trial_1") -> logging.LogRecord:
        return logging.LogRecord("ray.tune.execution.tune_controller", logging.ERROR, __file__, 1, msg, None,
                                 (type(error), error, None))

    def from_task(error: BaseException) -> BaseException:
        try:
            raise error
        except type(error) as e:
            return ray.exceptions.RayTaskError("trial_driver", "traceback text", e).as_instanceof_cause()

    explained = from_task(ConfigError("objectives.kd.temperature: Input should be greater than 0 (got -1.0)"))
    assert isinstance(explained, ray.exceptions.RayTaskError) and isinstance(explained, ConfigError)
    keep = _ExplainedTrialFailures().filter
    assert not keep(record(explained))
    assert not keep(record(from_task(TrainingFailed("non-finite loss at step 1: kd=nan"))))
    assert keep(record(from_task(ValueError("a bug"))))
    assert keep(record(explained, "Trial trial_1 errored after 3 iterations"))
