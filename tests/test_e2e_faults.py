"""Faults injected into real runs on Ray Train + DeepSpeed (2 CPU workers, ZeRO-2) and real sweeps.

- A worker failure mid-run: the rerun resumes from the last checkpoint without losing or repeating a step (the
  replayed step gives the same loss; TensorBoard's events of the replayed steps are replaced).
- Damaged checkpoints (a file cut in half, a file deleted): the run says which and resumes from the newest
  intact one, replaying the same steps; a non-finite loss stops the run at that step with the terms named and
  nothing exported; so does an exploding finite loss under ``train.divergence=stop``.
- SIGINT on ``raydistill train``: the workers stop at once, exit 130, the message says how to resume.

Interrupted, killed and resumed sweeps are in tests/test_e2e_sweep.py."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydistill.config import load_config
from raydistill.train import launcher

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TINY = ["teacher.name=tiny-gpt2", "student.num_layers=1", "data.builtin.num_documents=400", "data.block_size=32",
        "tokenizer.vocab_size=512", "train.batch_size=8", "train.lr=3e-3", "train.warmup_ratio=0",
        "train.lr_schedule=constant", "train.eval_batches=2", "scaling.num_workers=2", "ray.dashboard=false",
        "objectives.kd.weight=1.0", "train.log_every=1"]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def by_step(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in rows(run)}  # after a resume the last row of a step wins


def newest_checkpoints(run: Path) -> list[Path]:
    ckpts = [p for p in (run / "ray" / "r").glob("checkpoint_*") if p.is_dir()]
    steps = {p: json.loads((p / "raydistill_manifest_rank0.json").read_text())["step"] for p in ckpts}
    return sorted(ckpts, key=steps.get, reverse=True)


def test_damaged_checkpoints_fall_back_and_a_nonfinite_loss_stops_the_run(ray_cluster, tmp_path, cache_dir, capfd):
    run = tmp_path / "run"

    def train(*overrides):
        return launcher.run(load_config(None, [f"output_dir={run}", f"cache_dir={cache_dir}", "name=r", *TINY,
                                               "train.checkpoint_every=5", *overrides]))

    # 0. A worker fails at step 7 (after the step-5 checkpoint); the rerun resumes from step 5 without losing or
    # repeating a step, and step 6 replayed from the restored state gives exactly the loss the failed run saw.
    with pytest.raises(launcher.TrainingFailed, match="fail_at_step=7"):
        train("train.max_steps=10", "train.fail_at_step=7")
    failed = rows(run)
    assert [r["step"] for r in failed] == [1, 2, 3, 4, 5, 6]
    train("train.max_steps=10")
    resumed = rows(run)[len(failed):]
    assert [r["step"] for r in resumed] == [6, 7, 8, 9, 10]
    assert resumed[0]["loss"] == pytest.approx(failed[-1]["loss"], rel=1e-6)
    assert resumed[0]["kd"] == pytest.approx(failed[-1]["kd"], rel=1e-6)
    # TensorBoard read as TensorBoard does: the resumed run's events replace the replayed step 6.
    from test_trackers import read_scalars

    scalars = read_scalars(run / "tensorboard")
    assert sorted(scalars["loss"]) == list(range(1, 11))
    assert scalars["loss"][6] == pytest.approx(resumed[0]["loss"], rel=1e-6)
    first = by_step(run)
    # 1. The newest checkpoint's model file cut in half: resume from the step-5 checkpoint, steps 6-10 replayed.
    newest = newest_checkpoints(run)[0]
    model = newest / "state" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    capfd.readouterr()
    train("train.max_steps=12")
    out = capfd.readouterr().out
    assert f"checkpoint {newest} is damaged (state/mp_rank_00_model_states.pt has" in out, out[-3000:]
    assert "resumed from checkpoint at step 5" in out
    second = rows(run)[len(failed) + len(resumed):]
    assert [r["step"] for r in second] == list(range(6, 13))
    assert second[4]["loss"] == pytest.approx(first[10]["loss"], rel=1e-6)  # the same step 10 again
    # 2. A file of the newest checkpoint deleted: the one before it (step 10) is used.
    newest = newest_checkpoints(run)[0]
    (newest / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    train("train.max_steps=14")
    out = capfd.readouterr().out
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in out and "resumed from checkpoint at step 10" in out
    exported = json.loads((run / "student" / "raydistill.json").read_text())
    assert exported["step"] == 14
    # 3. A NaN loss (kd at temperature 1e20) stops the run at its first step; the export stays the step-14 one.
    with pytest.raises(launcher.TrainingFailed) as err:
        train("train.max_steps=20", "objectives.kd.temperature=1e20")
    msg = str(err.value)
    assert msg.startswith("non-finite loss at step 15: kd=nan, loss=nan.") and "nothing was exported" in msg, msg
    assert "Traceback" not in msg and "\n" not in msg
    assert json.loads((run / "student" / "raydistill.json").read_text())["step"] == 14
    last = rows(run)[-1]
    assert last["step"] == 15 and math.isnan(last["loss"])
    # 4. A finite loss that explodes (lr 10, no clipping; the 3.3 -> 9,284) under train.divergence=stop,
    # in a fresh run: stopped at the step named, nothing exported (here kd went 0.005 -> 3,229 -> 9,362).
    fresh = tmp_path / "exploding"
    with pytest.raises(launcher.TrainingFailed) as err:
        launcher.run(load_config(None, [f"output_dir={fresh}", f"cache_dir={cache_dir}", "name=x", *TINY,
                                        "train.max_steps=30", "train.lr=10", "train.grad_clip=0",
                                        "train.divergence=stop"]))
    msg = str(err.value)
    assert msg.startswith("the loss is diverging at step ") and "nothing was exported" in msg, msg
    assert not (fresh / "student").exists()
    assert rows(fresh)[-1]["diverged_at_step"] == rows(fresh)[-1]["step"] == int(msg.split()[6].rstrip(":"))


def cli(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "raydistill.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True, cwd=ROOT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}:\n{proc.communicate()[0][-4000:]}")


def test_sigint_stops_train_workers_at_once_and_exits_130(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = cli("train", "sweeps/configs/debug.yaml", f"output_dir={run}", f"cache_dir={cache_dir}", "name=r", *TINY,
               "teacher.pretrain=null", "train.max_steps=2000", "train.checkpoint_every=5")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(rows(run)) >= 8, proc, 400, "step 8")
    start = time.time()
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out[-3000:]
    assert time.time() - start < 30
    last = out.strip().splitlines()[-1]  # the message comes last (Ray is shut down before it is printed)
    assert last.startswith("interrupted after step") and "Rerun the same command" in last, out[-3000:]
    assert "latest checkpoint (step" in last
    # Without a dashboard there is no state API: Ray Train's placement-group cleaner, which asks it every second,
    # is left out instead of logging a failed query each time.
    assert "Failed to query Ray Train Controller actor state" not in out, out[-3000:]
    # The workers stopped at once: the last row was written within a few steps' time of the signal (steps take
    # ~0.1 s here, so a row count would be a race), and nothing is written after the command has exited.
    at_exit, written = len(rows(run)), (run / "metrics.jsonl").stat().st_mtime
    assert written - start < 3.0, f"the workers logged {written - start:.1f} s after the signal"
    time.sleep(5)
    assert len(rows(run)) == at_exit
    assert int(last.split()[3].rstrip(";")) == rows(run)[-1]["step"]  # the message names the last logged step
