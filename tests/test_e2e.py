"""End-to-end runs on real Ray Train + DeepSpeed: 2 CPU workers, ZeRO-3 and ZeRO-2, encoder and decoder."""

import json
from pathlib import Path

import pytest
import torch

from raydistill.config import load_config
from raydistill.train import launcher

pytestmark = pytest.mark.e2e

TINY = ["data.builtin.num_documents=400", "data.block_size=32", "tokenizer.vocab_size=512",
        "train.batch_size=8", "train.lr=3e-3", "train.warmup_ratio=0", "train.lr_schedule=constant",
        "train.eval_batches=2", "scaling.num_workers=2", "ray.dashboard=false"]


def config(tmp_path, cache_dir, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}", *TINY, *overrides])


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# One stage per architecture (each run costs ~20 s of Ray Train start-up on 2 cores): ZeRO-3's export gathers the
# partitioned weights, tied ones included; the IIT, normalisation and fault tests run ZeRO-2 on both.
@pytest.mark.parametrize("preset, zero", [("tiny-bert", 2), ("tiny-gpt2", 3)])
def test_distillation_loss_falls_and_export_reproduces_logits(ray_cluster, tmp_path, cache_dir, preset, zero):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    # The teacher is pretrained briefly (cached for the session, shared by both ZeRO stages) so that it has
    # something to teach; the student starts from random weights.
    cfg = config(tmp_path, cache_dir, f"teacher.name={preset}", f"deepspeed.zero_stage={zero}",
                 "teacher.pretrain={max_steps: 40, lr: 3.0e-3, batch_size: 8}",
                 "student.num_layers=2", "student.init=random", "train.max_steps=24", "train.log_every=4",
                 "objectives.task.weight=0.5", "objectives.kd.weight=1.0", "objectives.cosine.weight=0.5")
    import ray

    before = set(ray._private.state.actors())
    summary = launcher.run(cfg)
    # The actors this run (and its teacher's pretraining, when not cached) started: Ray Train's, without the two
    # with nothing to do here, a dataset manager (no Ray Datasets) and a placement-group cleaner (no dashboard).
    started = {actor["ActorClassName"].rsplit(".", 1)[-1]
               for i, actor in ray._private.state.actors().items() if i not in before}
    assert {"TrainController", "RayTrainWorker"} <= started, started
    assert not started & {"DatasetManager", "PlacementGroupCleaner"}, started
    rows = metric_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
    assert rows[-1]["kd"] < 0.8 * rows[0]["kd"], [r["kd"] for r in rows]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"task", "kd", "cosine", "lr", "tokens_per_s", "val/ppl", "val/kd"} <= rows[-1].keys()
    assert summary["final_metrics"]["step"] == 24
    # TensorBoard: every term of every logged row, at its step (rank 0's events only).
    from test_trackers import read_scalars

    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert {k for r in rows for k in r if k not in ("step", "time")} <= scalars.keys()
    assert sorted(scalars["kd"]) == [4, 8, 12, 16, 20, 24]
    assert scalars["kd"][24] == pytest.approx(rows[-1]["kd"], rel=1e-6)

    export = Path(summary["export_dir"])
    assert (export / "model.safetensors").is_file()
    # The trained context travels with the export: `raydistill eval` scores perplexity at that length.
    assert json.loads((export / "raydistill.json").read_text())["block_size"] == 32
    cls = AutoModelForMaskedLM if preset == "tiny-bert" else AutoModelForCausalLM
    model = cls.from_pretrained(export).eval()
    assert model.config.num_hidden_layers == 2
    AutoTokenizer.from_pretrained(export)
    probe = torch.load(export.parent / "student_probe.pt")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)


def test_workers_start_with_the_malloc_settings_in_their_initial_environment(ray_cluster):
    """glibc reads MALLOC_ARENA_MAX once, as the process starts: it must be in the environment the worker
    process was started with (/proc/self/environ), not only set later in Python. Ray Train's controller (an actor
    in such a process) reads its poll interval there too."""
    import ray

    @ray.remote(num_cpus=1)
    def initial_environment() -> list[bytes]:
        return Path("/proc/self/environ").read_bytes().split(b"\0")

    environment = ray.get(initial_environment.remote())
    assert f"{launcher.ARENA_MAX}=1".encode() in environment
    interval = launcher.health_check_interval(load_config(None, ["teacher.name=tiny-gpt2"]))
    assert f"{launcher.HEALTH_CHECK}={interval}".encode() in environment


def test_ray_trains_controller_unpickles_the_entry_without_the_model_code():
    """Ray Train's controller unpickles the training function before any worker starts: what it imports then is
    on every run's critical path. The entry pickles by reference to a module that imports no model code."""
    import subprocess
    import sys

    import cloudpickle

    from raydistill.train.entry import train_loop_per_worker

    blob = cloudpickle.dumps(train_loop_per_worker)
    heavy = ["torch", "transformers", "deepspeed", "raydistill.train.worker", "raydistill.train.plan"]
    out = subprocess.run([sys.executable, "-c", f"import pickle, sys; pickle.loads({blob!r}); "
                          f"print([m for m in {heavy!r} if m in sys.modules])"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
