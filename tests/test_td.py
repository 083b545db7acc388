"""``td``: the paper's equations against an independent float64 reference over the full vocabulary (loss and
gradients, both heads paths), the sanity property, hand-computed cases, the vocabulary argmax search,
bf16 accumulation, memory bounds, action sets, transitions, normalisation, configuration, and a smoke run
of ``raydistill bench td``."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from raydistill.config import load_config
from raydistill.errors import ConfigError
from raydistill.objectives import REGISTRY, build_objectives
from raydistill.objectives.action_space import (ActionSet, ActionSpaceSettings, action_space, add_expert,
                                                top_k_actions, top_p_actions)
from raydistill.objectives.base import ForwardResult, HeadInput, ModelInfo, Step

V = 11
INFO = ModelInfo(is_encoder=False, vocab_size=V, student_layers=2, student_hidden=4, teacher_layers=4,
                 teacher_hidden=4)


def identity_head(vocab, dtype=torch.float32):
    head = torch.nn.Linear(vocab, vocab, bias=False, dtype=dtype)
    head.weight.data.copy_(torch.eye(vocab))
    return head.requires_grad_(False)


def make_step(student, teacher, labels, info=INFO, counts=None, share=1.0):
    """The student's logits both as logits and as the input of an identity output head, so the fused-head
    path (the default) and the gather-from-logits path see the same values and give ``student`` its gradient."""
    batch = {"attention_mask": torch.ones_like(labels), "labels": labels}
    head = HeadInput(student, identity_head(student.size(-1), student.dtype))
    return Step(batch=batch, student=ForwardResult(student, head=head), teacher=ForwardResult(teacher),
                student_model=None, teacher_model=None, info=info, counts=counts, share=share)


def head_step(hidden, head, teacher, labels, info=INFO):
    """A step whose student is a hidden state and an output head: the fused path reads them, the other path
    the head's full logits."""
    batch = {"attention_mask": torch.ones_like(labels), "labels": labels}
    return Step(batch=batch, student=ForwardResult(head(hidden), head=HeadInput(hidden, head)),
                teacher=ForwardResult(teacher), student_model=None, teacher_model=None, info=info)


def td(info=INFO, **settings):
    return build_objectives({"td": REGISTRY["td"].Settings(**settings)}, info)["td"]


def td_loss(student, teacher, labels, info=INFO, **settings):
    return td(info, **settings)(make_step(student, teacher, labels, info))["td"]


def random_case(seed=0, B=3, T=9, vocab=V):
    """Random logits; labels with a prompt (-100 at the start), a response, and right padding."""
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(B, T, vocab, generator=g)
    teacher = 2 * torch.randn(B, T, vocab, generator=g)
    labels = torch.randint(vocab, (B, T), generator=g)
    labels[0, :2] = -100  # prompt
    labels[1 % B, T - 3:] = -100  # padding: the response ends mid-block
    labels[2 % B, T // 2] = -100  # a gap: the position before is terminal, the one after starts again
    labels[:, -1] = -100  # the last position predicts nothing
    return student, teacher, labels


def phi(x, alpha=0.1):
    return x - x * x / (4 * alpha)


# ------------------------------------------------------------------------------------------- the paper, float64
def paper_member(teacher, s):
    """A(s) as a B x T x V mask, from the definitions: top-k = the k tokens with the fewest strictly more
    likely ones; nucleus = the tokens whose strictly more likely ones carry mass < p, at most max_k."""
    t = teacher.double()
    rank = (t.unsqueeze(-1) < t.unsqueeze(-2)).sum(-1)  # tokens strictly more likely (no ties in random data)
    if s.action_space.kind == "top_k":
        return rank < s.action_space.k
    probs = t.softmax(-1)
    mass_before = (probs.unsqueeze(-2) * (t.unsqueeze(-2) > t.unsqueeze(-1))).sum(-1)
    return (mass_before < s.action_space.p) & (rank < s.action_space.max_k)


def paper_loss(z, teacher, labels, s):
    """The paper's loss written directly from its equations over the full vocabulary, in float64:
    Q(s, .) = clip(z/tau - max_{a in V} z(s, a)/tau, q_min) restricted to A(s) (-inf outside),
    V(s) = logsumexp_{A(s)} Q, L = sum over kept transitions of -phi(Q(s_t, a_t) - gamma V(s_{t+1}))
    + V(s_t) - gamma V(s_{t+1}), divided by the number of labelled positions; V = 0 after the last one.
    ``s.shift == 'action_set'``: the max over A(s) instead (the documented deviation)."""
    B, T, vocab = z.shape
    z = z.double() / s.temperature
    member = paper_member(teacher, s)
    labelled = labels != -100
    expert = F.one_hot(labels.clamp_min(0), vocab).bool() & labelled.unsqueeze(-1)
    in_set = (member & expert).any(-1)
    if s.expert == "include":
        member = member | expert
    if s.shift == "vocab":
        top = z.amax(-1, keepdim=True)
    else:
        top = z.masked_fill(~member, float("-inf")).amax(-1, keepdim=True)
    q = z - top
    if s.q_min is not None:
        q = q.clamp_min(s.q_min)
    q = q.masked_fill(~member, float("-inf"))
    value = q.logsumexp(-1)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not labelled[b, t] or (s.expert == "skip" and not in_set[b, t]):
                continue
            nxt = value[b, t + 1] if t + 1 < T and labelled[b, t + 1] else 0.0
            x = q[b, t, labels[b, t]] - s.gamma * nxt
            total = total - (phi(x, s.alpha) if s.alpha is not None else x) + value[b, t] - s.gamma * nxt
    return total / max(int(labelled.sum()), 1)


# ------------------------------------------------------------------------------------------- the sanity property
@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("shift", ["vocab", "action_set"])
def test_gamma_zero_full_vocabulary_is_cross_entropy(shift, fused_head):
    student, teacher, labels = random_case()
    loss = td_loss(student, teacher, labels, action_space={"k": V}, gamma=0.0, alpha=None, q_min=None,
                   shift=shift, fused_head=fused_head)
    ce = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ce.item(), abs=1e-5)


# ------------------------------------------------------------------------------------------- by hand
def minimal_case(shift, fused_head):
    """tau = 1, alpha = 0.1, no clip, one terminal transition, A(s) = teacher top-2 = {0, 1}, expert 0,
    student logits [0, 0, 5]."""
    z = torch.tensor([[[0.0, 0.0, 5.0]]], requires_grad=True)
    teacher = torch.tensor([[[2.0, 1.0, 0.0]]])
    labels = torch.tensor([[0]])
    info = ModelInfo(False, 3, 2, 3, 4, 4)
    out = td(info, action_space={"k": 2}, alpha=0.1, q_min=None, gamma=0.7, temperature=1.0, shift=shift,
             fused_head=fused_head)(make_step(z, teacher, labels, info))
    out["td"].backward()
    return out, z.grad.view(-1)


@pytest.mark.parametrize("fused_head", [True, False])
def test_minimal_case_by_hand(fused_head):
    # The paper: Q = [0, 0, 5] - 5 = [-5, -5, .] on A = {0, 1}; V = log(2 e^-5) = -5 + log 2; x = Q(s, 0) = -5
    # (terminal); phi(-5) = -5 - 25/0.4 = -67.5; L = 67.5 + (-5 + log 2) = 62.5 + log 2 = 63.193.
    # dL/dQ(0) = -phi'(-5) + pi(0) = -(1 + 5/0.2) + 0.5 = -25.5, dL/dQ(1) = 0.5; both Q's subtract z[2], which
    # gets -(-25.5 + 0.5) = 25.
    out, grad = minimal_case("vocab", fused_head)
    assert out["td"].item() == pytest.approx(62.5 + math.log(2), abs=1e-4)
    assert out["td"].item() == pytest.approx(63.19, abs=5e-3)
    torch.testing.assert_close(grad, torch.tensor([-25.5, 0.5, 25.0]))
    assert out["td/argmax_in_set"].item() == 0.0
    # The deviation: Q measured from the set's best token: Q = [0, 0]; x = 0, phi = 0; L = V = log 2; the
    # gradient is that of the cross-entropy over A(s), and token 2 (outside A) gets nothing.
    out, grad = minimal_case("action_set", fused_head)
    assert out["td"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["td"].item() == pytest.approx(0.693, abs=5e-4)
    torch.testing.assert_close(grad, torch.tensor([-0.5, 0.5, 0.0]))
    # And the reference implementation agrees with both.
    for shift, want in (("vocab", 62.5 + math.log(2)), ("action_set", math.log(2))):
        s = REGISTRY["td"].Settings(action_space={"k": 2}, alpha=0.1, q_min=None, shift=shift)
        z = torch.tensor([[[0.0, 0.0, 5.0]]], dtype=torch.float64, requires_grad=True)
        ref = paper_loss(z, torch.tensor([[[2.0, 1.0, 0.0]]]), torch.tensor([[0]]), s)
        ref.backward()
        assert ref.item() == pytest.approx(want, abs=1e-12)
        torch.testing.assert_close(z.grad.view(-1).float(), minimal_case(shift, fused_head)[1])


def test_hand_computed_two_steps():
    # Vocabulary of 5, k = 2, gamma = 0.9, alpha = 0.1 (phi(x) = x - x^2/0.4), tau = 1, no clipping reached.
    # Each row's largest student logit is in A'(s), so both shifts agree here.
    teacher = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -1.0],    # A(s0) = {0, 1}
                             [0.0, 1.0, 4.0, 3.0, 2.0],     # A(s1) = {2, 3}
                             [0.0, 0.0, 0.0, 0.0, 0.0]]])   # unlabelled: never read
    student = torch.tensor([[[1.0, 2.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 1.0, 3.0, 2.0],
                             [9.0, 0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 4, -100]])  # a0 = 1 (in A(s0)); a1 = 4 (outside A(s1)); s2 terminal for t=1
    info = ModelInfo(False, 5, 2, 4, 4, 4)

    # include: A'(s0) = {0, 1}: Q = [1-2, 2-2] = [-1, 0]; V0 = log(e^-1 + 1); Q(s0, a0) = 0.
    #          A'(s1) = {2, 3, 4}: Q = [1-3, 3-3, 2-3] = [-2, 0, -1]; V1 = log(e^-2 + 1 + e^-1); Q(s1, a1) = -1.
    v0 = math.log(math.exp(-1) + 1)
    v1 = math.log(math.exp(-2) + 1 + math.exp(-1))
    x0, x1 = 0.0 - 0.9 * v1, -1.0 - 0.0  # t=1's next state is terminal
    expected = -(phi(x0) + phi(x1)) / 2 + ((v0 - 0.9 * v1) + (v1 - 0.0)) / 2
    for shift in ("vocab", "action_set"):
        got = td_loss(student, teacher, labels, info, action_space={"k": 2}, gamma=0.9, alpha=0.1, shift=shift)
        assert got.item() == pytest.approx(expected, abs=1e-5)

    # skip: A(s1) = {2, 3}: Q = [-2, 0]; V1 = log(e^-2 + 1). t=1's expert is outside A(s1): its whole transition
    # is dropped (no phi term, no V1 - 0 term), but s1 stays t=0's next state and the divisor stays 2.
    v1s = math.log(math.exp(-2) + 1)
    expected_skip = (-phi(-0.9 * v1s) + (v0 - 0.9 * v1s)) / 2
    got = td_loss(student, teacher, labels, info, action_space={"k": 2}, gamma=0.9, alpha=0.1, expert="skip")
    assert got.item() == pytest.approx(expected_skip, abs=1e-5)

    # Clipping at -1.5: Q(s1, 2) = -2 -> -1.5.
    v1c = math.log(math.exp(-1.5) + 1 + math.exp(-1))
    expected_clip = -(phi(-0.9 * v1c) + phi(-1.0)) / 2 + ((v0 - 0.9 * v1c) + v1c) / 2
    got = td_loss(student, teacher, labels, info, action_space={"k": 2}, gamma=0.9, alpha=0.1, q_min=-1.5)
    assert got.item() == pytest.approx(expected_clip, abs=1e-5)


# ------------------------------------------------------------------------------------------- against the reference
SPACES = {"top_k": {"kind": "top_k", "k": 3}, "top_p": {"kind": "top_p", "p": 0.6, "max_k": 5}}
REGULARISERS = {"clip+chi2": dict(q_min=-1.0, alpha=0.1), "clip": dict(q_min=-1.0, alpha=None),
                "chi2": dict(q_min=None, alpha=0.1), "none": dict(q_min=None, alpha=None)}
GRID = list(itertools.product(["vocab", "action_set"], SPACES, ["include", "skip"], REGULARISERS))


def grid_settings(shift, space, expert, regulariser):
    return dict(shift=shift, action_space=SPACES[space], expert=expert, gamma=0.9, **REGULARISERS[regulariser],
                temperature=1.5 if space == "top_p" else 1.0, chunk_size=2 if expert == "skip" else None)


@pytest.mark.parametrize("shift, space, expert, regulariser", GRID)
def test_logits_path_equals_the_paper(shift, space, expert, regulariser):
    """fused_head: false against the float64 reference: loss and gradient w.r.t. the logits."""
    settings = grid_settings(shift, space, expert, regulariser)
    student, teacher, labels = random_case(seed=3)
    a = student.clone().requires_grad_(True)
    b = student.double().requires_grad_(True)
    got = td(**settings, fused_head=False)(make_step(a, teacher, labels))["td"]
    want = paper_loss(b, teacher, labels, REGISTRY["td"].Settings(**settings))
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(a.grad, b.grad.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shift, space, expert, regulariser", GRID)
def test_fused_head_equals_the_paper(shift, space, expert, regulariser, monkeypatch):
    """fused_head: true (the default) against the float64 reference on the head's full logits: loss and
    gradients w.r.t. the hidden state, the head's weight and its bias; the vocabulary argmax search works
    in blocks of a few positions and vocabulary rows."""
    from raydistill.objectives import head_columns as hc

    monkeypatch.setattr(hc, "_SEARCH_ELEMENTS", 24)
    monkeypatch.setattr(hc, "_SEARCH_ROWS", 4)  # 4 positions x 6 vocabulary rows per block
    settings = grid_settings(shift, space, expert, regulariser)
    _, teacher, labels = random_case(seed=4)
    head = random_head(V, 6, bias=expert == "skip", seed=5)
    hidden = torch.randn(*labels.shape, 6, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    ref_w = head.weight.detach().double().requires_grad_(True)
    ref_b = head.bias.detach().double().requires_grad_(True) if head.bias is not None else None
    ref_h = hidden.detach().double().requires_grad_(True)
    got = td(**settings)(head_step(hidden, head, teacher, labels))["td"]
    z = ref_h @ ref_w.T + (ref_b if ref_b is not None else 0.0)
    want = paper_loss(z, teacher, labels, REGISTRY["td"].Settings(**settings))
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(hidden.grad, ref_h.grad.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.weight.grad, ref_w.grad.float(), atol=1e-5, rtol=1e-4)
    if ref_b is not None:
        torch.testing.assert_close(head.bias.grad, ref_b.grad.float(), atol=1e-5, rtol=1e-4)


def test_the_reference_grid_can_tell_the_variants_apart():
    """The data of the grid exercises what distinguishes the settings: the student's vocabulary argmax lies
    outside A'(s) at some labelled positions, the clip binds inside the set, experts fall outside A(s) (so
    skip drops transitions), and the two shifts differ exactly where clip or chi^2 is active."""
    student, teacher, labels = random_case(seed=3)
    labelled = labels != -100
    for space in SPACES.values():
        s = REGISTRY["td"].Settings(action_space=space)
        member = paper_member(teacher, s)
        expert = F.one_hot(labels.clamp_min(0), V).bool()
        in_set = (member & expert).any(-1) & labelled
        assert in_set.any() and (labelled & ~in_set).any()
        argmax_in = member.gather(-1, student.argmax(-1, keepdim=True)).squeeze(-1) | (student.argmax(-1) == labels)
        assert (labelled & ~argmax_in).any()
        q = student - student.amax(-1, keepdim=True)
        assert ((q < -1.0) & member & labelled.unsqueeze(-1)).any()
    for space, expert, regulariser in itertools.product(SPACES, ["include", "skip"], REGULARISERS):
        losses = {shift: paper_loss(student, teacher, labels, REGISTRY["td"].Settings(
            **grid_settings(shift, space, expert, regulariser))).item() for shift in ("vocab", "action_set")}
        if regulariser == "none":
            assert losses["vocab"] == pytest.approx(losses["action_set"], abs=1e-9)
        else:
            assert abs(losses["vocab"] - losses["action_set"]) > 1e-3, (space, expert, regulariser)
    include, skip = (paper_loss(student, teacher, labels, REGISTRY["td"].Settings(**grid_settings(
        "vocab", "top_k", e, "none"))) for e in ("include", "skip"))
    assert abs(include - skip) > 1e-3


def test_chunking_gives_identical_results():
    student, teacher, labels = random_case(seed=5)
    for space in ({"kind": "top_k", "k": 4}, {"kind": "top_p", "p": 0.7}):
        whole = td_loss(student, teacher, labels, action_space=space)
        for chunk in (1, 2, 4, 100):
            assert td_loss(student, teacher, labels, action_space=space, chunk_size=chunk).item() == whole.item()


# ------------------------------------------------------------------------------------------- bf16
def distinct_bf16_case(seed=6, B=3, T=9, vocab=V):
    """Random logits with distinct values per position, exact in bf16 (multiples of 1/4 up to 2.75), so that
    the vocabulary argmax has no tie in either dtype; experts = the teacher's argmax, so the expert column
    duplicates a set column at every labelled position."""
    g = torch.Generator().manual_seed(seed)
    student = torch.stack([torch.randperm(vocab, generator=g) for _ in range(B * T)]).view(B, T, vocab) / 4.0
    _, teacher, labels = random_case(seed, B, T, vocab)
    return student, teacher, torch.where(labels != -100, teacher.argmax(-1), labels)


class _GatherRoundingPerColumn(torch.autograd.Function):
    """The gather's backward as it was: each column's gradient rounded to the logits' dtype, then summed."""

    @staticmethod
    def forward(ctx, logits, index):
        ctx.save_for_backward(index)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return logits.gather(-1, index).float()

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.zeros(ctx.shape, dtype=ctx.dtype).scatter_add(-1, index, grad.to(ctx.dtype)), None


@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("shift", ["vocab", "action_set"])
def test_bf16_duplicate_columns_accumulate_in_float32(shift, fused_head, monkeypatch):
    """bf16 logits (or hidden state): the gradient equals the float32 computation's on the same values,
    rounded to bf16 once: a token in two columns of a position (the expert and its in-set duplicate, the
    vocabulary argmax and its duplicate) is summed in float32 before the rounding, not rounded per column."""
    from raydistill.objectives import td as td_module

    student, teacher, labels = distinct_bf16_case()
    settings = dict(action_space={"k": 3}, shift=shift, fused_head=fused_head, q_min=None)

    def grad(logits):
        logits = logits.clone().requires_grad_(True)
        td(**settings)(make_step(logits, teacher, labels))["td"].backward()
        return logits.grad

    got, want = grad(student.bfloat16()), grad(student)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got.float()).all()
    assert torch.equal(got, want.bfloat16())
    if not fused_head:  # the check has teeth: rounding per column, then summing, gives other values here
        monkeypatch.setattr(td_module, "_GatherColumns", _GatherRoundingPerColumn)
        assert not torch.equal(grad(student.bfloat16()), want.bfloat16())


def test_gather_columns_backward_rounds_each_token_once():
    from raydistill.objectives.td import _GatherColumns

    logits = torch.zeros(1, 2, 5, dtype=torch.bfloat16, requires_grad=True)
    index = torch.tensor([[[3, 1, 3, 3], [0, 2, 4, 1]]])
    grad = torch.tensor([[[1.0, 0.25, 2 ** -9, 2 ** -9], [0.5, -1.0, 3.0, 2.0]]])
    (_GatherColumns.apply(logits, index) * grad).sum().backward()
    # 1 + 2^-9 + 2^-9 = 1 + 2^-8 is exact in bf16; each 2^-9 added to 1 in bf16 separately would vanish.
    want = torch.tensor([[[0.0, 0.25, 0.0, 1.0 + 2 ** -8, 0.0], [0.5, 2.0, -1.0, 0.0, 3.0]]])
    assert torch.equal(logits.grad, want.bfloat16())


# ------------------------------------------------------------------------------------------- memory
class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and func not in (torch.ops.aten.detach.default,) and o._base is None:
                self.largest = max(self.largest, o.numel())
        return out


def test_forward_allocates_nothing_vocabulary_sized():
    """Memory grows with k: no tensor the forward creates has B x T x V elements (top_p's softmax over the
    vocabulary is B x chunk x V with chunk_size); the vocabulary argmax of the full logits is B x T."""
    B, T, vocab = 2, 8, 500
    student, teacher, labels = random_case(seed=7, B=B, T=T, vocab=vocab)
    info = ModelInfo(False, vocab, 2, 4, 4, 4)
    for settings, bound in ((dict(action_space={"k": 8}, fused_head=False), B * T * 10),
                            (dict(action_space={"kind": "top_p", "max_k": 16}, chunk_size=2, fused_head=False),
                             B * 2 * vocab)):
        obj, step = td(info, **settings), make_step(student.requires_grad_(True), teacher, labels, info)
        with _LargestOutput() as mode:
            obj(step)
        assert mode.largest <= bound, settings


def random_head(vocab, width, bias, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(width, vocab, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=g))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    return head


@pytest.mark.parametrize("bias", [False, True])
def test_head_columns_equal_gathered_logits_values_and_gradients(bias, monkeypatch):
    """The fused head gives the same columns as gathering from ``head(h)``, and the same gradients for h, the
    weight and the bias, also when it works a few positions at a time and when tokens repeat across them;
    ``head_columns_and_argmax`` appends the vocabulary argmax's column, differentiable like the others."""
    from raydistill.objectives import head_columns as hc

    monkeypatch.setattr(hc, "_CHUNK_ELEMENTS", 40)  # chunks of a few positions
    monkeypatch.setattr(hc, "_SEARCH_ELEMENTS", 20)
    B, T, vocab, width, K = 2, 5, 30, 4, 6
    head = random_head(vocab, width, bias)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, width, generator=g, requires_grad=True)
    index = torch.randint(vocab, (B, T, K), generator=g)
    index[..., -1] = index[..., 0]  # a token twice in one row, as the expert column duplicates A(s)
    for with_argmax in (False, True):
        upstream = torch.randn(B, T, K + with_argmax, generator=g)
        if with_argmax:
            got, argmax = hc.head_columns_and_argmax(HeadInput(hidden, head), index)
            assert torch.equal(argmax, head(hidden).argmax(-1))
            full_index = torch.cat([index, argmax.unsqueeze(-1)], -1)
        else:
            got, full_index = hc.head_columns(HeadInput(hidden, head), index), index
        (got * upstream).sum().backward()
        got_grads = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        want = head(hidden).gather(-1, full_index)
        (want * upstream).sum().backward()
        want_grads = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]
        hidden.grad = None
        head.zero_grad(set_to_none=True)

        assert got.dtype == torch.float32 and got.shape == full_index.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("elements, rows", [(1 << 22, 1024), (7, 1), (40, 3), (100, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_head_argmax_matches_the_full_logits(elements, rows, bias, monkeypatch):
    from raydistill.objectives import head_columns as hc

    monkeypatch.setattr(hc, "_SEARCH_ELEMENTS", elements)
    monkeypatch.setattr(hc, "_SEARCH_ROWS", rows)
    head = random_head(37, 5, bias, seed=3)
    hidden = torch.randn(13, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = head(hidden).argmax(-1)
    assert torch.equal(hc.head_argmax(hidden, head.weight, head.bias), want)


def test_head_argmax_in_bf16_picks_the_float32_maximum_among_rounded_ties():
    """Three tokens whose logits differ by less than bf16's resolution there (96.0x: steps of 0.5): the bf16
    search sees a tie; its candidates are scored in float32, as the columns are, and the largest wins, even
    when it is not the first of the tie."""
    from raydistill.objectives import head_columns as hc

    weight = torch.zeros(50, 2)
    weight[:, 0] = torch.linspace(-40, 40, 50)
    weight[[10, 20, 30], 0] = 96.0
    weight[[10, 20, 30], 1] = torch.tensor([0.0625, 0.125, 0.25])  # exact in bf16; 30 is the largest
    weight = weight.bfloat16()
    hidden = torch.ones(3, 2, dtype=torch.bfloat16)
    rounded = hidden @ weight.T
    assert rounded[0, 10] == rounded[0, 20] == rounded[0, 30]  # tied once rounded to bf16
    assert hc.head_argmax(hidden, weight, None).tolist() == [30, 30, 30]


def test_fused_head_creates_nothing_vocabulary_sized_forward_or_backward(monkeypatch):
    """With the fused head, neither pass creates a tensor of B x T x V elements: the largest is the head's
    own V x H gradient (H < B x T here), a chunk's gathered head rows or a block of the argmax search; and
    nothing is saved for backward but B x T x (k + 2) columns, the B x T x H hidden state and the head's own
    parameters."""
    from raydistill.objectives import head_columns as hc

    monkeypatch.setattr(hc, "_SEARCH_ELEMENTS", 1000)  # the default would search these 16 x 500 in one block
    B, T, vocab, width, k = 2, 8, 500, 4, 8
    head = random_head(vocab, width, bias=True)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, width, generator=g, requires_grad=True)
    _, teacher, labels = random_case(seed=7, B=B, T=T, vocab=vocab)
    info = ModelInfo(False, vocab, 2, width, 4, width)
    for shift in ("vocab", "action_set"):
        step = Step(batch={"attention_mask": torch.ones_like(labels), "labels": labels},
                    student=ForwardResult(None, head=HeadInput(hidden, head)), teacher=ForwardResult(teacher),
                    student_model=None, teacher_model=None, info=info)
        obj = td(info, action_space={"k": k}, shift=shift)
        assert obj.needs().student_head and not obj.needs().student_logits
        saved = []

        def pack(t):  # the head's parameters are saved by reference (the module's cut call): no memory
            if all(t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for p in head.parameters()):
                saved.append(t.numel())
            return t

        with _LargestOutput() as mode:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = obj(step)["td"]
            loss.backward()
        assert mode.largest <= max(vocab * width, B * T * (k + 2) * width, 1000) < B * T * vocab
        assert max(saved) <= max(B * T * (k + 2), B * T * width)
        assert hidden.grad is not None and head.weight.grad.abs().sum() > 0
        hidden.grad = head.weight.grad = head.bias.grad = None


def test_fused_head_refused_where_logits_are_transformed_after_the_head():
    from transformers import GPT2Config

    from raydistill.models.loading import logit_transform

    cfg = GPT2Config(n_layer=1)
    assert logit_transform(cfg) is None
    cfg.final_logit_softcapping = 30.0
    assert logit_transform(cfg) == "final_logit_softcapping"
    info = ModelInfo(False, V, 2, 4, 4, 4, student_logit_transform="final_logit_softcapping")
    with pytest.raises(ConfigError, match=r"objectives\.td\.fused_head: .*final_logit_softcapping.*fused_head=false"):
        td(info)
    assert td(info, fused_head=False).needs().student_logits


# ------------------------------------------------------------------------------------------- action sets
def test_top_k_sizes_ties_and_cap():
    logits = torch.randn(2, 3, 7)
    a = top_k_actions(logits, 3)
    assert a.index.shape == (2, 3, 3) and a.valid.all()
    assert torch.equal(a.index, logits.topk(3, -1).indices)
    assert top_k_actions(logits, 50).index.shape == (2, 3, 7)  # k >= V: the whole vocabulary
    flat = top_k_actions(torch.zeros(1, 1, 7), 3)  # ties: three distinct tokens, lowest ids first (canonical)
    assert flat.index.tolist() == [[[0, 1, 2]]]


def test_top_p_smallest_prefix_at_least_one_and_cap():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().view(1, 1, 4)
    sizes = {p: int(top_p_actions(logits, p, 10).valid.sum()) for p in (1e-6, 0.4, 0.75, 0.85, 0.97)}
    assert sizes == {1e-6: 1, 0.4: 1, 0.75: 2, 0.85: 3, 0.97: 4}
    peaked = torch.tensor([10.0, 0.0, 0.0]).view(1, 1, 3)
    assert int(top_p_actions(peaked, 0.99, 10).valid.sum()) == 1  # one token already covers p
    flat = top_p_actions(torch.zeros(1, 2, 50), 0.9, 4)  # flat teacher: the cap bounds K and the set
    assert flat.index.shape == (1, 2, 4) and flat.valid.all()
    ties = top_p_actions(torch.zeros(1, 1, 10), 0.25, 10)  # 10 equal tokens: 3 reach 0.3 >= 0.25
    assert int(ties.valid.sum()) == 3
    assert ties.index[ties.valid].tolist() == [0, 1, 2]  # ties by lowest id (teacher_signals.topk_ids)


def test_expert_column_include_and_skip():
    actions = ActionSet(torch.tensor([[[0, 1], [2, 3], [4, 0]]]), torch.tensor([[[True, True]] * 3]))
    labels = torch.tensor([[1, 4, -100]])
    inc, in_set = add_expert(actions, labels, include=True)
    assert in_set.tolist() == [[True, False, False]]
    assert inc.index[..., -1].tolist() == [[1, 4, 0]]
    assert inc.valid[..., -1].tolist() == [[False, True, False]]  # only where the expert was missing
    skip, _ = add_expert(actions, labels, include=False)
    assert not skip.valid[..., -1].any()


def test_action_space_dispatch_and_chunks():
    logits = torch.randn(2, 5, 9)
    for kind in ("top_k", "top_p"):
        s = ActionSpaceSettings(kind=kind, k=3, p=0.7, max_k=6)
        whole, parts = action_space(logits, s), action_space(logits, s, chunk_size=2)
        assert torch.equal(whole.index, parts.index) and torch.equal(whole.valid, parts.valid)


# ------------------------------------------------------------------------------------------- transitions
def test_unlabelled_positions_contribute_nothing():
    student, teacher, labels = random_case(seed=8)
    a = student.clone().requires_grad_(True)
    obj = td(action_space={"k": 4})
    base = obj(make_step(a, teacher, labels))["td"]
    base.backward()
    unlabelled = labels == -100
    assert (a.grad[unlabelled] == 0).all() and (a.grad[~unlabelled] != 0).any()
    s2, t2 = student.clone(), teacher.clone()
    s2[unlabelled] = 50 * torch.randn_like(s2[unlabelled])
    t2[unlabelled] = 50 * torch.randn_like(t2[unlabelled])
    assert obj(make_step(s2, t2, labels))["td"].item() == pytest.approx(base.item(), abs=1e-6)


def test_padding_and_terminal_states():
    """A response ending mid-block gives the loss of the trimmed sequence, whose last labelled position is
    terminal: V(next) = 0, so its own loss term is -phi(Q) + V with no bootstrap."""
    student, teacher, labels = random_case(seed=9, B=1, T=8)
    labels[0] = torch.tensor([-100, 3, 5, 1, 7, -100, -100, -100])
    settings = dict(action_space={"k": 3}, gamma=0.9)
    padded = td_loss(student, teacher, labels, **settings)
    trimmed = td_loss(student[:, :5], teacher[:, :5], labels[:, :5], **settings)
    assert padded.item() == pytest.approx(trimmed.item(), rel=1e-6, abs=1e-6)
    # A single labelled position is terminal: the loss is -phi(Q(s, a)) + V(s), whatever gamma is.
    one = torch.full_like(labels, -100)
    one[0, 2] = 5
    losses = {g: td_loss(student, teacher, one, action_space={"k": 3}, gamma=g).item() for g in (0.0, 0.5, 0.99)}
    assert losses[0.0] == pytest.approx(losses[0.5], rel=1e-6) == pytest.approx(losses[0.99], rel=1e-6)


def test_logged_components():
    student, teacher, labels = random_case(seed=10)
    out = td(action_space={"k": V})(make_step(student, teacher, labels))
    assert set(out) == {"td", "td/q_expert", "td/value", "td/chi2", "td/action_set_size", "td/expert_in_set",
                        "td/argmax_in_set"}
    assert out["td/action_set_size"].item() == V and out["td/expert_in_set"].item() == 1.0
    assert out["td/argmax_in_set"].item() == 1.0  # A = V holds every argmax
    assert out["td/q_expert"].item() <= 0 and out["td/chi2"].item() >= 0
    small = td(action_space={"k": 1})(make_step(student, teacher, labels))
    assert small["td/expert_in_set"].item() < 1 and small["td/argmax_in_set"].item() < 1
    assert "td/argmax_in_set" not in td(shift="action_set")(make_step(student, teacher, labels))
    assert td().needs().teacher_topk == V and not td().needs().teacher_logits  # k = 64 capped at V; no logits
    assert td(action_space={"kind": "top_p", "max_k": 5}).needs().teacher_topk == 5


@pytest.mark.parametrize("expert", ["include", "skip"])
def test_loss_and_logs_are_shares_of_the_step(expert):
    """positions() is the labelled positions, a function of the batch; with the step's count and share the
    micro-batches' values sum to the whole batch's, every logged value included (skip: which transitions
    are kept is not known before the teacher's forward, so the count is of labelled positions)."""
    student, teacher, labels = random_case(seed=11, B=4)
    labels[3, :6] = -100  # micro-batches with different numbers of labelled positions
    obj = td(action_space={"k": 3}, expert=expert)
    assert torch.equal(obj.positions({"labels": labels, "attention_mask": torch.ones_like(labels)}), labels != -100)
    whole = obj(make_step(student, teacher, labels))
    counts = {"td": (labels != -100).sum()}
    parts = [obj(make_step(student[r], teacher[r], labels[r], counts=counts, share=0.5))
             for r in (slice(0, 1), slice(1, 4))]
    assert set(parts[0]) == set(whole)
    for key in whole:
        assert (parts[0][key] + parts[1][key]).item() == pytest.approx(whole[key].item(), rel=1e-5, abs=1e-6), key


def test_skip_drops_the_whole_transition():
    """A labelled position whose expert lies outside A(s) adds nothing to either term under skip, though it
    counts in the divisor and its state stays the previous transition's next state."""
    student, teacher, _ = random_case(seed=12, B=1, T=4)
    outside = int(teacher[0, 1].argmin())  # the least likely token: outside the top 2
    labels = torch.tensor([[-100, outside, -100, -100]])
    a = student.clone().requires_grad_(True)
    loss = td(action_space={"k": 2}, expert="skip")(make_step(a, teacher, labels))["td"]
    loss.backward()
    assert loss.item() == 0.0 and (a.grad == 0).all()  # its V(s_t) - gamma V(s_{t+1}) term is gone too
    inside = int(teacher[0, 0].argmax())
    labels = torch.tensor([[inside, outside, -100, -100]])
    settings = dict(action_space={"k": 2}, expert="skip", gamma=0.8)
    a = student.clone().requires_grad_(True)
    loss = td(**settings)(make_step(a, teacher, labels))["td"]
    loss.backward()
    assert (a.grad[0, 1] != 0).any()  # through gamma V(s_1) in t=0's transition
    just_first = td(**settings)(make_step(student, teacher, torch.tensor([[inside, -100, -100, -100]])))["td"]
    assert loss.item() != pytest.approx(just_first.item() / 2)  # s_1 is not terminal for t=0
    ref = paper_loss(student, teacher, labels, REGISTRY["td"].Settings(**settings))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_no_labelled_position_gives_zero_with_a_graph():
    student, teacher, _ = random_case()
    a = student.clone().requires_grad_(True)
    loss = td()(make_step(a, teacher, torch.full((3, 9), -100)))["td"]
    loss.backward()
    assert loss.item() == 0.0 and (a.grad == 0).all()


# ------------------------------------------------------------------------------------------- configuration
BASE = ["teacher.name=tiny-gpt2", "objectives.td.weight=1"]


def test_config_overrides_reach_nested_settings():
    cfg = load_config(None, [*BASE, "objectives.td.action_space.k=8", "objectives.td.action_space.kind=top_p",
                             "objectives.td.action_space.p=0.5", "objectives.td.alpha=null",
                             "objectives.td.q_min=null", "objectives.td.expert=skip", "objectives.td.chunk_size=64"])
    s = cfg.objectives.td
    assert (s.action_space.k, s.action_space.kind, s.action_space.p, s.alpha, s.q_min, s.expert, s.chunk_size) == \
        (8, "top_p", 0.5, None, None, "skip", 64)
    assert "td" in cfg.active_objectives()
    default = load_config(None, BASE).objectives.td
    assert (default.gamma, default.alpha, default.q_min, default.action_space.k) == (0.99, 0.1, -10.0, 64)


@pytest.mark.parametrize("override, message", [
    ("objectives.td.action_space.k=0", r"objectives\.td\.action_space\.k: .*greater than or equal to 1 \(got 0\)"),
    ("objectives.td.action_space.kind=top_q", r"objectives\.td\.action_space\.kind: allowed: 'top_k' or 'top_p'"),
    ("objectives.td.action_space.p=1.5", r"objectives\.td\.action_space\.p: .*less than or equal to 1"),
    ("objectives.td.action_space.size=3", r"objectives\.td\.action_space\.size: unknown key; allowed: k, kind"),
    ("objectives.td.gamma=1.2", r"objectives\.td\.gamma: .*less than or equal to 1"),
    ("objectives.td.q_min=0.5", r"objectives\.td\.q_min: .*less than 0"),
    ("objectives.td.expert=maybe", r"objectives\.td\.expert: allowed: 'include' or 'skip'"),
    ("objectives.td.chunk_size=0", r"objectives\.td\.chunk_size: .*greater than or equal to 1"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, override])


def test_encoders_are_refused_before_ray(cache_dir):
    from raydistill.train.plan import prepare

    with pytest.raises(ConfigError, match=r"objectives\.td: .*needs a decoder"):
        td(ModelInfo(True, V, 2, 4, 4, 4))
    cfg = load_config(None, ["teacher.name=tiny-bert", "objectives.td.weight=1", f"cache_dir={cache_dir}",
                             "data.builtin.num_documents=100", "tokenizer.vocab_size=300"])
    with pytest.raises(ConfigError, match=r"objectives\.td: .*needs a decoder"):
        prepare(cfg)


# ------------------------------------------------------------------------------------------- bench
def test_bench_td_smoke():
    from raydistill.bench.td import bench_td

    r = bench_td(vocabs=(2000,), ks=(8,), ratio_k=8, batch_size=4, seq_len=64, reps=1, bf16=False,
                 extra_sizes=[(2, 16)])
    for key in ("memory_ratio", "memory_ratio_dtype", "step_ratio", "dtype", "device", "rows", "memory_ratios"):
        assert key in r
    assert r["memory_ratio"] > 0 and r["step_ratio"] > 0 and r["memory_ratio_dtype"] == "float32"
    kinds = {("objective", "kd"), ("objective", "td"), ("objective", "td-logits"), ("step", "kd"), ("step", "td")}
    # Every row at each size; the top-level ratios are the main size's (4 x 64), the extra one's in by_size.
    for b, t in ((4, 64), (2, 16)):
        assert {(row["what"], row["objective"]) for row in r["rows"] if (row["batch_size"], row["seq_len"]) == (b, t)
                } == kinds
    assert list(r["by_size"]) == ["4x64", "2x16"] and (r["batch_size"], r["seq_len"]) == (4, 64)
    assert r["by_size"]["4x64"]["memory_ratio"] == r["memory_ratio"]
    assert r["by_size"]["4x64"]["step_ratio"] == r["step_ratio"]
    assert r["by_size"]["2x16"]["memory_ratio"] > 0 and "2x16" in r["table"]


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_training_step_with_fused_head_matches_full_logits(preset):
    """Through the training step on a real model (GPT-2's head is tied to its input embedding): the fused head
    skips the student's B x T x V logits yet gives the same loss and the same gradient for every parameter."""
    from transformers import AutoModelForCausalLM

    from raydistill.data.masking import next_token_labels
    from raydistill.models.presets import preset_config
    from raydistill.train.step import DistillModule

    vocab, special = 97, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(preset_config(preset, vocab, special)).eval()
    student = AutoModelForCausalLM.from_config(preset_config(preset, vocab, special, {"n_layer": 2}
                                                             if preset == "tiny-gpt2" else {"num_hidden_layers": 2}))
    student.eval()  # no dropout: the two passes must see the same network
    ids = torch.randint(3, vocab, (2, 12))
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": attn, "labels": next_token_labels(ids, attn)}
    info = ModelInfo(False, vocab, 2, 64, 4, 64)
    results = []
    for fused in (True, False):
        objectives = build_objectives({"td": REGISTRY["td"].Settings(action_space={"k": 5}, fused_head=fused)}, info)
        module = DistillModule(student, objectives, info)
        student.zero_grad(set_to_none=True)
        loss, logs = module(batch, teacher)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (fused_loss, fused_grads), (full_loss, full_grads) = results
    torch.testing.assert_close(fused_loss, full_loss, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fused_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_student_logits_are_skipped_when_no_objective_reads_them():
    from transformers import AutoModelForCausalLM

    from raydistill.models.presets import preset_config
    from raydistill.train.step import run_model

    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    model = AutoModelForCausalLM.from_config(preset_config("tiny-gpt2", 50, special)).eval()
    batch = {"input_ids": torch.randint(50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    out = run_model(model, batch, set(), None, logits=False, head=True)
    assert out.logits is None and out.head.hidden.shape == (2, 7, 64)
    full = run_model(model, batch, set(), None)
    torch.testing.assert_close(out.head.module(out.head.hidden), full.logits)
    assert not model.lm_head._forward_pre_hooks  # the capture hook is gone
