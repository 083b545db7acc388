"""``td``: the sanity property, a hand-computed loss, the gathered computation against a dense B x T x V
reference, action sets, transitions, configuration, and a smoke run of ``raydistill bench td``."""

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


def make_step(student, teacher, labels, info=INFO):
    """The student's logits both as logits and as the input of an identity output head, so the fused-head
    path (the default) and the gather-from-logits path see the same values and give ``student`` its gradient."""
    batch = {"attention_mask": torch.ones_like(labels), "labels": labels}
    head = HeadInput(student, identity_head(student.size(-1), student.dtype))
    return Step(batch=batch, student=ForwardResult(student, head=head), teacher=ForwardResult(teacher),
                student_model=None, teacher_model=None, info=info)


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


# ------------------------------------------------------------------------------------------- the sanity property
def test_gamma_zero_full_vocabulary_is_cross_entropy():
    student, teacher, labels = random_case()
    loss = td_loss(student, teacher, labels, action_space={"k": V}, gamma=0.0, alpha=None, q_min=None)
    ce = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ce.item(), abs=1e-5)


# ------------------------------------------------------------------------------------------- by hand
def test_hand_computed_two_steps():
    # Vocabulary of 5, k = 2, gamma = 0.9, alpha = 0.1 (phi(x) = x - x^2/0.4), tau = 1, no clipping reached.
    teacher = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -1.0],    # A(s0) = {0, 1}
                             [0.0, 1.0, 4.0, 3.0, 2.0],     # A(s1) = {2, 3}
                             [0.0, 0.0, 0.0, 0.0, 0.0]]])   # unlabelled: never read
    student = torch.tensor([[[1.0, 2.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 1.0, 3.0, 2.0],
                             [9.0, 0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 4, -100]])  # a0 = 1 (in A(s0)); a1 = 4 (outside A(s1)); s2 terminal for t=1
    info = ModelInfo(False, 5, 2, 4, 4, 4)

    def phi(x):
        return x - x * x / 0.4

    # include: A'(s0) = {0, 1}: Q = [1-2, 2-2] = [-1, 0]; V0 = log(e^-1 + 1); Q(s0, a0) = 0.
    #          A'(s1) = {2, 3, 4}: Q = [1-3, 3-3, 2-3] = [-2, 0, -1]; V1 = log(e^-2 + 1 + e^-1); Q(s1, a1) = -1.
    v0 = math.log(math.exp(-1) + 1)
    v1 = math.log(math.exp(-2) + 1 + math.exp(-1))
    x0, x1 = 0.0 - 0.9 * v1, -1.0 - 0.0  # t=1's next state is terminal
    expected = -(phi(x0) + phi(x1)) / 2 + ((v0 - 0.9 * v1) + (v1 - 0.0)) / 2
    got = td_loss(student, teacher, labels, info, action_space={"k": 2}, gamma=0.9, alpha=0.1)
    assert got.item() == pytest.approx(expected, abs=1e-5)

    # skip: A(s1) = {2, 3}: Q = [-2, 0]; V1 = log(e^-2 + 1); t=1 drops its phi term but keeps its value term.
    v1s = math.log(math.exp(-2) + 1)
    expected_skip = -phi(-0.9 * v1s) + ((v0 - 0.9 * v1s) + v1s) / 2
    got = td_loss(student, teacher, labels, info, action_space={"k": 2}, gamma=0.9, alpha=0.1, expert="skip")
    assert got.item() == pytest.approx(expected_skip, abs=1e-5)

    # Clipping at -1.5: Q(s1, 2) = -2 -> -1.5.
    v1c = math.log(math.exp(-1.5) + 1 + math.exp(-1))
    expected_clip = -(phi(-0.9 * v1c) + phi(-1.0)) / 2 + ((v0 - 0.9 * v1c) + v1c) / 2
    got = td_loss(student, teacher, labels, info, action_space={"k": 2}, gamma=0.9, alpha=0.1, q_min=-1.5)
    assert got.item() == pytest.approx(expected_clip, abs=1e-5)


# ------------------------------------------------------------------------------------------- dense reference
def dense_reference(student, teacher, labels, s):
    """The objective written directly on B x T x V tensors with a membership mask, and its transitions as
    explicit loops over positions."""
    B, T, vocab = student.shape
    t = teacher.float()
    rank = (t.unsqueeze(-1) < t.unsqueeze(-2)).sum(-1)  # tokens strictly more likely (no ties in random data)
    if s.action_space.kind == "top_k":
        member = rank < s.action_space.k
    else:
        probs = t.softmax(-1)
        mass_before = (probs.unsqueeze(-2) * (t.unsqueeze(-2) > t.unsqueeze(-1))).sum(-1)
        member = (mass_before < s.action_space.p) & (rank < s.action_space.max_k)
    labelled = labels != -100
    expert = F.one_hot(labels.clamp_min(0), vocab).bool() & labelled.unsqueeze(-1)
    in_set = (member & expert).any(-1)
    if s.expert == "include":
        member = member | expert
    z = student / s.temperature
    q_all = z - z.masked_fill(~member, float("-inf")).amax(-1, keepdim=True)
    if s.q_min is not None:
        q_all = q_all.clamp_min(s.q_min)
    value = q_all.masked_fill(~member, float("-inf")).logsumexp(-1)
    q_expert = q_all.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    phi_terms, value_terms = [], []
    for b in range(B):
        for i in range(T):
            if not labelled[b, i]:
                continue
            nxt = value[b, i + 1] if i + 1 < T and labelled[b, i + 1] else torch.tensor(0.0)
            value_terms.append(value[b, i] - s.gamma * nxt)
            if s.expert == "include" or in_set[b, i]:
                x = q_expert[b, i] - s.gamma * nxt
                phi_terms.append(x - x * x / (4 * s.alpha) if s.alpha is not None else x)
    return -torch.stack(phi_terms).mean() + torch.stack(value_terms).mean()


@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("settings", [
    dict(action_space={"kind": "top_k", "k": 3}),
    dict(action_space={"kind": "top_k", "k": 3}, expert="skip", chunk_size=2),
    dict(action_space={"kind": "top_p", "p": 0.6, "max_k": 5}, chunk_size=4),
    dict(action_space={"kind": "top_p", "p": 0.9, "max_k": 4}, expert="skip"),
    dict(action_space={"kind": "top_k", "k": 4}, q_min=-1.0, temperature=2.0, chunk_size=1),
    dict(action_space={"kind": "top_p", "p": 0.5}, q_min=None, alpha=None, gamma=0.5),
])
def test_gathered_equals_dense_reference(settings, fused_head):
    student, teacher, labels = random_case(seed=3)
    s = REGISTRY["td"].Settings(**settings)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    got = td(**settings, fused_head=fused_head)(make_step(a, teacher, labels))["td"]
    want = dense_reference(b, teacher, labels, s)
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_chunking_gives_identical_results():
    student, teacher, labels = random_case(seed=5)
    for space in ({"kind": "top_k", "k": 4}, {"kind": "top_p", "p": 0.7}):
        whole = td_loss(student, teacher, labels, action_space=space)
        for chunk in (1, 2, 4, 100):
            assert td_loss(student, teacher, labels, action_space=space, chunk_size=chunk).item() == whole.item()


@pytest.mark.parametrize("fused_head", [True, False])
def test_bf16_logits_give_bf16_gradient(fused_head):
    student, teacher, labels = random_case(seed=6)
    a = student.bfloat16().requires_grad_(True)
    td(fused_head=fused_head)(make_step(a, teacher.bfloat16(), labels))["td"].backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad.float()).all()


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
    vocabulary is B x chunk x V with chunk_size)."""
    B, T, vocab = 2, 8, 500
    student, teacher, labels = random_case(seed=7, B=B, T=T, vocab=vocab)
    info = ModelInfo(False, vocab, 2, 4, 4, 4)
    for settings, bound in ((dict(action_space={"k": 8}, fused_head=False), B * T * 9),
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
    weight and the bias, also when it works a few positions at a time and when tokens repeat across them."""
    from raydistill.objectives import head_columns as hc

    monkeypatch.setattr(hc, "_CHUNK_ELEMENTS", 40)  # chunks of a few positions
    B, T, vocab, width, K = 2, 5, 30, 4, 6
    head = random_head(vocab, width, bias)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, width, generator=g, requires_grad=True)
    index = torch.randint(vocab, (B, T, K), generator=g)
    index[..., -1] = index[..., 0]  # a token twice in one row, as the expert column duplicates A(s)
    upstream = torch.randn(B, T, K, generator=g)

    got = hc.head_columns(HeadInput(hidden, head), index)
    (got * upstream).sum().backward()
    got_grads = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    want = head(hidden).gather(-1, index)
    (want * upstream).sum().backward()
    want_grads = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_head_creates_nothing_vocabulary_sized_forward_or_backward():
    """With the fused head, neither pass creates a tensor of B x T x V elements: the largest is the head's
    own V x H gradient (H < B x T here) or a chunk's gathered head rows."""
    B, T, vocab, width, k = 2, 8, 500, 4, 8
    head = random_head(vocab, width, bias=True)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, width, generator=g, requires_grad=True)
    _, teacher, labels = random_case(seed=7, B=B, T=T, vocab=vocab)
    info = ModelInfo(False, vocab, 2, width, 4, width)
    step = Step(batch={"attention_mask": torch.ones_like(labels), "labels": labels},
                student=ForwardResult(None, head=HeadInput(hidden, head)), teacher=ForwardResult(teacher),
                student_model=None, teacher_model=None, info=info)
    obj = td(info, action_space={"k": k})
    assert obj.needs().student_head and not obj.needs().student_logits
    with _LargestOutput() as mode:
        obj(step)["td"].backward()
    assert mode.largest <= max(vocab * width, B * T * (k + 1) * width) < B * T * vocab
    assert hidden.grad is not None and head.weight.grad.abs().sum() > 0


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
    flat = top_k_actions(torch.zeros(1, 1, 7), 3)  # ties: three distinct tokens, in topk's order
    assert flat.index.unique().numel() == 3 and torch.equal(flat.index, torch.zeros(1, 1, 7).topk(3, -1).indices)


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
    assert torch.equal(ties.index[ties.valid], torch.zeros(1, 1, 10).topk(10, -1).indices.view(-1)[:3])


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
    assert padded.item() == pytest.approx(trimmed.item(), abs=1e-6)
    # A single labelled position is terminal: the loss is -phi(Q(s, a)) + V(s), whatever gamma is.
    one = torch.full_like(labels, -100)
    one[0, 2] = 5
    losses = {g: td_loss(student, teacher, one, action_space={"k": 3}, gamma=g).item() for g in (0.0, 0.5, 0.99)}
    assert losses[0.0] == pytest.approx(losses[0.5], abs=1e-6) == pytest.approx(losses[0.99], abs=1e-6)


def test_logged_components():
    student, teacher, labels = random_case(seed=10)
    out = td(action_space={"k": V})(make_step(student, teacher, labels))
    assert set(out) == {"td", "td/q_expert", "td/value", "td/chi2", "td/action_set_size", "td/expert_in_set"}
    assert out["td/action_set_size"].item() == V and out["td/expert_in_set"].item() == 1.0
    assert out["td/q_expert"].item() <= 0 and out["td/chi2"].item() >= 0
    assert td(action_space={"k": 1})(make_step(student, teacher, labels))["td/expert_in_set"].item() < 1
    assert td().needs().teacher_logits


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

    r = bench_td(vocabs=(2000,), ks=(8,), ratio_k=8, batch_size=4, seq_len=64, reps=1, bf16=False)
    for key in ("memory_ratio", "memory_ratio_dtype", "step_ratio", "dtype", "device", "rows", "memory_ratios"):
        assert key in r
    assert r["memory_ratio"] > 0 and r["step_ratio"] > 0 and r["memory_ratio_dtype"] == "float32"
    assert {(row["what"], row["objective"]) for row in r["rows"]} == {
        ("objective", "kd"), ("objective", "td"), ("objective", "td-logits"), ("step", "kd"), ("step", "td")}


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
