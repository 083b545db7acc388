"""IIT end to end on Ray Train + DeepSpeed (2 CPU workers, ZeRO-2): the iit loss falls and the
IIT-trained student agrees with the teacher's counterfactuals (IIA) more than one trained without iit."""

import json

import pytest

from raydistill.config import load_config
from raydistill.train import launcher

from test_e2e import TINY

pytestmark = pytest.mark.e2e


def run(tmp_path, cache_dir, name, preset, iit_weight):
    cfg = load_config(None, [f"output_dir={tmp_path / name}", f"cache_dir={cache_dir}", *TINY,
                             f"teacher.name={preset}", "teacher.pretrain={max_steps: 200, lr: 3.0e-3, batch_size: 16}",
                             "student.num_layers=2", "student.init=random", "deepspeed.zero_stage=2",
                             "train.max_steps=80", "train.log_every=10", "train.eval_batches=4",
                             "objectives.task.weight=0.5", "objectives.kd.weight=1.0",
                             f"objectives.iit.weight={iit_weight}", "objectives.iit.alignment=full"])
    launcher.run(cfg)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def iit_losses(rows):
    return [r["iit"] for r in rows]


def test_iit_loss_falls_and_iia_beats_standard_distillation_gpt2(ray_cluster, tmp_path, cache_dir):
    with_iit = run(tmp_path, cache_dir, "iit", "tiny-gpt2", 1.0)
    without = run(tmp_path, cache_dir, "std", "tiny-gpt2", 0.0)  # iit configured at weight 0: IIA still measured
    losses = iit_losses(with_iit)
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    assert "iit" not in without[-1]
    iia_iit, iia_std = with_iit[-1]["val/iia/mean"], without[-1]["val/iia/mean"]
    assert iia_iit > iia_std, (iia_iit, iia_std)


def test_iit_loss_falls_bert(ray_cluster, tmp_path, cache_dir):
    # A tiny BERT teacher is still on the MLM unigram plateau after a CPU-sized pretraining, so its
    # counterfactual predictions are the majority token and IIA is 1.0 for any student: here only the
    # loss is checked; the IIA comparison runs on the GPT-2 teacher above.
    losses = iit_losses(run(tmp_path, cache_dir, "iit", "tiny-bert", 1.0))
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
