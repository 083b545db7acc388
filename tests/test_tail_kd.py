"""Sampled sparse KD (``kd`` with ``top_k`` and ``tail_samples``): hand-computed values, unbiasedness at any tau
(value and gradient, over a grid of uniforms and over hashed seeds) where top-K alone is biased, exactness where
the samples cover the tail, the counter-based draw's determinism, the step online against cached samples, and
refusals."""

import math

import pytest
import torch

from raydistill.config import load_config
from raydistill.errors import ConfigError
from raydistill.objectives import REGISTRY, build_objectives
from raydistill.objectives import teacher_signals as TS
from raydistill.objectives.base import ForwardResult, ModelInfo, Needs, Step
from raydistill.objectives.kd import sampled_kl, sparse_kl
from raydistill.objectives.soft_kl import soft_kl
from raydistill.objectives.teacher_signals import sample_tail, tail_uniforms, teacher_tail, teacher_topk
from raydistill.train.step import DistillModule

P5 = [0.5, 0.25, 0.125, 0.0625, 0.0625]


def kd(vocab, **settings):
    info = ModelInfo(False, vocab, 2, 4, 2, 4)
    return build_objectives({"kd": REGISTRY["kd"].Settings(**settings)}, info)["kd"]


def grid(rows: int, n: int) -> torch.Tensor:
    """n uniforms at the midpoints of n equal cells, for each of ``rows`` rows: averaging an estimator over them
    is systematic sampling with n x S points, so the average converges to the expectation as 1 / n."""
    return ((torch.arange(n, dtype=torch.float64) + 0.5) / n).expand(rows, n)


def estimate(teacher, student, k, s, u, tau=1.0):
    """Values (rows x n) and mean gradient (rows x V) of the sampled estimator for each row's uniforms ``u``."""
    rows, n = u.shape
    t = teacher.reshape(rows, 1, -1).expand(rows, n, -1)
    z = student.reshape(rows, 1, -1).expand(rows, n, -1).clone().requires_grad_(True)
    top = teacher_topk(t, k)
    values = sampled_kl(top, sample_tail(t, top.ids, s, u, tau), z, tau)
    values.mean(1).sum().backward()
    return values.detach(), z.grad.sum(1)


def full_kd(teacher, student, tau=1.0):
    z = student.clone().requires_grad_(True)
    value = soft_kl(teacher, z, tau)
    value.sum().backward()
    return value.detach(), z.grad


@pytest.mark.parametrize("tau, u, drawn", [(1.0, 0.3, (2, 3)), (1.0, 0.6, (2, 4)), (1.0, 0.9, (2, 4)),
                                           (2.0, 0.3, (2, 3)), (2.0, 0.9, (3, 4))])
def test_hand_computed_on_five_tokens(tau, u, drawn):
    """p = [1/2, 1/4, 1/8, 1/16, 1/16], K = 2: the tail is ids 2, 3, 4. At tau = 1 it has the distribution
    [1/2, 1/4, 1/4] (CDF [1/2, 3/4, 1], mass W = r = 1/4); S = 2 points (u + s) / 2: u = 0.3 gives 0.15 and 0.65
    (ids 2 and 3), u = 0.6 gives 0.3 and 0.8 (ids 2, 4), u = 0.9 gives 0.45 and 0.95 (ids 2, 4). At tau = 2 the
    tempered tail p^(1/2) = [0.354, 0.25, 0.25] (W = 0.854) has CDF [0.414, 0.707, 1]: u = 0.9 now gives ids 3
    and 4. The estimate is tau^2 times the exact top-2 terms plus (W / Z) / 2 per draw, Z = sum_top p^(1/tau) + W,
    against a uniform student (q = 1/5)."""
    teacher = torch.tensor([[[math.log(x) for x in P5]]])
    top = teacher_topk(teacher, 2)
    tail = sample_tail(teacher, top.ids, 2, torch.tensor([[u]], dtype=torch.float64), tau)
    assert tail.ids.flatten().tolist() == list(drawn)
    assert torch.allclose(tail.logprobs.flatten(), torch.tensor([math.log(P5[j]) for j in drawn]))
    w_tail = sum(p ** (1 / tau) for p in P5[2:])
    assert tail.log_mass.item() == pytest.approx(math.log(w_tail), rel=1e-6)
    z = P5[0] ** (1 / tau) + P5[1] ** (1 / tau) + w_tail
    atoms = [(P5[i] ** (1 / tau) / z, P5[i]) for i in (0, 1)] + [(w_tail / z / 2, P5[j]) for j in drawn]
    expected = tau**2 * sum(w * (math.log(p) / tau - math.log(z) - math.log(0.2)) for w, p in atoms)
    assert sampled_kl(top, tail, torch.zeros(1, 1, 5), tau).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_unbiased_where_top_k_alone_is_not(tau):
    """The mean over uniforms of the estimated value and of its gradient w.r.t. the student's logits is full KD's,
    at any temperature (the draw is from the tempered tail, whose mass is known); top-K with a rest bucket stays
    off at tau >= 1 (at tau = 1 exactly by the tail's KL, r KL(p_tail || q_tail), which it cannot see)."""
    g = torch.Generator().manual_seed(0)
    vocab, k, s = 30, 4, 3
    teacher, student = 3 * torch.randn(4, 1, vocab, generator=g), 2 * torch.randn(4, 1, vocab, generator=g)
    full, g_full = full_kd(teacher, student, tau)
    values, g_mean = estimate(teacher, student, k, s, grid(4, 4096), tau)
    assert torch.allclose(values.mean(1), full.flatten(), rtol=2e-4)
    assert torch.allclose(g_mean, g_full.squeeze(1), atol=2e-4)
    top_only = sparse_kl(teacher_topk(teacher, k), student, tau).flatten()
    if tau >= 1:  # sharpened (tau < 1), this teacher's tail barely matters and the rest bucket is nearly exact
        assert ((full.flatten() - top_only).abs() / full.flatten()).max() > 0.1
        assert values.std(1).max() > 0.1  # a single draw is an estimate, not the value


def test_unbiased_over_hashed_uniforms():
    """The same with the uniforms the training step uses (``tail_uniforms`` of 2000 seeds): the means agree within
    4 standard errors, and the uniforms themselves are uniform (mean, quartiles)."""
    g = torch.Generator().manual_seed(1)
    vocab, k, s, n = 40, 3, 2, 2000
    teacher, student = 3 * torch.randn(1, 1, vocab, generator=g), 2 * torch.randn(1, 1, vocab, generator=g)
    ids = torch.randint(vocab, (1, 16), generator=g)
    u = torch.stack([tail_uniforms(ids, seed)[0, 5] for seed in range(n)]).view(1, n)
    assert abs(u.mean().item() - 0.5) < 4 * (1 / 12 / n) ** 0.5
    for q in (0.25, 0.5, 0.75):
        assert abs((u < q).double().mean().item() - q) < 4 * (q * (1 - q) / n) ** 0.5
    full, _ = full_kd(teacher, student)
    values, _ = estimate(teacher, student, k, s, u)
    assert abs(values.mean().item() - full.item()) < 4 * values.std().item() / n ** 0.5


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_samples_covering_the_tail_give_full_kd_exactly(tau):
    """A tempered tail whose probabilities are multiples of W / S is drawn exactly (systematic points land on each
    token S p_j^(1/tau) / W times for every u off the CDF's steps): two equal tokens (K = 3) with S = 2 or 4 at any
    tau, and [1/2, 1/4, 1/4] (K = 2) with S = 4 or 8 at tau = 1. A one-token tail likewise; K = V has no tail. In
    each case the value and gradient are full KD's."""
    g = torch.Generator().manual_seed(2)
    teacher = torch.tensor([[[math.log(x) for x in (0.4, 0.3, 0.15, 0.075, 0.075)]]]).expand(1, 5, 5)
    student = 2 * torch.randn(1, 5, 5, generator=g)
    u = torch.tensor([[0.01, 0.2, 0.4, 0.77, 0.999]], dtype=torch.float64)
    cases = ((3, 2), (3, 4), (4, 3), (5, 2)) + (((2, 4), (2, 8)) if tau == 1.0 else ())
    for k, s in cases:
        full, g_full = full_kd(teacher, student, tau)
        z = student.clone().requires_grad_(True)
        top = teacher_topk(teacher, k)
        value = sampled_kl(top, sample_tail(teacher, top.ids, s, u, tau), z, tau)
        value.sum().backward()
        assert torch.allclose(value, full, rtol=1e-5), (k, s)
        assert torch.allclose(z.grad, g_full, atol=1e-6), (k, s)


def test_gradcheck_and_empty_tails():
    g = torch.Generator().manual_seed(4)
    teacher = 3 * torch.randn(2, 3, 12, generator=g, dtype=torch.float64)
    student = torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    top = teacher_topk(teacher, 4)
    tail = teacher_tail(teacher, top.ids, 5, torch.zeros(2, 3, dtype=torch.long), 0, 2.0)
    top.logprobs, tail.logprobs, tail.log_mass = top.logprobs.double(), tail.logprobs.double(), tail.log_mass.double()
    assert torch.autograd.gradcheck(lambda z: sampled_kl(top, tail, z, 2.0), (student,))
    # A teacher with no mass outside its top K (r = 0 in float): the samples weigh nothing, no NaN.
    peaked = torch.full((1, 2, 12), -200.0)
    peaked[..., 0] = 0.0
    top = teacher_topk(peaked, 2)
    value = sampled_kl(top, sample_tail(peaked, top.ids, 3, torch.rand(1, 2).double()), student[:1, :2], 1.0)
    assert torch.allclose(value, sparse_kl(top, student[:1, :2], 1.0))
    # K = V: the tail is empty, its mass 0 (log -inf), and the value is full KD's.
    top = teacher_topk(teacher, 12)
    tail = sample_tail(teacher, top.ids, 2, torch.rand(2, 3).double())
    assert torch.isneginf(tail.log_mass).all()
    assert torch.allclose(sampled_kl(top, tail, student, 1.0), soft_kl(teacher, student, 1.0))


def test_the_draw_is_a_function_of_the_batch_and_seed_and_works_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(5)
    logits, ids = 3 * torch.randn(3, 7, 50, generator=g), torch.randint(50, (3, 7), generator=g)
    top = teacher_topk(logits, 6)
    a = teacher_tail(logits, top.ids, 8, ids, 11)
    assert torch.equal(a.ids, teacher_tail(logits, top.ids, 8, ids.clone(), 11).ids)
    assert not torch.equal(a.ids, teacher_tail(logits, top.ids, 8, ids, 12).ids)
    # Never a top-K token; ascending within a position (id-order CDF, increasing points).
    assert not (a.ids.unsqueeze(-1) == top.ids.unsqueeze(-2)).any()
    assert (a.ids.diff(dim=-1) >= 0).all()
    assert torch.allclose(a.logprobs, logits.log_softmax(-1).gather(-1, a.ids))
    u = tail_uniforms(ids, 11)
    assert u.dtype == torch.float64 and ((u >= 0) & (u < 1)).all() and u.unique().numel() == u.numel()
    # Each position's draw depends on its whole row: change one token, every position of that row moves.
    other = ids.clone()
    other[0, 6] = (other[0, 6] + 1) % 50
    changed = tail_uniforms(other, 11) != u
    assert changed[0].all() and not changed[1:].any()
    monkeypatch.setattr(TS, "_TAIL_ELEMENTS", 50 * 2)  # two positions at a time
    b = teacher_tail(logits, top.ids, 8, ids, 11)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)


def tiny_gpt2(seed, vocab=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()


def test_a_step_from_cached_samples_equals_the_online_step_bit_for_bit():
    """The training step draws the tail with ``extras['step_seed']``; the same samples in the batch (as the cache's
    fill stores them) give the same loss and gradients without the teacher."""
    teacher = tiny_gpt2(0)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(64, (2, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    top = teacher_topk(logits, 8)
    tail = teacher_tail(logits, top.ids, 4, ids, 1234, 2.0)
    cached = {**batch, "teacher_topk_logprobs": top.logprobs, "teacher_topk_ids": top.ids.int(),
              "teacher_tail_logprobs": tail.logprobs, "teacher_tail_ids": tail.ids.int(),
              "teacher_tail_log_mass": tail.log_mass}
    info = ModelInfo(False, 64, 2, 16, 2, 16)
    results = []
    for b, t in ((batch, teacher), (cached, None)):
        student = tiny_gpt2(1)
        module = DistillModule(student, build_objectives(
            {"kd": REGISTRY["kd"].Settings(top_k=8, tail_samples=4, temperature=2.0)}, info), info)
        loss, _ = module(b, t, extras={"step_seed": 1234})
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    # Another step's seed draws other samples: another loss.
    module = DistillModule(tiny_gpt2(1), build_objectives(
        {"kd": REGISTRY["kd"].Settings(top_k=8, tail_samples=4, temperature=2.0)}, info), info)
    assert module(batch, teacher, extras={"step_seed": 99})[0] != a
    with pytest.raises(ValueError, match="holds 2 tail samples per position, the objectives read 4"):
        module({**cached, "teacher_tail_logprobs": tail.logprobs[..., :2], "teacher_tail_ids": tail.ids[..., :2]},
               None)


def test_needs_and_configuration():
    assert kd(50, top_k=16, tail_samples=8).needs().teacher_tail == (16, 8, 2.0)
    assert kd(50, top_k=16).needs().teacher_tail[1] == 0 and kd(50).needs().teacher_tail[1] == 0
    assert (Needs(teacher_tail=(16, 8, 1.0)) | Needs(teacher_topk=32)).teacher_tail == (16, 8, 1.0)
    with pytest.raises(ConfigError, match=r"\(top_k, tail_samples, temperature\) \(16, 8, 1.0\) and \(16, 8, 2.0\)"):
        Needs(teacher_tail=(16, 8, 1.0)) | Needs(teacher_tail=(16, 8, 2.0))
    with pytest.raises(ConfigError, match=r"objectives.kd.tail_samples: 8 .*top_k is null.*allowed: 0, or set "
                                          r"objectives.kd.top_k"):
        load_config(None, ["teacher.name=tiny-gpt2", "objectives.kd.tail_samples=8"])
    with pytest.raises(ConfigError, match=r"objectives.kd.tail_samples.*greater than or equal to 0"):
        load_config(None, ["teacher.name=tiny-gpt2", "objectives.kd.top_k=8", "objectives.kd.tail_samples=-1"])
    cfg = load_config(None, ["teacher.name=tiny-gpt2", "objectives.kd.top_k=8", "objectives.kd.tail_samples=4"])
    assert cfg.objectives.kd.tail_samples == 4
