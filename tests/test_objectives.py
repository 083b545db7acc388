"""Each standard objective against hand-computed values, and its defining properties."""

import math

import pytest
import torch

from raydistill.errors import ConfigError
from raydistill.objectives import REGISTRY, build_objectives
from raydistill.objectives.base import ForwardResult, ModelInfo, Step

INFO = ModelInfo(is_encoder=True, vocab_size=3, student_layers=2, student_hidden=2, teacher_layers=4, teacher_hidden=2)


def make_step(student_logits, teacher_logits=None, labels=None, mask=None, s_hidden=None, t_hidden=None, info=INFO):
    B, T, _ = student_logits.shape
    batch = {"attention_mask": mask if mask is not None else torch.ones(B, T, dtype=torch.long),
             "labels": labels if labels is not None else torch.full((B, T), -100)}
    return Step(batch=batch, student=ForwardResult(student_logits, s_hidden or {}),
                teacher=None if teacher_logits is None else ForwardResult(teacher_logits, t_hidden or {}),
                student_model=None, teacher_model=None, info=info)


def objective(name, info=INFO, **settings):
    return build_objectives({name: REGISTRY[name].Settings(**settings)}, info)[name]


def test_task_cross_entropy_hand_computed():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]]])
    labels = torch.tensor([[1, 1]])
    # position 0: -log(1/3); position 1: -log(2/4)
    expected = (math.log(3.0) + math.log(2.0)) / 2
    assert objective("task")(make_step(logits, labels=labels))["task"].item() == pytest.approx(expected, abs=1e-6)


def test_task_ignores_unlabelled_positions():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [5.0, -5.0, 0.0]]])
    labels = torch.tensor([[1, -100]])
    assert objective("task")(make_step(logits, labels=labels))["task"].item() == pytest.approx(math.log(3.0), abs=1e-6)


def test_kd_hand_computed_with_tau_squared():
    t = torch.tensor([[[1.0, 2.0, 3.0]]])
    s = torch.tensor([[[3.0, 2.0, 1.0]]])
    # tau = 2: z/2 = [.5, 1, 1.5] vs [1.5, 1, .5]; both share one logsumexp, so
    # log p_T - log p_S = [-1, 0, 1] and KL = p_T[2] - p_T[0].
    e = [math.exp(0.5), math.exp(1.0), math.exp(1.5)]
    p = [x / sum(e) for x in e]
    expected = 4.0 * (p[2] - p[0])
    got = objective("kd", temperature=2.0)(make_step(s, t))["kd"].item()
    assert got == pytest.approx(expected, abs=1e-6)
    # tau = 1: log-ratio [-2, 0, 2] under softmax([1, 2, 3]).
    e1 = [math.exp(1.0), math.exp(2.0), math.exp(3.0)]
    p1 = [x / sum(e1) for x in e1]
    assert objective("kd", temperature=1.0)(make_step(s, t))["kd"].item() == pytest.approx(2 * (p1[2] - p1[0]), abs=1e-6)


def test_kd_zero_for_identical_models_and_positive_otherwise():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 7)
    info = ModelInfo(True, 7, 2, 4, 2, 4)
    assert objective("kd", info)(make_step(z, z.clone(), info=info))["kd"].item() == pytest.approx(0.0, abs=1e-7)
    assert objective("kd", info)(make_step(z, torch.randn(2, 5, 7), info=info))["kd"].item() > 0


def test_kd_excludes_padding_and_can_restrict_to_masked_positions():
    torch.manual_seed(1)
    s, t = torch.randn(1, 3, 3), torch.randn(1, 3, 3)
    mask = torch.tensor([[1, 1, 0]])
    kd = objective("kd", temperature=1.0)
    base = kd(make_step(s, t, mask=mask))["kd"]
    s2 = s.clone()
    s2[0, 2] += 100.0  # anything at a padding position is irrelevant
    assert kd(make_step(s2, t, mask=mask))["kd"].item() == pytest.approx(base.item(), abs=1e-6)
    only_first = kd(make_step(s[:, :1], t[:, :1]))["kd"]
    masked = objective("kd", temperature=1.0, masked_only=True)(
        make_step(s, t, labels=torch.tensor([[2, -100, -100]]), mask=mask))["kd"]
    assert masked.item() == pytest.approx(only_first.item(), abs=1e-6)


def test_cosine_hand_computed_and_zero_for_identical():
    hs = {1: torch.tensor([[[1.0, 0.0]]])}
    ht = {3: torch.tensor([[[1.0, 1.0]]])}
    z = torch.zeros(1, 1, 3)
    cos = objective("cosine")
    assert cos(make_step(z, z, s_hidden=hs, t_hidden=ht))["cosine"].item() == pytest.approx(1 - 1 / math.sqrt(2),
                                                                                          abs=1e-6)
    assert cos(make_step(z, z, s_hidden=ht | {1: ht[3]}, t_hidden=ht))["cosine"].item() == pytest.approx(0, abs=1e-6)


def test_cosine_pairs_needs_and_out_of_range():
    cos = objective("cosine", pairs=[{"teacher": 1, "student": 0}, {"teacher": -1, "student": -1}])
    assert cos.needs().teacher_layers == {1, 3} and cos.needs().student_layers == {0, 1}
    with pytest.raises(ConfigError, match=r"objectives.cosine.pairs.teacher: layer 4 out of range.*-4..3"):
        objective("cosine", pairs=[{"teacher": 4, "student": 0}])


def test_cosine_learns_a_projection_when_widths_differ():
    info = ModelInfo(True, 3, 2, 2, 4, 3)
    cos = objective("cosine", info)
    assert cos.proj is not None and cos.proj.weight.shape == (3, 2)
    hs = {1: torch.randn(1, 4, 2, requires_grad=True)}
    loss = cos(make_step(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), s_hidden=hs, t_hidden={3: torch.randn(1, 4, 3)},
                         info=info))["cosine"]
    loss.backward()
    assert cos.proj.weight.grad is not None and hs[1].grad is not None


def test_weighted_sum_in_distill_module_uses_every_term():
    from transformers import BertConfig, BertForMaskedLM

    from raydistill.train.step import DistillModule

    cfg = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    torch.manual_seed(0)
    student, teacher = BertForMaskedLM(cfg).eval(), BertForMaskedLM(cfg).eval()
    info = ModelInfo(True, 11, 2, 8, 2, 8)
    settings = {"task": REGISTRY["task"].Settings(weight=0.5), "kd": REGISTRY["kd"].Settings(weight=2.0),
                "cosine": REGISTRY["cosine"].Settings(weight=3.0)}
    module = DistillModule(student, build_objectives(settings, info), info)
    batch = {"input_ids": torch.randint(11, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "labels": torch.randint(11, (2, 6))}
    total, logs = module(batch, teacher)
    expected = 0.5 * logs["task"] + 2 * logs["kd"] + 3 * logs["cosine"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(logs[k] > 0 for k in ("task", "kd", "cosine"))
    # With the teacher as its own student, kd and cosine vanish.
    same = DistillModule(teacher, build_objectives(settings, info), info)
    _, logs = same(batch, teacher)
    assert logs["kd"].item() == pytest.approx(0, abs=1e-6) and logs["cosine"].item() == pytest.approx(0, abs=1e-6)


def test_an_objective_without_forward_cannot_be_built():
    from raydistill.objectives.base import Objective, ObjectiveSettings

    class Incomplete(Objective):
        name = "incomplete"

    with pytest.raises(TypeError, match="forward"):
        Incomplete(ObjectiveSettings(), INFO)
