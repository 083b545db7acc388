"""Every token-averaged term is one mean over the optimiser step: the same sequences split into different
micro-batches give the same loss and the same gradient (DistillModule level; the end-to-end check on Ray +
DeepSpeed is tests/test_e2e_normalisation.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from raydistill.data.masking import next_token_labels
from raydistill.models.adapters import set_num_layers
from raydistill.models.presets import preset_config
from raydistill.objectives import REGISTRY, build_objectives
from raydistill.objectives.base import ModelInfo
from raydistill.train.step import DistillModule

VOCAB, MASK_ID, CLS, SEP = 60, 5, 3, 4
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "resid_pdrop": 0.0,
              "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def models(arch: str):
    torch.manual_seed(0)
    cfg = preset_config(arch, VOCAB, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, NO_DROPOUT)
    cls = AutoModelForMaskedLM if arch == "tiny-bert" else AutoModelForCausalLM
    teacher = cls.from_config(cfg).eval().requires_grad_(False)
    scfg = copy.deepcopy(cfg)
    set_num_layers(scfg, 2)
    student = cls.from_config(scfg)
    info = ModelInfo(is_encoder=arch == "tiny-bert", vocab_size=VOCAB, student_layers=2, student_hidden=64,
                     teacher_layers=4, teacher_hidden=64)
    return teacher, student, info


def sequences(is_encoder: bool) -> dict[str, torch.Tensor]:
    """Four sequences of very different lengths and label counts (3 vs 15 labelled tokens, as in the bug
    report), one batch."""
    g = torch.Generator().manual_seed(1)
    seq = 18
    lengths = torch.tensor([4, 18, 9, 16])
    ids = torch.randint(6, VOCAB, (4, seq), generator=g)
    attn = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(attn == 0, 0)
    special = torch.zeros_like(ids)
    if not is_encoder:
        return {"input_ids": ids, "attention_mask": attn, "labels": next_token_labels(ids, attn),
                "special_tokens_mask": special | (1 - attn), "sample_ids": torch.arange(4)}
    ids[:, 0], special[:, 0] = CLS, 1
    rows = torch.arange(4)
    ids[rows, lengths - 1], special[rows, lengths - 1] = SEP, 1
    chosen = (torch.rand(ids.shape, generator=g) < 0.4) & (attn == 1) & (special == 0)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {"input_ids": ids.masked_fill(chosen, MASK_ID), "attention_mask": attn, "labels": labels,
            "special_tokens_mask": special | (1 - attn), "sample_ids": torch.arange(4)}


OBJECTIVES = {
    "tiny-bert": {"task": {}, "kd": {"masked_only": True}, "cosine": {}, "iit": {"alignment": "full"},
                  "iit_cosine": {}},
    "tiny-gpt2": {"task": {}, "kd": {}, "td": {"action_space": {"kind": "top_k", "k": 4}},
                  "iit": {"alignment": "full", "pair_sampling": "uniform_one"}},
}


def run_split(module: DistillModule, teacher, micro_batches: list[dict], normalise: bool = True):
    """Accumulate gradients over ``micro_batches`` as the training loop does (counts summed over the step,
    each loss scaled back up by 1 / share, gradients averaged over micro-batches as DeepSpeed does)."""
    module.zero_grad()
    counts = None
    if normalise:
        counts = {}
        for b in micro_batches:
            for k, v in module.counts(b).items():
                counts[k] = counts.get(k, 0.0) + v
    share = 1.0 / len(micro_batches)
    logs_sum: dict[str, float] = {}
    for b in micro_batches:
        if normalise:
            loss, logs = module(b, teacher, {"seed": 0, "step_seed": 7}, counts=counts, share=share)
            (loss / share * share).backward()  # x 1/share, then DeepSpeed's average over micro-batches
        else:  # the old rule: each micro-batch its own mean, averaged
            loss, logs = module(b, teacher, {"seed": 0, "step_seed": 7})
            (loss * share).backward()
            logs = {k: v * share for k, v in logs.items()}
        for k, v in logs.items():
            logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return logs_sum, grads


def halves(batch):
    return [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2"])
def test_loss_and_gradient_do_not_depend_on_the_split(arch):
    teacher, student, info = models(arch)
    settings = {name: REGISTRY[name].Settings(**s) for name, s in OBJECTIVES[arch].items()}
    module = DistillModule(student, build_objectives(settings, info), info)
    batch = sequences(info.is_encoder)
    whole_logs, whole_grads = run_split(module, teacher, [batch])
    split_logs, split_grads = run_split(module, teacher, halves(batch))
    for name in [*OBJECTIVES[arch], "loss"]:
        assert split_logs[name] == pytest.approx(whole_logs[name], rel=1e-5, abs=1e-6), name
    for n, g in whole_grads.items():
        torch.testing.assert_close(split_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    # The old rule (a mean of micro-batch means) gives another gradient on these sequences.
    _, old_grads = run_split(module, teacher, halves(batch), normalise=False)
    diff = sum((old_grads[n] - g).norm() ** 2 for n, g in whole_grads.items()) ** 0.5
    norm = sum(g.norm() ** 2 for g in whole_grads.values()) ** 0.5
    assert diff > 0.02 * norm  # while the split above matches to 1e-4


def test_hand_computed_two_sequences_weighted_per_token():
    """Two sequences with 3 and 15 labelled tokens: the step's task loss is the mean over 18 tokens, not the
    mean of the two sequence means, in one micro-batch or two."""
    task = build_objectives({"task": REGISTRY["task"].Settings()},
                            ModelInfo(is_encoder=False, vocab_size=2, student_layers=1, student_hidden=1))["task"]
    from raydistill.objectives.base import ForwardResult, Step

    # Logits (0, log 3) everywhere: label 0 costs log 4, label 1 costs log(4/3).
    logits = torch.tensor([0.0, torch.log(torch.tensor(3.0))]).expand(2, 15, 2).clone()
    labels = torch.full((2, 15), -100)
    labels[0, :3] = 0  # 3 tokens costing log 4
    labels[1, :] = 1  # 15 tokens costing log 4/3
    batch = {"attention_mask": torch.ones(2, 15, dtype=torch.long), "labels": labels}
    counts = {"task": task.positions(batch).sum().float()}
    assert counts["task"].item() == 18
    import math
    expected = (3 * math.log(4) + 15 * math.log(4 / 3)) / 18
    parts = [task(Step(batch={k: v[i:i + 1] for k, v in batch.items()}, student=ForwardResult(logits[i:i + 1]),
                       teacher=None, student_model=None, teacher_model=None, info=task.info, counts=counts,
                       share=0.5))["task"].item() for i in range(2)]
    assert sum(parts) == pytest.approx(expected, abs=1e-6)
    whole = task(Step(batch=batch, student=ForwardResult(logits), teacher=None, student_model=None,
                      teacher_model=None, info=task.info))["task"].item()
    assert whole == pytest.approx(expected, abs=1e-6)
    mean_of_means = (math.log(4) + math.log(4 / 3)) / 2
    assert abs(mean_of_means - expected) > 0.1
