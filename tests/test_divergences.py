"""The fused, chunked divergences of reverse_kl, jsd, skew_kl, skew_reverse_kl and tvd: hand-computed values,
an independent float64 numpy reference, float64 gradchecks of every kernel, their defining properties, and the
objectives through a Step."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from raydistill.objectives import REGISTRY, build_objectives
from raydistill.objectives import soft_kl as soft_kl_module
from raydistill.objectives.base import ForwardResult, ModelInfo, Step
from raydistill.objectives.divergences import (generalized_jsd, reverse_kl, skew_kl, skew_reverse_kl,
                                               total_variation)
from raydistill.objectives.soft_kl import soft_kl

NAMES = ("reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


@pytest.fixture
def tiny_chunks(monkeypatch):
    # 3 rows of 7 per chunk (the kernels share soft_kl's chunking): the rows are cut into chunks, the last one short.
    monkeypatch.setitem(soft_kl_module._CHUNK_ELEMENTS, "cpu", 21)


# ------------------------------------------------------------------------------------- independent reference
def _softmax(z, tau):
    z = np.asarray(z, dtype=np.float64) / tau
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(a, b):
    return (a * (np.log(a) - np.log(b))).sum(-1)


def reference(name, t, s, tau=1.0, beta=0.5, skew=0.1):
    """float64 numpy values of each divergence, written from the definitions."""
    p, q = _softmax(t, tau), _softmax(s, tau)
    if name == "forward_kl":
        return tau**2 * _kl(p, q)
    if name == "reverse_kl":
        return tau**2 * _kl(q, p)
    if name == "jsd":
        if beta == 0:
            return tau**2 * _kl(p, q)
        if beta == 1:
            return tau**2 * _kl(q, p)
        m = beta * p + (1 - beta) * q
        return tau**2 * (beta * _kl(p, m) + (1 - beta) * _kl(q, m))
    if name == "skew_kl":
        return tau**2 * _kl(p, skew * p + (1 - skew) * q)
    if name == "skew_reverse_kl":
        return tau**2 * _kl(q, skew * q + (1 - skew) * p)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    raise KeyError(name)


def divergence(name, t, s, tau=1.0, beta=0.5, skew=0.1):
    """The kernel under test for ``name``."""
    return {"reverse_kl": lambda: reverse_kl(t, s, tau),
            "jsd": lambda: generalized_jsd(t, s, tau, beta),
            "skew_kl": lambda: skew_kl(t, s, tau, skew),
            "skew_reverse_kl": lambda: skew_reverse_kl(t, s, tau, skew),
            "tvd": lambda: total_variation(t, s, tau)}[name]()


# ------------------------------------------------------------------------------------------- hand-computed
# Teacher logits [0, ln 3] give p = [1/4, 3/4]; student logits [0, 0] give q = [1/2, 1/2].
T2 = torch.tensor([[0.0, math.log(3.0)]])
S2 = torch.zeros(1, 2)
L2, L3, L5 = math.log(2.0), math.log(3.0), math.log(5.0)
HAND = {
    # KL(q || p) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    "reverse_kl": 0.5 * (2 * L2 - L3),
    # m = [3/8, 5/8]: 1/2 [1/4 ln(2/3) + 3/4 ln(6/5)] + 1/2 [1/2 ln(4/3) + 1/2 ln(4/5)]
    "jsd": 0.5 * (0.25 * (L2 - L3) + 0.75 * (L2 + L3 - L5)) + 0.5 * (0.5 * (2 * L2 - L3) + 0.5 * (2 * L2 - L5)),
    # m = 0.1 p + 0.9 q = [0.475, 0.525]
    "skew_kl": 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525),
    # m = 0.1 q + 0.9 p = [0.275, 0.725]
    "skew_reverse_kl": 0.5 * math.log(0.5 / 0.275) + 0.5 * math.log(0.5 / 0.725),
    # 1/2 (|1/4 - 1/2| + |3/4 - 1/2|)
    "tvd": 0.25,
}


@pytest.mark.parametrize("name", NAMES)
def test_hand_computed_two_token_values(name):
    got = divergence(name, T2, S2)
    assert got.shape == (1,) and got.dtype == torch.float32
    assert got.item() == pytest.approx(HAND[name], abs=1e-6)
    # At tau = 2 the logits [0, 2 ln 3] give the same p: the KL family is scaled by tau^2, the distance is not.
    factor = 1.0 if name == "tvd" else 4.0
    assert divergence(name, 2 * T2, S2, tau=2.0).item() == pytest.approx(factor * HAND[name], abs=1e-6)


def test_hand_computed_jsd_endpoints_and_skew_one():
    forward = 0.25 * -L2 + 0.75 * (L3 - L2)  # KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2)
    assert generalized_jsd(T2, S2, 1.0, 0.0).item() == pytest.approx(forward, abs=1e-6)
    assert generalized_jsd(T2, S2, 1.0, 1.0).item() == pytest.approx(HAND["reverse_kl"], abs=1e-6)
    assert skew_kl(T2, S2, 1.0, 0.0).item() == pytest.approx(forward, abs=1e-6)
    assert skew_reverse_kl(T2, S2, 1.0, 0.0).item() == pytest.approx(HAND["reverse_kl"], abs=1e-6)
    assert skew_kl(T2, S2, 1.0, 1.0).item() == 0.0 and skew_reverse_kl(T2, S2, 1.0, 1.0).item() == 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
def test_values_match_float64_numpy_reference(tiny_chunks, name, tau):
    torch.manual_seed(0)
    t, s = 2 * torch.randn(2, 5, 7), 2 * torch.randn(2, 5, 7)
    for beta, skew in ((0.5, 0.1), (0.2, 0.7), (0.9, 0.02)):
        got = divergence(name, t, s, tau, beta, skew)
        want = reference(name, t.numpy(), s.numpy(), tau, beta, skew)
        assert got.shape == (2, 5)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_jsd_follows_trl_kl_div_orientation():
    # TRL: F.kl_div(input=log m, target=log p, log_target=True) is KL(p || m), weighted by beta for the teacher.
    torch.manual_seed(1)
    t, s = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    beta = 0.3
    log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), 0)
    kl_teacher = torch.nn.functional.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    kl_student = torch.nn.functional.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(generalized_jsd(t, s, 1.0, beta), beta * kl_teacher + (1 - beta) * kl_student)
    # beta = 0: F.kl_div(log q, log p) = KL(p || q); beta = 1: F.kl_div(log p, log q) = KL(q || p).
    torch.testing.assert_close(generalized_jsd(t, s, 1.0, 0.0),
                               torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1))
    torch.testing.assert_close(generalized_jsd(t, s, 1.0, 1.0),
                               torch.nn.functional.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1))


# ------------------------------------------------------------------------------------------------ gradients
GRAD_CASES = [("reverse_kl", 0.5, 0.1), ("jsd", 0.5, 0.1), ("jsd", 0.15, 0.1), ("jsd", 0.0, 0.1), ("jsd", 1.0, 0.1),
              ("skew_kl", 0.5, 0.1), ("skew_kl", 0.5, 0.6), ("skew_kl", 0.5, 0.0), ("skew_kl", 0.5, 1.0),
              ("skew_reverse_kl", 0.5, 0.1), ("skew_reverse_kl", 0.5, 0.6), ("skew_reverse_kl", 0.5, 0.0),
              ("skew_reverse_kl", 0.5, 1.0), ("tvd", 0.5, 0.1)]


@pytest.mark.parametrize("name,beta,skew", GRAD_CASES)
def test_gradcheck_float64_student_and_teacher(tiny_chunks, name, beta, skew):
    torch.manual_seed(2)
    t = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: divergence(name, a, b, 1.5, beta, skew), (t, s))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_autograd_of_the_plain_formula(tiny_chunks, name):
    def plain(t, s, tau=1.3, beta=0.3, skew=0.2):
        lp, lq = (t / tau).log_softmax(-1), (s / tau).log_softmax(-1)
        p, q = lp.exp(), lq.exp()
        kl = lambda a, la, lb: (a * (la - lb)).sum(-1)  # noqa: E731
        if name == "reverse_kl":
            return tau**2 * kl(q, lq, lp)
        if name == "jsd":
            lm = (beta * p + (1 - beta) * q).log()
            return tau**2 * (beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm))
        if name == "skew_kl":
            return tau**2 * kl(p, lp, (skew * p + (1 - skew) * q).log())
        if name == "skew_reverse_kl":
            return tau**2 * kl(q, lq, (skew * q + (1 - skew) * p).log())
        return 0.5 * (p - q).abs().sum(-1)

    torch.manual_seed(3)
    t = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 5, dtype=torch.float64)
    got = divergence(name, t, s, 1.3, 0.3, 0.2)
    (got * weights).sum().backward()
    gt, gs = t.grad.clone(), s.grad.clone()
    t.grad = s.grad = None
    want = plain(t, s)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gs, s.grad)
    torch.testing.assert_close(gt, t.grad)


# ----------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", NAMES)
def test_zero_for_identical_logits(name):
    torch.manual_seed(4)
    z = torch.randn(2, 3, 11, requires_grad=True)
    for beta, skew in ((0.0, 0.0), (0.4, 0.1), (1.0, 1.0)):
        got = divergence(name, z, z.detach().clone(), 2.0, beta, skew)
        assert got.abs().max().item() < 1e-6
        got.sum().backward()
        assert z.grad.abs().max().item() < 1e-6
        z.grad = None


@pytest.mark.parametrize("name", NAMES)
def test_non_negative(name):
    torch.manual_seed(5)
    t, s = 3 * torch.randn(64, 13), 3 * torch.randn(64, 13)
    for beta, skew in ((0.01, 0.01), (0.5, 0.5), (0.99, 0.99)):
        got = divergence(name, t, s, 1.0, beta, skew)
        assert got.min().item() >= -1e-6 and got.max().item() > 0


def test_jsd_endpoints_are_the_kls_and_the_interior_approaches_them_scaled():
    torch.manual_seed(6)
    t, s = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    forward, reverse = soft_kl(t, s, 1.7), soft_kl(s, t, 1.7)
    assert torch.equal(generalized_jsd(t, s, 1.7, 0.0), forward)
    assert torch.equal(generalized_jsd(t, s, 1.7, 1.0), reverse)
    torch.testing.assert_close(reverse_kl(t, s, 1.7), reverse)
    # TRL's convention: the mixture formula vanishes at the ends, JSD_beta ~ beta KL(p||q), ~ (1-beta) KL(q||p).
    eps = 1e-6
    torch.testing.assert_close(generalized_jsd(t, s, 1.7, eps) / eps, forward, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(generalized_jsd(t, s, 1.7, 1 - eps) / eps, reverse, rtol=1e-4, atol=1e-8)
    # JSD_beta(p, q) = JSD_{1-beta}(q, p); beta = 1/2 is symmetric.
    torch.testing.assert_close(generalized_jsd(t, s, 1.7, 0.3), generalized_jsd(s, t, 1.7, 0.7))
    torch.testing.assert_close(generalized_jsd(t, s, 1.7, 0.5), generalized_jsd(s, t, 1.7, 0.5))


def test_skew_limits():
    torch.manual_seed(7)
    t = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    s = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.equal(skew_kl(t, s, 2.0, 0.0), soft_kl(t, s, 2.0))
    assert torch.equal(skew_reverse_kl(t, s, 2.0, 0.0), soft_kl(s, t, 2.0))
    # Continuous at skew 0 (the mixture tends to the other distribution).
    torch.testing.assert_close(skew_kl(t, s, 2.0, 1e-9), soft_kl(t, s, 2.0), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(skew_reverse_kl(t, s, 2.0, 1e-9), soft_kl(s, t, 2.0), rtol=1e-6, atol=1e-8)
    # Skew 1: the distribution against itself, 0 with zero gradients (a graph remains).
    for fn in (skew_kl, skew_reverse_kl):
        got = fn(t, s, 2.0, 1.0)
        assert got.shape == (5,) and got.dtype == torch.float64 and not got.any()
        got.sum().backward()
        assert not t.grad.any() and not s.grad.any()
        t.grad = s.grad = None
    # Skew KL is the KL to a mixture that is never far: it decreases with the skew.
    values = [skew_kl(t, s, 2.0, lam).sum().item() for lam in (0.0, 0.1, 0.5, 0.9)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        skew_kl(t, s, 2.0, 1.5)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        generalized_jsd(t, s, 2.0, -0.1)


def test_tvd_bounded_and_symmetric():
    torch.manual_seed(8)
    t, s = 4 * torch.randn(32, 17), 4 * torch.randn(32, 17)
    d = total_variation(t, s, 1.0)
    assert d.max().item() <= 1.0 + 1e-6
    torch.testing.assert_close(d, total_variation(s, t, 1.0))
    # Disjoint peaks: the distance approaches its bound 1.
    far = torch.tensor([[50.0, 0.0, 0.0]]), torch.tensor([[0.0, 50.0, 0.0]])
    assert total_variation(*far, 1.0).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_chunking_does_not_change_values_or_gradients(monkeypatch, name):
    torch.manual_seed(9)
    t0, s0 = torch.randn(3, 4, 7), torch.randn(3, 4, 7)
    weights = torch.rand(3, 4)

    def run():
        t, s = t0.clone().requires_grad_(), s0.clone().requires_grad_()
        out = divergence(name, t, s, 1.5, 0.3, 0.2)
        (out * weights).sum().backward()
        return out.detach(), t.grad, s.grad

    whole = run()
    monkeypatch.setitem(soft_kl_module._CHUNK_ELEMENTS, "cpu", 7)  # one row per chunk
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_logits_run_in_float32(tiny_chunks, name):
    torch.manual_seed(10)
    t = torch.randn(4, 7).bfloat16()
    s = torch.randn(4, 7).bfloat16().requires_grad_()
    got = divergence(name, t, s, 2.0, 0.3, 0.2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, divergence(name, t.float(), s.detach().float(), 2.0, 0.3, 0.2),
                               rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert s.grad.dtype == torch.bfloat16 and t.grad is None
    # float32 logits that bf16 cannot represent exactly: results stay close to the float32 ones.
    t32, s32 = torch.randn(4, 7), torch.randn(4, 7)
    torch.testing.assert_close(divergence(name, t32.bfloat16(), s32.bfloat16(), 2.0, 0.3, 0.2),
                               divergence(name, t32, s32, 2.0, 0.3, 0.2), rtol=0.05, atol=5e-3)


@pytest.mark.parametrize("name", NAMES)
def test_shape_mismatch_refused_and_non_contiguous_logits(name):
    z = torch.randn(2, 3, 11)
    with pytest.raises(ValueError, match="differ in shape"):
        divergence(name, z, z[:, :2])
    torch.manual_seed(11)
    t, s = torch.randn(7, 4, 3).transpose(0, 2), torch.randn(7, 4, 3).transpose(0, 2)
    np.testing.assert_allclose(divergence(name, t, s).numpy(), reference(name, t.numpy(), s.numpy()),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ objectives through a Step
INFO = ModelInfo(is_encoder=True, vocab_size=3, student_layers=2, student_hidden=2, teacher_layers=4, teacher_hidden=2)


def make_step(student_logits, teacher_logits, labels=None, mask=None, counts=None):
    B, T, _ = student_logits.shape
    batch = {"attention_mask": mask if mask is not None else torch.ones(B, T, dtype=torch.long),
             "labels": labels if labels is not None else torch.full((B, T), -100)}
    return Step(batch=batch, student=ForwardResult(student_logits), teacher=ForwardResult(teacher_logits),
                student_model=None, teacher_model=None, info=INFO, counts=counts)


def objective(name, **settings):
    return build_objectives({name: REGISTRY[name].Settings(**settings)}, INFO)[name]


@pytest.mark.parametrize("name", NAMES)
def test_objective_hand_computed_needs_and_registry(name):
    obj = objective(name)
    assert REGISTRY[name].name == name
    assert obj.needs().teacher_logits and obj.needs().student_logits and not obj.needs().teacher_layers
    # The 2-token example padded to a 3-token vocabulary with a logit no softmax sees (-inf would be nan).
    t = torch.cat([T2, torch.full((1, 1), -200.0)], -1)[None]
    s = torch.cat([S2, torch.full((1, 1), -200.0)], -1)[None]
    assert obj(make_step(s, t))[name].item() == pytest.approx(HAND[name], abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_objective_excludes_padding_and_can_restrict_to_labelled_positions(name):
    torch.manual_seed(12)
    s, t = torch.randn(1, 3, 3, requires_grad=True), torch.randn(1, 3, 3)
    mask = torch.tensor([[1, 1, 0]])
    obj = objective(name, temperature=1.5)
    per_position = divergence(name, t, s.detach(), 1.5, 0.5, 0.1)
    base = obj(make_step(s, t, mask=mask))[name]
    assert base.item() == pytest.approx(per_position[0, :2].mean().item(), abs=1e-6)
    base.backward()
    assert not s.grad[0, 2].any() and s.grad[0, :2].abs().sum() > 0
    s2 = s.detach().clone()
    s2[0, 2] += 100.0  # anything at a padding position is irrelevant
    assert obj(make_step(s2, t, mask=mask))[name].item() == pytest.approx(base.item(), abs=1e-6)
    labels = torch.tensor([[2, -100, 1]])  # position 2 is labelled but padding: still excluded
    masked = objective(name, temperature=1.5, masked_only=True)
    assert masked.positions({"attention_mask": mask, "labels": labels}).tolist() == [[True, False, False]]
    assert obj.positions({"attention_mask": mask, "labels": labels}).tolist() == [[True, True, False]]
    got = masked(make_step(s.detach(), t, labels=labels, mask=mask))[name]
    assert got.item() == pytest.approx(per_position[0, 0].item(), abs=1e-6)
    # With the step's count set by the training loop, the value is this micro-batch's share of the step's mean.
    shared = obj(make_step(s.detach(), t, mask=mask, counts={name: torch.tensor(8)}))[name]
    assert shared.item() == pytest.approx(per_position[0, :2].sum().item() / 8, abs=1e-6)


def test_settings_defaults_validation_and_config_section():
    from raydistill.config import ObjectivesSpec

    assert REGISTRY["jsd"].Settings().beta == 0.5
    assert REGISTRY["skew_kl"].Settings().skew == 0.1 and REGISTRY["skew_reverse_kl"].Settings().skew == 0.1
    assert all(REGISTRY[n].Settings().temperature == 1.0 and not REGISTRY[n].Settings().masked_only for n in NAMES)
    with pytest.raises(ValidationError):
        REGISTRY["jsd"].Settings(beta=1.5)
    with pytest.raises(ValidationError):
        REGISTRY["skew_kl"].Settings(skew=-0.1)
    with pytest.raises(ValidationError):
        REGISTRY["tvd"].Settings(temperature=0)
    spec = ObjectivesSpec(jsd={"beta": 0.9, "weight": 0.5}, skew_reverse_kl={"skew": 0.3}, tvd={"masked_only": True})
    assert spec.jsd.beta == 0.9 and spec.skew_reverse_kl.skew == 0.3 and spec.tvd.masked_only
    with pytest.raises(ValidationError):
        ObjectivesSpec(skew_kl={"lambda": 0.1})


def test_weighted_sum_in_distill_module():
    from transformers import BertConfig, BertForMaskedLM

    from raydistill.train.step import DistillModule

    cfg = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    torch.manual_seed(0)
    student, teacher = BertForMaskedLM(cfg).eval(), BertForMaskedLM(cfg).eval()
    info = ModelInfo(True, 11, 2, 8, 2, 8)
    settings = {name: REGISTRY[name].Settings(weight=w) for name, w in zip(NAMES, (0.5, 1.0, 2.0, 3.0, 4.0))}
    module = DistillModule(student, build_objectives(settings, info), info)
    batch = {"input_ids": torch.randint(11, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "labels": torch.randint(11, (2, 6))}
    total, logs = module(batch, teacher)
    expected = sum(w * logs[name] for name, w in zip(NAMES, (0.5, 1.0, 2.0, 3.0, 4.0)))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(logs[name] > 0 for name in NAMES)
    total.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad and p.dim() > 1)
    same = DistillModule(teacher, build_objectives(settings, info), info)
    _, logs = same(batch, teacher)
    assert all(logs[name].item() == pytest.approx(0, abs=1e-6) for name in NAMES)


def test_split_micro_batches_sum_to_the_whole_step():
    from transformers import BertConfig, BertForMaskedLM

    from raydistill.train.step import DistillModule

    cfg = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    torch.manual_seed(1)
    student, teacher = BertForMaskedLM(cfg).eval(), BertForMaskedLM(cfg).eval()
    info = ModelInfo(True, 11, 2, 8, 2, 8)
    settings = {name: REGISTRY[name].Settings(masked_only=name in ("jsd", "tvd")) for name in NAMES}
    module = DistillModule(student, build_objectives(settings, info), info)
    # Unequal padding and labels per sequence: a mean per micro-batch would weigh them differently.
    batch = {"input_ids": torch.randint(11, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]]),
             "labels": torch.tensor([[1, -100, 2, 3, -100, -100], [4, -100, -100, -100, -100, -100]])}
    _, whole = module(batch, teacher)
    halves = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]
    counts = {}
    for half in halves:
        for k, v in module.counts(half).items():
            counts[k] = counts.get(k, 0) + v
    assert counts["jsd"].item() == 4 and counts["reverse_kl"].item() == 8
    parts = [module(half, teacher, counts=counts, share=0.5)[1] for half in halves]
    for name in NAMES:
        assert (parts[0][name] + parts[1][name]).item() == pytest.approx(whole[name].item(), rel=1e-5)
