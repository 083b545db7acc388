"""Experiment trackers and sweep results on object storage (issue 14): TensorBoard event files written by the
progress logger, the sweep file's ``callbacks:`` section, results tables / best config / best student written
to and read from storage URIs (file:// and, when moto is installed, an in-process S3 server)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from raydistill.train.progress import TENSORBOARD_DIR, ProgressPrinter, wait_for_writers


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file under ``logdir`` (TFRecord framing: length, crc, data, crc), as
    TensorBoard reads them: a session start with a step (purge_step) drops the earlier events from that step on."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                out = {tag: {s: v for s, v in steps.items() if s < event.step} for tag, steps in out.items()}
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def _row(step: int, **extra) -> dict:
    return {"step": step, "loss": 1.0 / step, "task": 0.5 / step, "kd": 0.25 / step, "lr": 1e-3,
            "tokens_per_s": 100.0 * step, "step_time_s": 0.1, **extra}


def test_progress_writes_tensorboard_events(tmp_path, capsys):
    p = ProgressPrinter(tmp_path / "metrics.jsonl", max_steps=4, start_step=0, enabled=True)
    p.log(_row(2))
    p.log(_row(4, **{"val/loss": 2.0, "val/ppl": 7.4, "val/iia/mean": 0.5, "lm/task": 0.3}))
    p.close()
    # The terminal's speed is the row's, tok/s and s/step alike (not a mean since the start).
    assert "| 400 tok/s | 0.10 s/step |" in capsys.readouterr().out.splitlines()[-1]
    scalars = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert set(scalars) == {"loss", "task", "kd", "lr", "tokens_per_s", "step_time_s", "val/loss", "val/ppl",
                            "val/iia/mean", "lm/task"}
    assert scalars["loss"] == {2: pytest.approx(0.5), 4: pytest.approx(0.25)}
    assert scalars["val/ppl"] == {4: pytest.approx(7.4)}
    assert scalars["tokens_per_s"][4] == pytest.approx(400.0)
    # A resume from step 2 replaces the events of the steps it replays.
    p = ProgressPrinter(tmp_path / "metrics.jsonl", max_steps=4, start_step=2, enabled=True)
    p.log(_row(4, loss=9.0))
    p.close()
    assert read_scalars(tmp_path / TENSORBOARD_DIR)["loss"] == {2: pytest.approx(0.5), 4: pytest.approx(9.0)}


def test_progress_other_ranks_write_nothing(tmp_path):
    p = ProgressPrinter(tmp_path / "metrics.jsonl", max_steps=4, start_step=0, enabled=False)
    p.log(_row(2))
    p.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_the_driver_waits_for_a_killed_writer_before_reading_the_last_row(tmp_path):
    """After SIGINT the driver names the last logged step; it reads metrics.jsonl only once rank 0's process,
    which holds the file while it may write, is gone (killed with SIGKILL here, as Ray kills actors)."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "metrics.jsonl"
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from raydistill.train.progress import ProgressPrinter; "
         f"p = ProgressPrinter(Path({str(path)!r}), 9, 0, enabled=True, tensorboard=False); "
         "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        assert not wait_for_writers(path, timeout_s=0.3)  # alive: it may still write a row
        writer.send_signal(signal.SIGKILL)
        assert wait_for_writers(path, timeout_s=10)
    finally:
        writer.kill()
        writer.wait()
    assert wait_for_writers(tmp_path / "absent.jsonl", timeout_s=0)
    # The writers of a run (rank 0 and a resumed session's rank 0) only share the file.
    a = ProgressPrinter(path, 4, 0, enabled=True, tensorboard=False)
    b = ProgressPrinter(path, 4, 2, enabled=True, tensorboard=False)
    assert not wait_for_writers(path, timeout_s=0)
    a.close(), b.close()
    assert wait_for_writers(path, timeout_s=0)


# --- the sweep file's callbacks section ----------------------------------------------------------------------

def _sweep(tmp_path, **spec):
    from raydistill.sweep.spec import load_sweep

    data = {"name": "s", "base": {"teacher": {"name": "tiny-gpt2"}, "output_dir": str(tmp_path / "run"),
                                  "cache_dir": str(tmp_path / "cache")},
            "space": {"train.lr": {"choice": [1e-3, 2e-3]}}, "eval": {"tasks": None},
            "storage_path": str(tmp_path / "sweeps"), **spec}
    return load_sweep(None, data=data)


def test_callbacks_section_is_validated(tmp_path):
    from raydistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"callbacks\.mlflow\.trackin_uri: unknown key; allowed: experiment, "
                                          r"save_artifact, tags, tracking_uri"):
        _sweep(tmp_path, callbacks={"mlflow": {"trackin_uri": "file:///x"}})
    with pytest.raises(ConfigError, match=r"callbacks\.neptune: unknown key; allowed: mlflow, tensorboard, wandb"):
        _sweep(tmp_path, callbacks={"neptune": True})
    with pytest.raises(ConfigError, match=r"callbacks\.wandb\.mode: allowed: 'online', 'offline' or 'disabled'"):
        _sweep(tmp_path, callbacks={"wandb": {"mode": "offline-ish"}})
    spec = _sweep(tmp_path, callbacks={"mlflow": True, "wandb": False}).spec.callbacks
    assert spec.mlflow is not None and spec.mlflow.tracking_uri is None and spec.wandb is None and spec.tensorboard


def test_a_tracker_that_is_not_installed_is_refused_before_ray(tmp_path, monkeypatch):
    import importlib.util

    from raydistill.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"callbacks\.wandb needs the wandb package.*pip install wandb"):
        _sweep(tmp_path, callbacks={"wandb": {"mode": "offline"}})


def test_tracker_callbacks_are_tune_loggers_with_file_and_environment_settings(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install -e '.[test]')")
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    from raydistill.sweep.runner import tracker_callbacks

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    tb, mlf = tracker_callbacks(_sweep(tmp_path, callbacks={"mlflow": {"tracking_uri": uri, "tags": {"a": "b"}}}))
    assert isinstance(tb, TBXLoggerCallback) and isinstance(mlf, MLflowLoggerCallback)
    assert (mlf.tracking_uri, mlf.experiment_name, mlf.tags) == (uri, "s", {"sweep": "s", "a": "b"})
    # Environment variables when the file leaves a value out; tensorboard: false keeps Tune's CSV/JSON loggers.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    callbacks = tracker_callbacks(_sweep(tmp_path, callbacks={"mlflow": True, "tensorboard": False}))
    assert [type(c) for c in callbacks] == [CSVLoggerCallback, JsonLoggerCallback, MLflowLoggerCallback]
    assert (callbacks[2].tracking_uri, callbacks[2].experiment_name) == ("http://127.0.0.1:5000", "from-env")
    import os

    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"


def test_wandb_callback_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed: its section is validated above, the logger not built")
    from ray.air.integrations.wandb import WandbLoggerCallback

    from raydistill.sweep.runner import tracker_callbacks

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    cb = tracker_callbacks(_sweep(tmp_path, callbacks={"wandb": {"mode": "offline", "dir": str(tmp_path)},
                                                       "tensorboard": True}))[-1]
    assert isinstance(cb, WandbLoggerCallback)
    assert (cb.project, cb.group, cb.kwargs["mode"], cb.kwargs["dir"]) == ("s", "s", "offline", str(tmp_path))
    import os

    assert os.environ["WANDB_MODE"] == "offline"  # the file wins; Ray then needs no API key
    cb.setup()


# --- results on storage URIs -----------------------------------------------------------------------------------

def _check_results_on_storage(tmp_path, storage: str) -> None:
    """A sweep whose storage_path is a URI: sweep.yaml, the results table, best config and best student are
    written there and ``raydistill results URI`` reads them."""
    import json as _json

    from typer.testing import CliRunner

    from raydistill.cli import app
    from raydistill.sweep import results as R

    sweep = _sweep(tmp_path, storage_path=storage)
    directory = sweep.dir
    assert not sweep.is_local and directory == R.uri_join(storage, "s")
    R.write_bytes_to(directory, R.SWEEP_FILE, sweep.to_yaml().encode())
    student = tmp_path / "trial_b" / "student"
    (student / "sub").mkdir(parents=True)
    (student / "config.json").write_text("{}")
    (student / "sub" / "weights.bin").write_bytes(b"\0" * 1000)
    rows = [{"trial": "a", "status": "finished", "config/train.lr": 1e-3, "step": 12, "val/loss": 2.0,
             "checkpoint_path": None},
            {"trial": "b", "status": "finished", "config/train.lr": 2e-3, "step": 12, "val/loss": 1.5,
             "checkpoint_path": str(student)}]
    R.write_table(directory, rows)
    R.write_table(directory, rows)  # replaced, not appended
    out = R.write_best(sweep, directory, rows[1], {"train.lr": 2e-3})
    assert out["best_student"] == R.uri_join(directory, "best_student")
    assert R.read_bytes_from(R.uri_join(directory, "best_student/sub"), "weights.bin") == b"\0" * 1000
    best = R.read_bytes_from(directory, "best_config.yaml").decode()
    assert "best trial b" in best and "lr: 0.002" in best
    frame = R.read_table(directory)
    assert list(frame["trial"]) == ["a", "b"] and list(frame["val/loss"]) == [2.0, 1.5]
    assert R.read_bytes_from(directory, "results.csv").decode().startswith("trial,status")
    saved = R.load_saved_sweep(directory)
    assert saved.spec.name == "s" and [d.path for d in saved.dims] == ["train.lr"]
    # A student folder already at a URI (what a trial of an object-storage sweep reports) is copied too.
    R.write_best(sweep, directory, {**rows[1], "checkpoint_path": out["best_student"]}, {"train.lr": 2e-3})
    runner = CliRunner()
    res = runner.invoke(app, ["results", directory, "--json"])
    assert res.exit_code == 0, res.output
    assert [r["trial"] for r in _json.loads(res.output)] == ["b", "a"]
    res = runner.invoke(app, ["results", directory])
    assert res.exit_code == 0 and "sweep s: val/loss (min)" in res.output, res.output


def test_results_on_a_file_uri(tmp_path):
    _check_results_on_storage(tmp_path, (tmp_path / "remote").as_uri())


def test_results_on_s3_through_an_in_process_server(tmp_path, s3_server):
    _check_results_on_storage(tmp_path, f"s3://bucket/sweeps?{s3_server}")


def test_missing_results_on_a_uri_are_one_message(tmp_path):
    from raydistill.errors import ConfigError
    from raydistill.sweep import results as R

    with pytest.raises(ConfigError, match="no sweep.yaml here"):
        R.load_saved_sweep((tmp_path / "nothing").as_uri())
    with pytest.raises(ConfigError, match="no results.csv or results.parquet"):
        R.read_table((tmp_path / "nothing").as_uri())


def test_a_trial_of_an_object_storage_sweep_uploads_its_outputs(tmp_path):
    from raydistill.sweep import results as R
    from raydistill.sweep.trial import upload_outputs

    sweep = _sweep(tmp_path, storage_path=(tmp_path / "remote").as_uri())
    trial_dir = tmp_path / "staging" / "trial_abc"
    p = ProgressPrinter(trial_dir / "metrics.jsonl", max_steps=2, start_step=0, enabled=True)
    p.log(_row(2))
    p.close()
    (trial_dir / "student").mkdir()
    (trial_dir / "student" / "config.json").write_text("{}")
    (trial_dir / "bench.json").write_text("{}")
    uri = upload_outputs(sweep, trial_dir, str(trial_dir / "student"))
    remote = tmp_path / "remote" / "s" / "trial_abc"
    assert uri == R.uri_join(sweep.dir, "trial_abc/student") and (remote / "student" / "config.json").is_file()
    assert (remote / "metrics.jsonl").read_text() == (trial_dir / "metrics.jsonl").read_text()
    assert (remote / "bench.json").is_file() and not (remote / "summary.json").exists()
    assert read_scalars(remote / "tensorboard")["loss"] == {2: pytest.approx(0.5)}
