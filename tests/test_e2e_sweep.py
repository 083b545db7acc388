"""Sweeps end to end on a real local Ray cluster: Tune drivers fitting TorchTrainers with DeepSpeed workers.

- ASHA stops a weak trial early, the sweep finishes and no CPU stays reserved.
- A sweep interrupted with SIGINT, then killed with SIGKILL, then resumed: no trial starts after the signal,
  cut-short trials are "interrupted", exit 130 with ``raydistill sweep --resume``; no finished trial ever runs
  again; a trial with a value the config refuses and one whose loss goes NaN fail with their reasons while the
  sweep goes on; the sweep's pretrained teacher is scored once (teacher/bench.json, reused by the resume when
  written) and the report shows its row."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_e2e_faults import wait_for

pytestmark = pytest.mark.e2e

BASE = {
    "teacher": {"name": "tiny-gpt2"},  # random preset: no pretraining cost, still a real distillation run
    "student": {"num_layers": 1},
    "tokenizer": {"vocab_size": 512},
    "data": {"builtin": {"num_documents": 400}, "block_size": 32},
    "objectives": {"task": {"weight": 1.0}, "kd": {"weight": 1.0}},
    "train": {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0, "lr_schedule": "constant",
              "log_every": 4, "eval_every": 4, "eval_batches": 1},
    "scaling": {"num_workers": 1},
    "ray": {"dashboard": False, "log_to_driver": False},
}


def sweep_file(tmp_path: Path, cache_dir: str, **spec) -> Path:
    base = {**BASE, "cache_dir": cache_dir}
    data = {"name": "s", "base": base, "storage_path": str(tmp_path / "sweeps"), "max_concurrent_trials": 1,
            "status_every_s": 1000, **spec}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "raydistill.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def table(directory: Path) -> pd.DataFrame:
    path = directory / "results.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame({"status": [], "trial": []})


def events(directory: Path) -> dict[str, list[dict]]:
    return {p.parent.name: [json.loads(x) for x in p.read_text().splitlines()]
            for p in directory.glob("trial_*/trial.jsonl")}


def starts(trial_dir: Path) -> int:
    return sum(json.loads(ln)["event"] == "start" for ln in (trial_dir / "trial.jsonl").read_text().splitlines())


def test_asha_stops_a_weak_trial_and_the_sweep_frees_its_resources(tmp_path, cache_dir, s3_server):
    # Grid order is fixed and trials run one at a time. The first passes the first rung (nothing to compare
    # with); the second (lr ~ 0) is behind it and is stopped there; the third must still get its worker
    # (a stopped trial that kept its resources would block it) and, learning fastest, finishes.
    # The sweep's storage is S3 (moto's server in this process): Tune's state, checkpoints and raydistill's
    # results, best config, best student and each trial's metrics and TensorBoard events all go there.
    import pyarrow.fs as pafs

    from raydistill.sweep import results as R

    storage = f"s3://bucket/sweeps?{s3_server}"
    path = sweep_file(tmp_path, cache_dir, space={"train.lr": {"grid": [3e-4, 1e-9, 3e-3]}},
                      scheduler={"kind": "asha", "grace_period": 4, "reduction_factor": 3},
                      metric="val/loss", mode="min", eval={"tasks": None}, storage_path=storage,
                      callbacks={"mlflow": {"tracking_uri": (tmp_path / "mlruns").as_uri(), "experiment": "asha"}})
    out = finish(cli("sweep", str(path)))
    directory = R.uri_join(storage, "s")
    frame = R.read_table(directory)
    status = dict(zip(frame["config/train.lr"], frame["status"]))
    assert status == {3e-4: "finished", 1e-9: "stopped", 3e-3: "finished"}, (frame.to_dict("records"), out[-3000:])
    assert frame.loc[frame["status"] == "stopped", "step"].item() < 12
    free = re.search(r"cluster after the sweep: (\S+) of (\S+) CPUs free", out)
    assert free and free.group(1) == free.group(2), out[-2000:]  # nothing stays reserved
    s3, root = pafs.FileSystem.from_uri(directory)
    stored = {info.path[len(root) + 1:] for info in s3.get_file_info(pafs.FileSelector(root, recursive=True))}
    assert {"results.parquet", "results.csv", "best_config.yaml", "best_student/config.json"} <= stored, sorted(stored)
    assert not (tmp_path / "sweeps").exists()  # nothing of the sweep's outputs landed on the local disk
    # Trackers: Tune's MLflow logger made one run per trial with its swept value and reported metrics; each
    # trial also has TensorBoard events per logged step (tensorboard/) and Tune's own per report.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id])
    assert len(runs) == 3, out[-3000:]
    assert {float(r.data.params["train.lr"]) for r in runs} == {3e-4, 1e-9, 3e-3}
    assert all("val/loss" in r.data.metrics and r.data.tags["sweep"] == "s" for r in runs)
    assert {r.info.status for r in runs} == {"FINISHED"}
    best = min(runs, key=lambda r: r.data.metrics["val/loss"])
    assert float(best.data.params["train.lr"]) == frame.loc[frame["val/loss"].idxmin(), "config/train.lr"]
    trials = {p.split("/")[0] for p in stored if p.startswith("trial_")}
    assert len(trials) == 3, sorted(stored)
    for trial in trials:
        mine = [p for p in stored if p.startswith(trial + "/")]
        assert f"{trial}/metrics.jsonl" in mine, mine
        assert any(p.startswith(f"{trial}/tensorboard/events.out.tfevents.") for p in mine), mine
        assert any(p.startswith(f"{trial}/events.out.tfevents.") for p in mine), mine
    # A report of the sweep rebuilt without its results table (from the trial folders and Tune's experiment
    # state) still tells the trial ASHA stopped from one still running.
    from raydistill.report.sweepdata import load_sweep

    for name in ("results.csv", "results.parquet"):
        s3.delete_file(f"{root}/{name}")
    rebuilt = load_sweep(directory).table
    assert dict(zip(rebuilt["config/train.lr"], rebuilt["status"])) == status, rebuilt.to_dict("records")


def test_failed_trials_are_reported_and_an_interrupted_then_killed_sweep_never_reruns_a_finished_trial(
        tmp_path, cache_dir):
    # Four trials in grid order, one at a time: two good ones, one whose kd temperature the config refuses, one
    # whose kd loss is NaN. The sweep is interrupted (SIGINT) once the first has finished, resumed and killed
    # (SIGKILL) once the second has, then resumed to the end. The teacher is pretrained briefly (cached), so the
    # sweep also scores it once (eval.teacher, on by default).
    path = sweep_file(tmp_path, cache_dir, space={"objectives.kd.temperature": {"grid": [2.0, 1.0, -1.0, 1.0e20]}},
                      set={"teacher.pretrain": {"max_steps": 8, "lr": 3e-3, "batch_size": 8}},
                      metric="bench/builtin-ppl/perplexity", mode="min",
                      eval={"tasks": ["builtin-ppl"], "settings": {"builtin_eval_examples": 50}})
    directory = tmp_path / "sweeps" / "s"
    finished = lambda n: lambda: (table(directory)["status"] == "finished").sum() >= n  # noqa: E731

    # 1. SIGINT once the first trial has finished: exit 130, no trial starts after the signal.
    proc = cli("sweep", str(path))
    wait_for(finished(1), proc, 400, "a finished trial")
    signalled = time.time()
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, out[-3000:]
    assert f"Resume with: raydistill sweep --resume {directory}" in out and "Tuner.restore" not in out, out[-3000:]
    assert "max_concurrent_trials requires a Searcher" not in out
    frame = table(directory)
    assert set(frame["status"]) <= {"finished", "interrupted", "pending"}, frame.to_dict("records")
    assert (frame["status"] == "finished").sum() == 1
    assert all(e["time"] < signalled for evs in events(directory).values() for e in evs if e["event"] == "start")

    # 2. Resume; SIGKILL the driver once the second trial has finished (its row and end event written).
    proc = cli("sweep", "--resume", str(directory))
    wait_for(finished(2), proc, 400, "the second finished trial")
    proc.kill()
    proc.communicate(timeout=60)
    teacher_bench = directory / "teacher" / "bench.json"
    scored_before = teacher_bench.read_bytes() if teacher_bench.is_file() else None

    # 3. Resume to the end: the refused and the NaN trial fail with their reasons, the sweep ends normally.
    out = finish(cli("sweep", "--resume", str(directory)), timeout=600)
    frame = table(directory).set_index("config/objectives.kd.temperature")
    assert frame.loc[2.0, "status"] == "finished" and frame.loc[1.0, "status"] == "finished", out[-3000:]
    assert frame.loc[-1.0, "status"] == "failed" and "objectives.kd.temperature" in frame.loc[-1.0, "error"]
    assert frame.loc[1e20, "status"] == "failed"
    assert "non-finite loss at step 1: kd=nan" in frame.loc[1e20, "error"], frame.loc[1e20, "error"]
    # Each failure is one line on the terminal, not Tune's traceback of the trial's task.
    assert re.search(r"\[raydistill\] trial \S+ failed: .*objectives\.kd\.temperature", out), out[-3000:]
    assert re.search(r"\[raydistill\] trial \S+ failed: .*non-finite loss at step 1: kd=nan", out), out[-3000:]
    assert "Trial task failed" not in out and "Traceback" not in out, out[-3000:]
    for value in (2.0, 1.0):  # never run twice: one start each, the resumes only restored them
        assert starts(directory / f"trial_{frame.loc[value, 'trial']}") == 1
        # its runtime is its own run's (a Ray Train run and its scoring), not the restoring session's few seconds
        assert frame.loc[value, "runtime_s"] > 10, frame.to_dict("records")
    assert frame["bench/builtin-ppl/perplexity"].notna().sum() == 2
    assert not (directory / ".interrupted").exists()
    # The teacher was scored once on the same task, in the trials' bench.json format; a resume reuses the scores
    # when the interrupted sweep had written them (else it scores the teacher then).
    teacher = json.loads(teacher_bench.read_text())
    assert [(r["task"], r["metric"]) for r in teacher["summary"]] == [("builtin-ppl", "perplexity")], out[-3000:]
    if scored_before is not None:
        assert "teacher scores: reusing" in out and teacher_bench.read_bytes() == scored_before, out[-3000:]
    else:
        assert "[raydistill] teacher scores (" in out, out[-3000:]
    # The outputs a user reads: leaderboard, best config (runnable) and best student.
    assert "sweep s: bench/builtin-ppl/perplexity (min)" in out
    from raydistill.config import load_config

    best = load_config(directory / "best_config.yaml")
    assert best.objectives.kd.temperature in (2.0, 1.0)
    assert (directory / "best_student" / "config.json").is_file()
    board = subprocess.run([sys.executable, "-m", "raydistill.cli", "results", str(directory)], capture_output=True,
                           text=True, timeout=120)
    assert board.returncode == 0 and board.stdout.splitlines()[3].split()[2] == "finished", board.stdout
    records = json.loads(subprocess.run([sys.executable, "-m", "raydistill.cli", "results", str(directory), "--json"],
                                        capture_output=True, text=True, timeout=120, check=True).stdout)
    assert [r["status"] for r in records][-2:] == ["failed", "failed"] and len(records) == 4
    assert records[0]["bench/builtin-ppl/perplexity"] <= records[1]["bench/builtin-ppl/perplexity"]
    # raydistill report on this real sweep: every section, valid PNG figures, HTML that parses and opens offline
    # (rendered in headless Chromium where installed), under 30 s (checks in tests/test_report.py).
    from test_report import check_report_of_sweep

    report = check_report_of_sweep(directory, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "4 trials (2 failed, 2 finished)" in md and "![" in md, report["stdout"]
    assert "| teacher" in md and "no teacher/bench.json" not in md, md[:3000]  # the teacher row
