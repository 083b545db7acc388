"""The iit / iit_cosine objectives and the IIA metric on tiny encoders and decoders."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from raydistill.errors import ConfigError
from raydistill.iia import _SALT, interchange_agreement, prediction_mask
from raydistill.interventions import intervene, model_inputs, plan_generator, sample_plan
from raydistill.models.adapters import find_blocks, set_num_layers
from raydistill.models.presets import preset_config
from raydistill.objectives import REGISTRY
from raydistill.objectives.base import ForwardResult, ModelInfo, Needs, Step
from raydistill.objectives.iit import (IITCosineLoss, IITCosineSettings, IITLoss, IITSettings,
                                       share_intervention_settings)

VOCAB, MASK_ID, CLS, SEP = 100, 5, 3, 4


def models(arch: str, student_layers: int = 2, student_hidden: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    cfg = preset_config(arch, VOCAB, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    cls = AutoModelForMaskedLM if arch == "tiny-bert" else AutoModelForCausalLM
    teacher = cls.from_config(cfg).eval()
    scfg = copy.deepcopy(cfg)
    set_num_layers(scfg, student_layers)
    if student_hidden is not None:
        for key in ("hidden_size", "n_embd"):
            if hasattr(scfg, key):
                setattr(scfg, key, student_hidden)
    student = cls.from_config(scfg).eval()
    info = ModelInfo(is_encoder=arch == "tiny-bert", vocab_size=VOCAB, student_layers=student_layers,
                     student_hidden=student_hidden or 64, teacher_layers=4, teacher_hidden=64)
    return teacher, student, info


def make_batch(is_encoder: bool, batch: int = 4, seq: int = 14, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (batch, seq), generator=g)
    lengths = torch.tensor([seq, seq - 3, seq - 5, seq][:batch] + [seq] * max(0, batch - 4))
    attn = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(attn == 0, 0)
    if not is_encoder:
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}
    special = torch.zeros_like(ids)
    ids[:, 0], special[:, 0] = CLS, 1
    rows = torch.arange(batch)
    ids[rows, lengths - 1], special[rows, lengths - 1] = SEP, 1
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & (attn == 1) & (special == 0)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {"input_ids": ids.masked_fill(chosen, MASK_ID), "attention_mask": attn, "labels": labels,
            "special_tokens_mask": special}


def make_step(student, teacher, batch, objectives, info, seed=0, hidden_override=None) -> Step:
    """What the training step provides: one forward per model, capturing the layers the objectives need."""
    needs = Needs()
    for o in objectives:
        needs = needs | o.needs()
    inputs = model_inputs(batch, info.is_encoder)
    with intervene(student, capture=needs.student_layers) as s_cap:
        s_logits = student(**inputs).logits
    with torch.no_grad(), intervene(teacher, capture=needs.teacher_layers) as t_cap:
        t_logits = teacher(**inputs).logits
    s_hidden = {**s_cap, **(hidden_override or {})}
    return Step(batch=batch, student=ForwardResult(s_logits, s_hidden), teacher=ForwardResult(t_logits, dict(t_cap)),
                student_model=student, teacher_model=teacher, info=info, extras={"seed": seed})


def naive_counterfactual(model, inputs, plan, layers) -> torch.Tensor:
    """The algorithm spelled out with plain hooks: a separate source run, then a full counterfactual run."""
    blocks = find_blocks(model)[1]
    src = {}
    handles = [blocks[l].register_forward_hook(lambda m, a, o, l=l: src.__setitem__(l, o)) for l in layers]
    model(**inputs)
    for h in handles:
        h.remove()

    def writer(l):
        def hook(m, a, o):
            o = o.clone()
            o[plan.base.rows, plan.base.cols] = src[l][plan.source.rows, plan.source.cols]
            return o
        return hook

    handles = [blocks[l].register_forward_hook(writer(l)) for l in layers]
    try:
        return model(**inputs).logits
    finally:
        for h in handles:
            h.remove()


def naive_iit(student, teacher, batch, plan, pair, tau, is_encoder) -> torch.Tensor:
    inputs = model_inputs(batch, is_encoder)
    with torch.no_grad():
        t = naive_counterfactual(teacher, inputs, plan, pair.teacher)
    s = naive_counterfactual(student, inputs, plan, [pair.student])
    kl = tau**2 * (F.softmax(t / tau, -1) * (F.log_softmax(t / tau, -1) - F.log_softmax(s / tau, -1))).sum(-1)
    mask = batch["attention_mask"].float()
    return (kl * mask).sum() / mask.sum()


def test_both_objectives_are_registered():
    assert REGISTRY["iit"] is IITLoss and REGISTRY["iit_cosine"] is IITCosineLoss


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("pair", [{"teacher": [1, 2], "student": 1}, {"teacher": [3], "student": 2}],
                         ids=["middle", "last-blocks"])
def test_loss_and_gradients_equal_the_naive_three_pass_algorithm(arch, pair):
    # The step's shortcuts (no source pass, resumed prefix, base logits where the intervention cannot reach:
    # a decoder's positions before the span, every position but the span after the last block) change nothing.
    teacher, student, info = models(arch, student_layers=3)
    batch = make_batch(info.is_encoder)
    objective = IITLoss(IITSettings(alignment=[pair], temperature=2.0), info)
    step = make_step(student, teacher, batch, [objective], info, seed=5)
    out = objective(step)
    out["iit"].backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    plan = step.extras["_iit_counterfactuals"][objective._key].plan
    expected = naive_iit(student, teacher, batch, plan, objective.pairs[0], 2.0, info.is_encoder)
    expected.backward()
    assert out["iit"].item() > 1e-4
    assert torch.allclose(out["iit"], expected, atol=1e-5, rtol=1e-5)
    naive_grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert grads.keys() == naive_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, naive_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2"])
def test_a_student_identical_to_its_teacher_has_zero_loss_and_full_agreement(arch):
    teacher, _, _ = models(arch)
    student = copy.deepcopy(teacher)
    info = ModelInfo(is_encoder=arch == "tiny-bert", vocab_size=VOCAB, student_layers=4, student_hidden=64,
                     teacher_layers=4, teacher_hidden=64)
    settings = dict(alignment=[{"teacher": [1], "student": 1}, {"teacher": [3], "student": 3}], pair_sampling="all")
    objectives = [IITLoss(IITSettings(**settings), info), IITCosineLoss(IITCosineSettings(**settings), info)]
    batch = make_batch(info.is_encoder)
    step = make_step(student, teacher, batch, objectives, info)
    assert objectives[0](step)["iit"].abs().item() < 1e-6
    assert objectives[1](step)["iit_cosine"].abs().item() < 1e-6
    iia = interchange_agreement(student, teacher, [batch, make_batch(info.is_encoder, seed=1)],
                                objectives[0].pairs, is_encoder=info.is_encoder)
    predictions = iia.pop("iia/predictions")
    assert iia == {"iia/t1-s1": 1.0, "iia/t3-s3": 1.0, "iia/mean": 1.0} and predictions > 0


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-llama"])
def test_gradients_reach_the_student_through_source_and_counterfactual_but_not_the_teacher(arch):
    teacher, student, info = models(arch, student_hidden=32)
    student.train()
    batch = make_batch(info.is_encoder)
    settings = dict(alignment="full")
    iit, cos = IITLoss(IITSettings(**settings), info), IITCosineLoss(IITCosineSettings(**settings), info)
    step = make_step(student, teacher, batch, [iit, cos], info, seed=3)
    cf = iit.counterfactuals(step)
    assert not cf.results[0].teacher_logits.requires_grad
    (iit(step)["iit"] + cos(step)["iit_cosine"]).backward()
    assert all(p.grad is None for p in teacher.parameters())
    blocks = find_blocks(student)[1]
    # The source values come from the step's student graph: blocks up to the intervened one get gradient
    # from it; the counterfactual run trains the blocks above and the head.
    for i, block in enumerate(blocks):
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, f"block {i}"
    assert cos.proj.weight.grad is not None and cos.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("reuse", [False, True])
def test_source_values_carry_gradient_exactly_where_they_are_read(reuse):
    teacher, student, info = models("tiny-gpt2")
    batch = make_batch(False)
    objective = IITLoss(IITSettings(alignment=[{"teacher": [2], "student": 0}], reuse_base_prefix=reuse), info)
    probe = make_step(student, teacher, batch, [objective], info, seed=9)
    leaf = probe.student.hidden[0].detach().clone().requires_grad_()
    step = make_step(student, teacher, batch, [objective], info, seed=9, hidden_override={0: leaf})
    objective(step)["iit"].backward()
    plan = objective.counterfactuals(step).plan
    read_at = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    read_at[plan.source.rows, plan.source.cols] = True
    written = torch.zeros_like(read_at)
    written[plan.base.rows, plan.base.cols] = True
    touched = leaf.grad.abs().sum(-1) > 0
    if not reuse:  # the counterfactual recomputes its prefix: the leaf only feeds the source values
        assert torch.equal(touched, read_at)
    else:  # also the base prefix, except where the span overwrites it
        assert bool(touched[read_at].all())
        assert bool(touched[~written & (batch["attention_mask"] == 1)].all())
        assert not bool(touched[written & ~read_at].any())


def test_no_hook_or_swap_is_left_after_a_step_or_an_exception():
    teacher, student, info = models("tiny-bert")
    student.train()
    objective = IITLoss(IITSettings(alignment="full", pair_sampling="all"), info)

    def state():
        return [(tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for model in (student, teacher)
                for m in model.modules()], [list(find_blocks(m)[1]) for m in (student, teacher)]

    before = state()
    batch = make_batch(True)
    objective(make_step(student, teacher, batch, [objective], info))["iit"].backward()
    assert state() == before
    step = make_step(student, teacher, batch, [objective], info, seed=1)

    def fail(module, args):  # the LM head fails while IIT's hooks and stand-ins are in place
        raise RuntimeError("boom")

    boom = student.cls.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            objective(step)
    finally:
        boom.remove()
    assert state() == before


def test_iit_and_iit_cosine_share_one_counterfactual_computation():
    teacher, student, info = models("tiny-gpt2")
    calls = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    batch = make_batch(False)
    iit, cos = IITLoss(IITSettings(), info), IITCosineLoss(IITCosineSettings(), info)
    step = make_step(student, teacher, batch, [iit, cos], info)
    calls.clear()
    iit(step), cos(step)
    assert len(calls) == 1
    other = IITCosineLoss(IITCosineSettings(span_proportion=0.5), info)
    other(step)
    assert len(calls) == 2


def test_plans_are_reproducible_from_the_step_seed():
    teacher, student, info = models("tiny-bert")
    batch = make_batch(True)
    objective = IITLoss(IITSettings(), info)

    def loss(seed):
        step = make_step(student, teacher, batch, [objective], info, seed=seed)
        return objective(step)["iit"].item(), objective.counterfactuals(step)

    (a, cf_a), (b, cf_b) = loss(11), loss(11)
    assert a == b and torch.equal(cf_a.plan.base.cols, cf_b.plan.base.cols)
    others = [loss(s)[1] for s in range(12, 18)]
    assert any(not torch.equal(cf.plan.base.cols, cf_a.plan.base.cols) for cf in others)
    assert {cf.results[0].pair.student for cf in others + [cf_a]} == {0, 1}  # uniform_one visits both pairs
    # Without a seed in extras, the batch content decides.
    step = make_step(student, teacher, batch, [objective], info)
    step.extras.pop("seed")
    first = objective(step)["iit"].item()
    step.extras.pop("_iit_counterfactuals")
    assert objective(step)["iit"].item() == first


def test_all_pairs_is_the_mean_of_the_single_pairs():
    teacher, student, info = models("tiny-llama")
    batch = make_batch(False)
    both = IITLoss(IITSettings(alignment="full", pair_sampling="all"), info)
    total = both(make_step(student, teacher, batch, [both], info, seed=4))["iit"]
    singles = []
    for pair in both.pairs:
        one = IITLoss(IITSettings(alignment=[{"teacher": list(pair.teacher), "student": pair.student}]), info)
        singles.append(one(make_step(student, teacher, batch, [one], info, seed=4))["iit"])
    assert torch.allclose(total, torch.stack(singles).mean(), atol=1e-6)


def test_a_batch_of_one_is_refused():
    teacher, student, info = models("tiny-gpt2")
    batch = {k: v[:1] for k, v in make_batch(False).items()}
    objective = IITLoss(IITSettings(), info)
    with pytest.raises(ValueError, match="batch size of at least 2"):
        objective(make_step(student, teacher, batch, [objective], info))


def test_settings_and_sharing_them_between_the_two_terms():
    assert IITSettings().model_dump(exclude={"weight"}) == {
        "alignment": "full", "pair_sampling": "uniform_one", "span_proportion": 0.3, "include_special_tokens": False,
        "aligned_positions": False, "max_tokens": None, "reuse_base_prefix": True, "temperature": 2.0}
    with pytest.raises(ValueError):
        IITSettings(pair_sampling="some")
    with pytest.raises(ValueError):
        IITSettings(span_proportion=0)
    iit = IITSettings(weight=0.0, alignment="middle", span_proportion=0.2)
    shared = share_intervention_settings(iit, IITCosineSettings(weight=0.5))
    assert shared.alignment == "middle" and shared.span_proportion == 0.2 and shared.weight == 0.5
    with pytest.raises(ConfigError, match=r"objectives.iit_cosine.alignment \('late'\) differs"):
        share_intervention_settings(iit, IITCosineSettings(alignment="late"))
    assert share_intervention_settings(None, IITCosineSettings()) == IITCosineSettings()


# ------------------------------------------------------------------------------------------ IIA
@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2"])
def test_iia_of_an_untrained_student_is_a_fraction_and_reproducible(arch):
    teacher, student, info = models(arch, seed=1)
    student.train()
    batches = [make_batch(info.is_encoder, seed=s) for s in range(2)]
    a = interchange_agreement(student, teacher, batches, "full", is_encoder=info.is_encoder, seed=3)
    b = interchange_agreement(student, teacher, batches, "full", is_encoder=info.is_encoder, seed=3)
    assert a == b and set(a) == {"iia/t0_1-s0", "iia/t2_3-s1", "iia/mean", "iia/predictions"}
    a.pop("iia/predictions")
    assert all(0.0 <= v <= 1.0 for v in a.values())
    if info.is_encoder:  # a random decoder with tied embeddings predicts its input token: it may agree fully
        assert a["iia/mean"] < 1.0
    assert student.training and not teacher.training  # modes restored
    with pytest.raises(ConfigError, match=r"iia\.alignment\[0\]\.student"):
        interchange_agreement(student, teacher, batches, [{"teacher": [0], "student": 5}], is_encoder=info.is_encoder)


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2"])
def test_iia_counts_agreement_at_the_intervened_predictions(arch):
    teacher, _, info = models(arch)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a student close to its teacher: partial agreement
        for p in find_blocks(student)[1][3].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batches = [make_batch(info.is_encoder, batch=6, seq=20, seed=s) for s in range(2)]
    pair = {"teacher": [1, 2], "student": 1}
    got = interchange_agreement(student, teacher, batches, [pair], is_encoder=info.is_encoder, seed=4)
    agree = total = 0
    with torch.no_grad():
        for n, batch in enumerate(batches):
            plan = sample_plan(batch["attention_mask"], batch.get("special_tokens_mask"),
                               plan_generator(4 * 1_000_003 + n, _SALT))
            counted = prediction_mask(batch, plan.span_start, info.is_encoder)
            if info.is_encoder:
                assert torch.equal(counted, batch["labels"] != -100)
            else:  # every real position from the span start on
                cols = torch.arange(20)[None]
                assert torch.equal(counted, (cols >= plan.span_start[:, None]) & (batch["attention_mask"] == 1))
            inputs = model_inputs(batch, info.is_encoder)
            t = naive_counterfactual(teacher, inputs, plan, [1, 2]).argmax(-1)
            s = naive_counterfactual(student, inputs, plan, [1]).argmax(-1)
            agree += int(((t == s) & counted).sum())
            total += int(counted.sum())
    assert got["iia/t1_2-s1"] == agree / total and got["iia/predictions"] == total
    assert 0.0 < agree / total < 1.0


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2"])
def test_runs_inside_the_training_step_with_the_standard_objectives(arch):
    from raydistill.objectives import build_objectives
    from raydistill.train.step import DistillModule

    teacher, student, info = models(arch)
    student.train()
    settings = {name: REGISTRY[name].Settings(weight=0.2) for name in ("task", "kd", "cosine", "iit", "iit_cosine")}
    module = DistillModule(student, build_objectives(settings, info), info)
    batch = make_batch(info.is_encoder)
    loss, logs = module(batch, teacher, {"seed": 1, "step": 1})
    loss.backward()
    assert torch.isfinite(loss) and logs["iit"] > 0 and logs["iit_cosine"] > 0
    assert all(p.grad is None for p in teacher.parameters())
    expected = sum(0.2 * logs[k] for k in settings)
    assert torch.allclose(logs["loss"], expected, atol=1e-5)


_ZERO3_SCRIPT = r'''
import copy, json, os, socket, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
from raydistill.train.ds_config import import_deepspeed
deepspeed = import_deepspeed()  # as the workers import it (no JIT-compiled comm extension)
sys.path.insert(0, sys.argv[1])
from test_iit import REGISTRY, zero3_parts
out = {}
for arch in ("tiny-bert", "tiny-gpt2"):
    module, reference, teacher, batch = zero3_parts(arch)
    ds = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    t_ref = copy.deepcopy(teacher)
    engine = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-3), config=ds)[0]
    t_engine = deepspeed.initialize(model=teacher, config=ds)[0]
    partitioned = all(p.numel() == 0 for p in module.student.parameters())
    engine.eval()
    _, logs = engine(batch, t_engine.module, {"seed": 7})
    _, ref_logs = reference(batch, t_ref, {"seed": 7})
    engine.train()
    loss, _ = engine(batch, t_engine.module, {"seed": 8})
    engine.backward(loss)
    engine.step()
    hooks = [len(m._forward_hooks) for m in module.student.modules()]
    out[arch] = {"partitioned": partitioned, "iit": logs["iit"].item(), "ref_iit": ref_logs["iit"].item(),
                 "iit_cosine": logs["iit_cosine"].item(), "ref_iit_cosine": ref_logs["iit_cosine"].item(),
                 "finite": bool(torch.isfinite(loss))}
print("RESULT" + json.dumps(out))
'''


def zero3_parts(arch):
    """For the ZeRO-3 subprocess: a DistillModule with task, kd, iit and iit_cosine, an unsharded copy, the
    teacher and a batch."""
    from raydistill.objectives import build_objectives
    from raydistill.train.step import DistillModule

    teacher, student, info = models(arch)
    # kd and task give the step both models' base logits, and every pair runs (the student's second block is
    # its last), so the counterfactual head runs on chosen positions only, through DeepSpeed's hooks.
    settings = {name: REGISTRY[name].Settings() for name in ("task", "kd")}
    settings.update({name: REGISTRY[name].Settings(pair_sampling="all") for name in ("iit", "iit_cosine")})

    def build(s):
        return DistillModule(s, build_objectives(settings, info), info)

    return build(student), build(copy.deepcopy(student)), teacher, make_batch(info.is_encoder)


def test_works_when_zero3_partitions_both_models():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _ZERO3_SCRIPT, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    for arch, r in json.loads(lines[-1][len("RESULT"):]).items():
        assert r["partitioned"] and r["finite"], arch
        assert abs(r["iit"] - r["ref_iit"]) < 1e-5 and r["iit"] > 0, (arch, r)
        assert abs(r["iit_cosine"] - r["ref_iit_cosine"]) < 1e-5, (arch, r)


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2"])
def test_training_on_iit_lowers_the_loss_and_raises_agreement(arch):
    teacher, student, info = models(arch, seed=2)
    objective = IITLoss(IITSettings(alignment="full", pair_sampling="all"), info)
    batches = [make_batch(info.is_encoder, seed=s) for s in range(2)]
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)

    def loss_on(batch, seed):
        return objective(make_step(student, teacher, batch, [objective], info, seed=seed))["iit"]

    with torch.no_grad():
        before = sum(loss_on(b, 100 + i).item() for i, b in enumerate(batches))
    iia_before = interchange_agreement(student, teacher, batches, objective.pairs, is_encoder=info.is_encoder)
    for step in range(40):
        loss = loss_on(batches[step % 2], step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = sum(loss_on(b, 100 + i).item() for i, b in enumerate(batches))
    iia_after = interchange_agreement(student, teacher, batches, objective.pairs, is_encoder=info.is_encoder)
    assert after < 0.5 * before
    if info.is_encoder:  # a random decoder with tied embeddings already agrees almost everywhere (input token)
        assert iia_after["iia/mean"] > iia_before["iia/mean"] + 0.1, (iia_before, iia_after)


def test_bench_times_both_variants_on_the_same_models():
    from raydistill.bench.iit import bench_iit

    out = bench_iit(["tiny-bert", "tiny-llama"], batch_size=2, seq_len=16, steps=1, warmup=1, device="cpu")
    assert out["ratio"] is None and out["ratio_model"] == "bert-base"  # not among the models measured
    assert [r["model"] for r in out["rows"]] == ["tiny-bert", "tiny-llama"]
    for row in out["rows"]:
        assert row["standard_s"] > 0 and row["iit_s"] > 0
        assert abs(row["ratio"] - row["iit_s"] / row["standard_s"]) < 1e-2  # times are rounded
        # uniform_one: every aligned pair of `full` (4 -> 2 blocks) timed alone; iit is their mean.
        assert list(row["by_pair"]) == ["t0_1-s0", "t2_3-s1"]
        pair_mean = sum(p["iit_s"] for p in row["by_pair"].values()) / 2
        assert abs(row["iit_s"] - pair_mean) < 1e-3
        # Counted FLOPs: the lower pair repeats more blocks; iit adds work but less than a second step.
        low, high = (row["by_pair"][k]["flop_ratio"] for k in ("t0_1-s0", "t2_3-s1"))
        assert 1 < high < low < 2 and row["flop_ratio"] == pytest.approx((low + high) / 2, abs=1e-3)
    every = bench_iit(["tiny-gpt2"], batch_size=2, seq_len=16, steps=1, warmup=0, device="cpu", pair_sampling="all",
                      extra_sizes=[(3, 8)])
    assert list(every["rows"][0]["by_pair"]) == ["all"]
    # An extra size adds its own rows; the top-level figures stay the main size's.
    assert [(r["batch_size"], r["seq_len"]) for r in every["rows"]] == [(2, 16), (3, 8)]
    assert list(every["by_size"]) == ["2x16", "3x8"] and every["seq_len"] == 16
