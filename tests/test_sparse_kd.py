"""Sparse KD (``kd`` with ``top_k``): the K + 1 bucket KL against hand-computed values, full KD at K = V, the
data-processing bound and its monotone gap at tau = 1, gradients, and configuration."""

import math

import pytest
import torch

from raydistill.config import load_config
from raydistill.errors import ConfigError
from raydistill.objectives import REGISTRY, build_objectives
from raydistill.objectives.base import ForwardResult, ModelInfo, Step
from raydistill.objectives.kd import sparse_kl
from raydistill.objectives.soft_kl import soft_kl
from raydistill.objectives.teacher_signals import teacher_topk


def kd(vocab, **settings):
    info = ModelInfo(False, vocab, 2, 4, 2, 4)
    return build_objectives({"kd": REGISTRY["kd"].Settings(**settings)}, info)["kd"]


def step_of(student, teacher):
    B, T, _ = student.shape
    batch = {"attention_mask": torch.ones(B, T, dtype=torch.long), "labels": torch.full((B, T), -100)}
    return Step(batch=batch, student=ForwardResult(student), teacher=ForwardResult(teacher), student_model=None,
                teacher_model=None, info=None)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_hand_computed_on_five_tokens(tau):
    """Teacher p = [1/2, 1/4, 1/8, 1/16, 1/16], K = 2: buckets [1/2, 1/4 | rest 1/4]; tempered, the rest as if spread
    evenly over its 3 tokens: weights [(1/2)^(1/tau), (1/4)^(1/tau), 3 (1/12)^(1/tau)], normalised. A uniform
    student has buckets [1/5, 1/5 | 3/5] at any tau."""
    p = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    teacher = torch.tensor([[[math.log(x) for x in p]]])
    student = torch.zeros(1, 1, 5)
    w = [0.5 ** (1 / tau), 0.25 ** (1 / tau), 3 * (0.25 / 3) ** (1 / tau)]
    buckets = [x / sum(w) for x in w]
    expected = tau**2 * sum(b * math.log(b / q) for b, q in zip(buckets, (0.2, 0.2, 0.6)))
    got = kd(5, top_k=2, temperature=tau)(step_of(student, teacher))["kd"].item()
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_top_k_of_the_whole_vocabulary_is_full_kd(tau):
    g = torch.Generator().manual_seed(0)
    teacher, student = 3 * torch.randn(2, 6, 9, generator=g), 3 * torch.randn(2, 6, 9, generator=g)
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    sparse = kd(9, top_k=9, temperature=tau)(step_of(a, teacher))["kd"]
    full = kd(9, temperature=tau)(step_of(b, teacher))["kd"]
    assert sparse.item() == pytest.approx(full.item(), rel=1e-6)
    sparse.backward()
    full.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_at_tau_one_the_buckets_bound_full_kd_and_the_gap_shrinks_with_k():
    """Coarse-graining both distributions by the same partition cannot increase their KL, and the top-(K+1)
    partition refines the top-K one, so the bucketed KL rises towards the full KL as K grows."""
    g = torch.Generator().manual_seed(1)
    vocab = 50
    teacher, student = 4 * torch.randn(3, 7, vocab, generator=g), 2 * torch.randn(3, 7, vocab, generator=g)
    full = soft_kl(teacher, student, 1.0)
    previous = torch.zeros_like(full)
    for k in (1, 2, 4, 8, 16, 32, 49, 50):
        value = sparse_kl(teacher_topk(teacher, k), student, 1.0)
        assert (value <= full + 1e-5).all() and (value >= previous - 1e-5).all(), k
        previous = value
    assert torch.allclose(previous, full, atol=1e-5)


def test_gradients_reach_the_student_logits():
    g = torch.Generator().manual_seed(2)
    teacher = 3 * torch.randn(2, 3, 12, generator=g, dtype=torch.float64)
    student = torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    topk = teacher_topk(teacher, 4)
    topk.logprobs = topk.logprobs.double()
    assert torch.autograd.gradcheck(lambda s: sparse_kl(topk, s, 2.0), (student,))
    loss = kd(12, top_k=4)(step_of(student, teacher))["kd"]
    loss.backward()
    assert torch.isfinite(student.grad).all() and (student.grad != 0).any()


def test_needs_and_configuration():
    assert kd(50, top_k=16).needs().teacher_topk == 16 and not kd(50, top_k=16).needs().teacher
    assert kd(50).needs().teacher_logits and kd(50).needs().teacher_topk == 0
    with pytest.raises(ConfigError, match=r"objectives\.kd\.top_k: 51 exceeds the vocabulary \(50 tokens\)"):
        kd(50, top_k=51)
    with pytest.raises(ConfigError, match=r"objectives\.kd\.top_k: .*greater than or equal to 1"):
        load_config(None, ["teacher.name=tiny-gpt2", "objectives.kd.weight=1", "objectives.kd.top_k=0"])
    assert load_config(None, ["teacher.name=tiny-gpt2", "objectives.kd.top_k=64"]).objectives.kd.top_k == 64


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_a_flat_tail_is_tempered_exactly(tau):
    """Where teacher and student are each flat outside the teacher's top K, the rest bucket's even spread is the
    truth and the bucketing loses nothing: sparse KD equals full KD at any temperature."""
    vocab, k = 40, 5
    g = torch.Generator().manual_seed(3)
    teacher, student = torch.full((2, 3, vocab), -2.0), torch.full((2, 3, vocab), 1.0)
    teacher[..., :k] = 2 * torch.rand(2, 3, k, generator=g)  # all above the tail
    student[..., :k] = 2 * torch.randn(2, 3, k, generator=g)
    sparse = sparse_kl(teacher_topk(teacher, k), student, tau)
    assert torch.allclose(sparse, soft_kl(teacher, student, tau), rtol=1e-5, atol=1e-6)


def test_bench_sparse_kd_runs_on_a_small_text(tmp_path):
    """``raydistill bench sparse-kd`` end to end on a tiny corpus and a few steps: one row per (tau, K) and per
    (tau, S) at K = distill_k; at tau = 1 the top-K gap is in [0, 1] and shrinks with K (the bound above, on a
    model's logits); three students."""
    from raydistill.bench.sparse_kd import bench_sparse_kd, table

    words = "the of and to in a is was for on as with by at from that his her it an were are which".split()
    g = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(words[i] for i in torch.randint(len(words), (12,), generator=g).tolist())
                     for _ in range(400))
    (tmp_path / "train.txt").write_text(text)
    result = bench_sparse_kd(ks=(4, 16), text=str(tmp_path / "train.txt"), teacher_steps=2, student_steps=1,
                             distill_steps=1, eval_blocks=2, batch=2, seq=16, vocab_size=200, distill_k=8,
                             tail_samples=(2,), draws=2, distill_samples=2)
    rows = {(r["temperature"], r["k"], r["tail_samples"]): r for r in result["rows"]}
    assert set(rows) == {(t, k, s) for t in (1.0, 2.0) for k, s in ((4, 0), (16, 0), (8, 2))}
    assert 0 <= rows[1.0, 16, 0]["gap"] <= rows[1.0, 4, 0]["gap"] <= 1
    assert rows[1.0, 8, 2]["draws"] == 2 and rows[1.0, 8, 2]["gap_sd"] >= 0
    assert [d["objective"] for d in result["distilled"]] == ["kd", "kd top_k=8", "kd top_k=8 tail_samples=2"]
    assert "target: |gap| at K=64" in table(result)
