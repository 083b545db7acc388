"""The fused, chunked soft KL of kd and iit against the plain formula: values and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from raydistill.objectives import soft_kl as soft_kl_module
from raydistill.objectives.soft_kl import soft_kl


def plain_kl(t, s, tau):
    lp = F.log_softmax(t.float() / tau, -1)
    lq = F.log_softmax(s.float() / tau, -1)
    return tau**2 * (lp.exp() * (lp - lq)).sum(-1)


@pytest.fixture
def tiny_chunks(monkeypatch):
    # 3 rows of 7 per chunk: the 2 x 5 grid is cut into chunks, the last one short.
    monkeypatch.setitem(soft_kl_module._CHUNK_ELEMENTS, "cpu", 21)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_values_and_gradients_match_plain_formula(tiny_chunks, tau):
    torch.manual_seed(0)
    t = torch.randn(2, 5, 7, requires_grad=True)
    s = torch.randn(2, 5, 7, requires_grad=True)
    weights = torch.rand(2, 5)
    got = soft_kl(t, s, tau)
    (got * weights).sum().backward()
    gt, gs = t.grad.clone(), s.grad.clone()
    t.grad = s.grad = None
    want = plain_kl(t, s, tau)
    (want * weights).sum().backward()
    assert got.shape == (2, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, s.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt, t.grad, rtol=1e-5, atol=1e-6)


def test_hand_computed_student_gradient():
    # d/dz_S tau^2 KL = tau (q - p): with uniform student logits q is uniform.
    t = torch.tensor([[0.0, 1.0, 2.0]])
    s = torch.zeros(1, 3, requires_grad=True)
    soft_kl(t, s, 2.0).sum().backward()
    p = torch.softmax(t / 2.0, -1)
    torch.testing.assert_close(s.grad, 2.0 * (torch.full((1, 3), 1 / 3) - p))


def test_gradcheck_float64(tiny_chunks):
    torch.manual_seed(1)
    t = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: soft_kl(a, b, 1.5), (t, s))


def test_bfloat16_logits_run_in_float32_and_teacher_without_grad_gets_none(tiny_chunks):
    torch.manual_seed(2)
    t = torch.randn(4, 7).bfloat16()
    s = torch.randn(4, 7).bfloat16().requires_grad_()
    got = soft_kl(t, s, 2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, plain_kl(t, s, 2.0), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert s.grad.dtype == torch.bfloat16 and t.grad is None


def test_zero_for_identical_logits_and_shape_mismatch_refused():
    z = torch.randn(2, 3, 11)
    assert soft_kl(z, z.clone(), 2.0).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="differ in shape"):
        soft_kl(z, z[:, :2], 2.0)


def test_non_contiguous_logits():
    torch.manual_seed(3)
    t = torch.randn(7, 4, 3).transpose(0, 2)
    s = torch.randn(7, 4, 3).transpose(0, 2)
    torch.testing.assert_close(soft_kl(t, s, 2.0), plain_kl(t, s, 2.0), rtol=1e-5, atol=1e-6)
