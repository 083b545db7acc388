"""The normalisation contract end to end on real Ray Train + DeepSpeed (ZeRO-2, CPU): the same sequences as
(1 worker, 1 micro-batch) and (2 workers, 2 micro-batches each) give the same loss terms and the same student
after an optimiser step, for task (MLM and next-token), kd, td and iit, and a stream's terms. One split covers
both ways of cutting the step (DeepSpeed's gradient accumulation and the workers' reduction): a wrong weight in
either moves the student differently from the reference; the DistillModule-level split is tests/test_normalisation.py.
The student before the step is built in this process as the workers build it (seeded, random init)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raydistill.config import load_config
from raydistill.models.loading import build_model
from raydistill.train import launcher
from raydistill.train.plan import prepare

pytestmark = pytest.mark.e2e

SPLITS = {"1w-1mb": (1, 8, 1), "2w-2mb": (2, 2, 2)}  # workers, sequences per micro-batch, micro-batches

COMMON = ["data.builtin.num_documents=200", "data.block_size=24", "tokenizer.vocab_size=384",
          "student.num_layers=2", "student.init=random", "train.max_steps=1", "train.log_every=1",
          "train.eval_batches=1", "train.warmup_ratio=0", "train.lr_schedule=constant", "train.weight_decay=0",
          "train.grad_clip=0", "deepspeed.zero_stage=2", "ray.dashboard=false",
          # A large Adam eps makes the first update ~ lr * g / eps, linear in the gradient: a wrongly
          # weighted gradient moves the parameters differently (with a small eps Adam's first step is sign(g)).
          "train.lr=1.0", "train.eps=10.0"]

CASES = {
    "encoder": ["teacher.name=tiny-bert",
                "teacher.config_overrides={hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}",
                "objectives={task: {weight: 1.0}, kd: {weight: 1.0, masked_only: true}, "
                "iit: {weight: 1.0, alignment: full}}"],
    "decoder": ["teacher.name=tiny-gpt2",
                "teacher.config_overrides={resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}",
                # Prompt + response rows: response lengths (the labelled tokens) differ from row to row.
                "prompts={builtin: {num_examples: 40}, responses: dataset, max_prompt_tokens: 12, "
                "max_response_tokens: 12}",
                "objectives={task: {weight: 1.0}, kd: {weight: 1.0}, td: {weight: 1.0, "
                "action_space: {kind: top_k, k: 8}}, iit: {weight: 1.0, alignment: full}}",
                "streams={lm: {batch_size: 4, objectives: {task: {weight: 0.5}}}}"],
}


def config(case: str, split: str, root: Path, cache_dir: str):
    workers, batch, micro = SPLITS[split]
    overrides = [f"output_dir={root / case / split}", f"cache_dir={cache_dir}", f"name={case}-{split}", *COMMON,
                 *CASES[case], f"scaling.num_workers={workers}", f"train.batch_size={batch}",
                 f"train.grad_accum={micro}"]
    if case == "decoder":
        overrides.append(f"streams.lm.batch_size={batch}")
    return load_config(None, overrides)


def run(case: str, split: str, root: Path, cache_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = config(case, split, root, cache_dir)
    launcher.run(cfg)
    out = Path(cfg.output_dir)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return row, load_file(str(out / "student" / "model.safetensors"))


def initial_student(case: str, root: Path, cache_dir: str) -> dict[str, torch.Tensor]:
    """The student before the step, built in this process as every worker builds it (Worker.build: the seed, then
    the random init): a run with lr ~0 gave the same weights to 1e-12, at the cost of a Ray Train run (~17 s).
    Its state dict also names the tied weights that the export leaves out."""
    cfg = config(case, "1w-1mb", root / "init", cache_dir)
    plan = prepare(cfg)
    torch.manual_seed(cfg.train.seed)
    student = build_model(plan.student_config, plan.student_source, plan.student_revision, cfg.student)
    return {name: value.detach().clone() for name, value in student.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_same_step_for_any_split_over_micro_batches_and_workers(ray_cluster, tmp_path, cache_dir, case):
    init = initial_student(case, tmp_path, cache_dir)
    results = {split: run(case, split, tmp_path, cache_dir) for split in SPLITS}
    ref_row, ref_state = results["1w-1mb"]
    # The step moved the student well beyond the tolerance below (eps = 10: ~lr * g / 10 per weight).
    moved = max((ref_state[n] - init[n]).abs().max().item() for n in ref_state)
    assert moved > 1e-3, moved
    terms = [k for k in ref_row if k in {"task", "kd", "td", "iit", "loss", "lm/task"}]
    assert {"task", "kd", "iit", "loss"} <= set(terms)
    for split, (row, state) in results.items():
        for k in terms:
            assert row[k] == pytest.approx(ref_row[k], rel=1e-5, abs=1e-6), (split, k)
        for name, value in ref_state.items():
            torch.testing.assert_close(state[name] - init[name], value - init[name], rtol=1e-4, atol=1e-6,
                                       msg=f"{split}: {name}")
