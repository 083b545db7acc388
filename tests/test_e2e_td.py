"""TD distillation end to end on real Ray Train + DeepSpeed (2 CPU workers, ZeRO-2, tiny GPT-2 teacher):
regime (a) corpus text, regime (b) teacher-generated responses cached once and reused after a crash,
regime (c) on-policy draws, the second (language-modelling) stream and ROUGE-L in validation."""

import json
from pathlib import Path

import numpy as np
import pytest

from raydistill.config import load_config
from raydistill.generation import on_policy_draw
from raydistill.train import launcher

pytestmark = pytest.mark.e2e

TINY = ["teacher.name=tiny-gpt2", "data.builtin.num_documents=400", "data.block_size=32", "tokenizer.vocab_size=512",
        "train.batch_size=8", "train.lr=3e-3", "train.warmup_ratio=0", "train.lr_schedule=constant",
        "train.eval_batches=2", "scaling.num_workers=2", "ray.dashboard=false", "deepspeed.zero_stage=2",
        # The teacher is pretrained briefly (cached for the session; the same key as tests/test_e2e.py's).
        "teacher.pretrain={max_steps: 40, lr: 3.0e-3, batch_size: 8}",
        "student.num_layers=2", "student.init=random",
        "objectives.task.weight=0", "objectives.td.weight=1.0", "objectives.td.action_space={kind: top_k, k: 8}"]
PROMPTS = "prompts={builtin: {num_examples: 120}, max_prompt_tokens: 24, max_response_tokens: 24, " \
          "generation: {num_samples: 2, batch_size: 64}}"
ROUGE = "rouge={num_prompts: 8, max_new_tokens: 12}"


def config(run_dir, cache_dir, *overrides):
    return load_config(None, [f"output_dir={run_dir}", f"cache_dir={cache_dir}", *TINY, *overrides])


def all_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """step -> the last row logged for it (a restart replays steps after its checkpoint)."""
    return {r["step"]: r for r in all_rows(run_dir)}


def test_regime_a_corpus_text_td_falls_with_rouge(ray_cluster, tmp_path, cache_dir):
    run = tmp_path / "run"
    launcher.run(config(run, cache_dir, "train.max_steps=20", "train.log_every=4", ROUGE))
    rows = metric_rows(run)
    assert sorted(rows) == [4, 8, 12, 16, 20]
    tds = [rows[s]["td"] for s in sorted(rows)]
    assert tds[-1] < tds[0], tds
    last = rows[20]
    assert {"td", "val/td", "val/ppl", "val/rougeL", "val/rougeL_teacher"} <= last.keys()
    assert 0.0 <= last["val/rougeL"] <= 100.0 and 0.0 <= last["val/rougeL_teacher"] <= 100.0
    assert not (run / "generation.jsonl").exists()  # no prompts: nothing generated


def test_regime_b_teacher_samples_cached_once_reused_after_crash(ray_cluster, tmp_path, cache_dir):
    run = tmp_path / "run"
    lam = 0.3
    # Crash at step 9 after the step-6 checkpoint; Ray Train restarts the worker group once (max_failures=1):
    # the restarted workers find the teacher's samples on disk instead of generating them again.
    cfg = config(run, cache_dir, PROMPTS, f"prompts.on_policy={{probability: {lam}}}", ROUGE,
                 "streams.lm.objectives={task: {weight: 0.5}, kd: {weight: 0.5}}",
                 "train.max_steps=16", "train.log_every=1", "train.checkpoint_every=6", "train.eval_every=16",
                 "train.fail_at_step=9", "train.max_failures=1")
    summary = launcher.run(cfg)
    events = [json.loads(line) for line in (run / "generation.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["generated", "cache_hit"], events
    assert events[0]["key"] == events[1]["key"] and events[0]["responses"] == events[1]["responses"]
    cache_file = Path(events[0]["path"])
    assert cache_file.is_file() and cache_file.parent == Path(cache_dir) / "generations"
    assert events[0]["responses"] == 2 * events[0]["prompts"]  # num_samples per prompt

    rows = metric_rows(run)
    assert sorted(rows) == list(range(1, 17))
    # Steps 7 and 8 ran before the crash and again after the restart from step 6: identically.
    logged = all_rows(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6, 7, 8, *range(7, 17)]
    for before, after in ((logged[6], logged[8]), (logged[7], logged[9])):
        assert after["td"] == pytest.approx(before["td"], rel=1e-6)
        assert after["lm/loss"] == pytest.approx(before["lm/loss"], rel=1e-6)
    # Regime (c): lambda's draws are a function of (seed, step, micro): the restart replayed them exactly.
    draws = [float(on_policy_draw(cfg.train.seed, s, 0, lam)) for s in range(1, 17)]
    assert [rows[s]["on_policy"] for s in range(1, 17)] == draws
    assert 0 < sum(draws) < 16
    # td on the teacher's samples (off-policy steps) falls.
    off = [rows[s]["td"] for s in range(1, 17) if not draws[s - 1]]
    assert np.mean(off[-3:]) < np.mean(off[:3]), off
    # The second stream's terms are logged with their prefix, in training and validation.
    last = rows[16]
    assert {"lm/task", "lm/kd", "lm/loss", "val/lm/task", "val/td", "val/rougeL"} <= last.keys()
    assert summary["final_metrics"]["step"] == 16


def test_fused_head_under_zero3_trains_as_the_full_logits(ray_cluster, tmp_path, cache_dir):
    """ZeRO-3 partitions the student's head (GPT-2's, tied to its input embedding; a persistence threshold of 0
    so that even this tiny one is partitioned): the fused head gathers it in forward and backward, and
    training follows the full-logits path step for step."""
    tds = {}
    for fused in (True, False):
        run = tmp_path / f"fused_{fused}"
        launcher.run(config(run, cache_dir, "deepspeed.zero_stage=3",
                            "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0, "
                            "stage3_max_reuse_distance: 0, stage3_prefetch_bucket_size: 0}}",
                            "train.max_steps=8", "train.log_every=1",
                            "train.eval_every=8", f"objectives.td.fused_head={str(fused).lower()}"))
        tds[fused] = [metric_rows(run)[s]["td"] for s in range(1, 9)]
    assert tds[True] == pytest.approx(tds[False], rel=1e-4), tds
    assert tds[True][-1] < tds[True][0], tds
