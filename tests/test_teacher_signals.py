"""The teacher's top-K signals (``objectives.teacher_signals``): their definition, the canonical order that makes
a top-K a prefix-exact source of every top-k <= K, and the training step reading them from a batch (the teacher
cache's keys) with the same loss and gradients as computing them online, without running the teacher."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from raydistill.errors import ConfigError
from raydistill.objectives import REGISTRY, build_objectives
from raydistill.objectives.base import ForwardResult, ModelInfo, Needs, Step
from raydistill.objectives.teacher_signals import check_cache_columns, from_batch, teacher_topk, topk_ids
from raydistill.train.step import DistillModule, run_model

from test_host_reads import HostReads

V = 37


def test_needs_take_the_largest_k_and_the_teacher_runs_only_without_a_cache():
    needs = Needs(teacher_topk=16) | Needs(teacher_topk=64, student_logits=True) | Needs()
    assert needs.teacher_topk == 64 and not needs.teacher
    assert needs.teacher_runs() and not needs.teacher_runs(cached_topk=True)
    both = needs | Needs(teacher_layers=frozenset({1}))
    assert both.teacher and both.teacher_runs(cached_topk=True)


def test_values_are_the_full_vocabulary_log_softmax_sorted_descending():
    logits = torch.randn(2, 5, V, dtype=torch.float64).float() * 3
    got = teacher_topk(logits, 8)
    assert got.logprobs.dtype == torch.float32 and got.ids.dtype == torch.int64 and got.ids.shape == (2, 5, 8)
    ref = torch.log_softmax(logits.double(), -1)
    assert torch.allclose(got.logprobs.double(), ref.gather(-1, got.ids), atol=1e-6)
    assert (got.logprobs[..., :-1] >= got.logprobs[..., 1:]).all()
    assert torch.equal(got.ids, logits.topk(8, -1).indices)  # no ties: torch.topk's own order
    assert teacher_topk(logits, 10 * V).ids.shape[-1] == V  # capped at the vocabulary


def test_ties_are_broken_by_id_so_every_top_k_is_a_prefix_of_a_larger_one():
    """bf16 logits tie often; torch.topk alone orders ties differently for different k."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 16, 3000, generator=g)).bfloat16()
    reference = logits.float().sort(dim=-1, descending=True, stable=True).indices  # (logit desc, id asc)
    for k, big in ((1, 16), (16, 64), (64, 256)):
        assert torch.equal(topk_ids(logits, k), reference[..., :k])
        assert torch.equal(teacher_topk(logits, big).ids[..., :k], teacher_topk(logits, k).ids)
    assert topk_ids(torch.zeros(1, 1, 10), 3).tolist() == [[[0, 1, 2]]]
    assert topk_ids(torch.tensor([[[-0.0, 0.0, -1.0, 3.0]]]), 2).tolist() == [[[3, 0]]]  # -0 == +0


def test_top_k_in_chunks_equals_one_chunk_and_reads_the_host_once_whatever_the_chunks(monkeypatch):
    """Chunks bound the float32 normaliser's memory; the tie fix runs once after the last chunk, so a top-K over
    many chunks waits for the device once (twice when there are ties to fix: their rows), not once per chunk."""
    import raydistill.objectives.teacher_signals as ts

    g = torch.Generator().manual_seed(3)
    tied = (3 * torch.randn(4, 16, 3000, generator=g)).bfloat16()  # ties across the k-th place in some rows
    untied = torch.randn(4, 16, 3000, generator=g, dtype=torch.float64).float()
    whole = {name: teacher_topk(x, 16) for name, x in (("tied", tied), ("untied", untied))}
    monkeypatch.setattr(ts, "_CHUNK_ELEMENTS", 5 * 3000)  # 13 chunks of 5 positions
    for name, x, reads in (("tied", tied, 2), ("untied", untied, 1)):
        with HostReads() as mode:
            got = teacher_topk(x, 16)
        assert torch.equal(got.ids, whole[name].ids) and torch.equal(got.logprobs, whole[name].logprobs), name
        assert mode.count == reads, (name, mode.count)


def tiny_gpt2(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def kd_module(student, **settings):
    info = ModelInfo(False, V, 2, 16, 2, 16)
    return DistillModule(student, build_objectives({"kd": REGISTRY["kd"].Settings(**settings)}, info), info)


def batch_of(seed=1, B=2, T=12):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    ids = torch.randint(V, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
def test_a_step_from_cached_signals_equals_the_online_step_without_the_teacher(stored):
    teacher, batch = tiny_gpt2(0), batch_of()
    with torch.no_grad():
        cached = teacher_topk(teacher(input_ids=batch["input_ids"]).logits, 24)  # the cache holds K = 24 > 8
    cached_batch = {**batch, "teacher_topk_logprobs": cached.logprobs.to(stored),
                    "teacher_topk_ids": cached.ids.to(torch.int32)}
    results = []
    for b, t in ((batch, teacher), (cached_batch, None)):  # the cached step never sees a teacher
        student = tiny_gpt2(1)
        module = kd_module(student, top_k=8, temperature=2.0)
        counts = module.counts(b)
        loss, logs = module(b, t, counts=counts)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()], counts))
    (online, g_online, c_online), (from_cache, g_cache, c_cache) = results
    assert c_online == c_cache
    if stored is torch.float32:  # the same values: the same loss and gradients, bit for bit
        assert torch.equal(online, from_cache)
        assert all(torch.equal(a, b) for a, b in zip(g_online, g_cache))
    else:  # fp16 storage rounds the log-probabilities (relative 2^-11)
        assert from_cache.item() == pytest.approx(online.item(), rel=1e-3)
        diff = sum((a - b).square().sum() for a, b in zip(g_online, g_cache)).sqrt()
        norm = sum(a.square().sum() for a in g_online).sqrt()
        assert diff / norm < 1e-2, (diff / norm).item()


def test_mixed_needs_run_the_teacher_for_what_is_not_cached_and_too_few_columns_are_refused():
    teacher, batch = tiny_gpt2(0), batch_of()
    with torch.no_grad():
        cached = teacher_topk(teacher(input_ids=batch["input_ids"]).logits, 4)
    cached_batch = {**batch, "teacher_topk_logprobs": cached.logprobs.half(),
                    "teacher_topk_ids": cached.ids.int()}
    with pytest.raises(RuntimeError, match="needs the teacher"):  # full kd needs its logits: the teacher must run
        kd_module(tiny_gpt2(1))(cached_batch, None)
    assert kd_module(tiny_gpt2(1))(cached_batch, teacher)[0] > 0
    with pytest.raises(ValueError, match=r"holds the top 4 .* need the top 8 .*teacher_cache\.top_k to at least 8"):
        kd_module(tiny_gpt2(1), top_k=8)(cached_batch, None)
    got = from_batch(cached_batch, 3)
    assert got.logprobs.dtype == torch.float32 and got.ids.dtype == torch.int64 and got.ids.shape[-1] == 3
    assert from_batch(batch, 3) is None


def td_module(student, **settings):
    info = ModelInfo(False, V, 2, 16, 2, 16)
    return DistillModule(student, build_objectives({"td": REGISTRY["td"].Settings(**settings)}, info), info)


def run(module_of, batch, teacher):
    student = tiny_gpt2(1)
    loss, logs = module_of(student)(batch, teacher)
    loss.backward()
    return loss.detach(), logs, [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("space, stored", [({"k": 8}, torch.float16), ({"k": 8}, torch.float32),
                                           ({"kind": "top_p", "p": 0.5, "max_k": 20}, torch.float32)])
def test_td_from_cached_signals_equals_td_online_exactly(space, stored):
    """The same action sets, hence the same loss, logs and gradients bit for bit: top_k reads only the ids (exact
    from any storage); top_p cuts the nucleus on the probabilities (exact from float32 values). Online, the step
    (teacher_topk) gives what td computes from the teacher's logits itself on a hand-built step."""
    teacher, batch = tiny_gpt2(0), batch_of(seed=3)
    batch["labels"][0, :3] = -100
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"]).logits
    cached = teacher_topk(logits, 24)
    cached_batch = {**batch, "teacher_topk_logprobs": cached.logprobs.to(stored),
                    "teacher_topk_ids": cached.ids.to(torch.int32)}
    settings = dict(action_space=space, gamma=0.9)
    online = run(lambda s: td_module(s, **settings), batch, teacher)
    from_cache = run(lambda s: td_module(s, **settings), cached_batch, None)
    assert torch.equal(online[0], from_cache[0]) and online[1].keys() == from_cache[1].keys()
    assert all(torch.equal(online[1][k], from_cache[1][k]) for k in online[1])
    assert all(torch.equal(a, b) for a, b in zip(online[2], from_cache[2]))
    # The hand-built path: td's own action sets from the logits.
    student = tiny_gpt2(1)
    module = td_module(student, **settings)
    out = run_model(student, batch, frozenset(), None, logits=False, head=True)
    step = Step(batch=batch, student=out, teacher=ForwardResult(logits), student_model=student, teacher_model=None,
                info=module.info)
    assert torch.equal(module.objectives["td"](step)["td"], online[0])


def test_a_cache_with_too_few_columns_for_td_is_refused_naming_the_settings():
    info = ModelInfo(False, V, 2, 16, 2, 16)
    objectives = build_objectives({"td": REGISTRY["td"].Settings(action_space={"kind": "top_p", "max_k": 30}),
                                   "kd": REGISTRY["kd"].Settings(top_k=8)}, info)
    check_cache_columns(30, objectives)
    with pytest.raises(ConfigError, match=r"holds the top 16 .*objectives\.td \(30\) need the top 30 .*"
                                          r"objectives\.td\.action_space\.max_k .*teacher_cache\.top_k to at least 30"):
        check_cache_columns(16, objectives)
    teacher, batch = tiny_gpt2(0), batch_of()
    with torch.no_grad():
        cached = teacher_topk(teacher(input_ids=batch["input_ids"]).logits, 16)
    cached_batch = {**batch, "teacher_topk_logprobs": cached.logprobs.half(), "teacher_topk_ids": cached.ids.int()}
    with pytest.raises(ValueError, match=r"objectives\.td\.action_space\.k .*teacher_cache\.top_k to at least 30"):
        td_module(tiny_gpt2(1), action_space={"kind": "top_p", "max_k": 30})(cached_batch, None)
