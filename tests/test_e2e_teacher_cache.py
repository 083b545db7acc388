"""The teacher cache end to end on real Ray Train + DeepSpeed: a run fills the cache on a Ray actor, its worker
trains from it without loading the teacher, and logs the first step's losses that the teacher online gives
on the same batch from the same student (the rest of the equivalence is tested in-process)."""

import json

import pytest
import torch

from raydistill.config import load_config
from raydistill.data.blocks import BatchSampler
from raydistill.models.loading import build_model
from raydistill.objectives import build_objectives
from raydistill.train import launcher
from raydistill.train import teacher_cache as TC
from raydistill.train.plan import prepare
from raydistill.train.step import DistillModule

pytestmark = pytest.mark.e2e

NO_DROPOUT = "{resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}"


def test_run_from_the_cache_without_the_teacher(ray_cluster, tmp_path, cache_dir, capfd):
    cfg = load_config(None, [
        "teacher.name=tiny-gpt2", f"teacher.config_overrides={NO_DROPOUT}", "data.builtin.num_documents=200",
        "data.block_size=24", "tokenizer.vocab_size=384", "student.num_layers=1", "student.init=random",
        "train.max_steps=2", "train.log_every=1", "train.eval_batches=1", "train.batch_size=2",
        "scaling.num_workers=1", "ray.dashboard=false", "objectives.task.weight=0.5", "objectives.kd.weight=1",
        "objectives.kd.top_k=8", "teacher_cache.top_k=16", "teacher_cache.dtype=float32",
        f"teacher_cache.uri={tmp_path}/tc", f"output_dir={tmp_path}/run", f"cache_dir={cache_dir}"])
    launcher.run(cfg)
    log = capfd.readouterr().out
    assert "computing 3" in log and "the teacher is not loaded" in log
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # The same step in this process with the teacher online: the workers' student init, batch and teacher.
    plan = prepare(cfg)
    torch.manual_seed(cfg.train.seed)
    with torch.random.fork_rng(devices=[]):
        teacher = build_model(plan.teacher_config, None).eval()
    module = DistillModule(build_model(plan.student_config, None), build_objectives(plan.objectives, plan.info),
                           plan.info).eval()
    batch = BatchSampler(plan.blocks[0], plan.token_info, batch_size=2, grad_accum=1, rank=0, world_size=1,
                         seed=cfg.train.seed).batch(1, 0)
    with torch.no_grad():
        _, logs = module(batch, teacher)
    for key in ("kd", "task", "loss"):
        assert first[key] == pytest.approx(logs[key].item(), rel=1e-5), key
    assert TC.attach(cfg, plan).teacher_cache.stats["reused_files"] == 3  # a second run reads it all
