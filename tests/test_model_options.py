"""Model options of the teacher and student sections: attention kernel, dtype, activation checkpointing and
torch.compile of the student, with the objectives' block hooks (IIT's interventions included)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from raydistill.config import ModelSpec, StudentSpec, load_config
from raydistill.errors import ConfigError
from raydistill.models.adapters import find_blocks
from raydistill.models.loading import (_checkpoints_forward, build_model, check_attention, prepare_student,
                                       teacher_dtype)
from raydistill.models.presets import preset_config
from raydistill.objectives import REGISTRY, build_objectives
from raydistill.train.step import DistillModule
from test_iit import make_batch, models

SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def distill_module(arch: str, reuse: bool) -> tuple[DistillModule, torch.nn.Module, dict]:
    """iit (every aligned pair, writing hooks when ``reuse`` is off) + kd + cosine on a tiny model, in train
    mode (dropout on)."""
    teacher, student, info = models(arch)
    student.train()
    settings = {"kd": REGISTRY["kd"].Settings(), "cosine": REGISTRY["cosine"].Settings(weight=0.5),
                "iit": REGISTRY["iit"].Settings(pair_sampling="all", reuse_base_prefix=reuse)}
    return DistillModule(student, build_objectives(settings, info), info), teacher, make_batch(info.is_encoder)


def loss_and_grads(module: DistillModule, teacher, batch, count: bool = True
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    """The step's loss and gradients, and (``count``) per student block how often a module inside it ran during
    backward (recomputation calls it again)."""
    blocks = find_blocks(module.student)[1] if count else []
    calls = [0] * len(blocks)
    handles = [(getattr(b, "attn", None) or b.attention).register_forward_hook(
        lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)]
    module.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks in both runs (checkpointing replays the RNG state)
    loss, _ = module(batch, teacher, {"seed": 5})
    in_forward = list(calls)
    loss.backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, [c - f for c, f in zip(calls, in_forward)]


@pytest.mark.parametrize("reuse", [False, True], ids=["hooks-write", "resumed"])
@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-bert"])
def test_checkpointing_gives_the_same_loss_and_gradients_with_iit_kd_cosine(arch, reuse):
    plain, teacher, batch = distill_module(arch, reuse)
    ckpt = copy.deepcopy(plain)
    prepare_student(ckpt.student, StudentSpec(gradient_checkpointing=True))
    loss, grads, plain_replays = loss_and_grads(plain, teacher, batch)
    ckpt_loss, ckpt_grads, replays = loss_and_grads(ckpt, teacher, batch)
    # Backward recomputed every checkpointed block (and nothing without checkpointing).
    assert plain_replays == [0, 0] and all(r > 0 for r in replays)
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ckpt_grads.keys() == {n for n, _ in plain.named_parameters()}
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def old_style_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint each block's whole call, module hooks included, as transformers 4.x's layers did."""
    from torch.utils.checkpoint import checkpoint

    for block in find_blocks(model)[1]:
        base = type(block)

        class WholeCall(base):  # noqa: B903 - a class per block type, so that isinstance checks still hold
            def __call__(self, *args, **kwargs):
                return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)

        block.__class__ = WholeCall


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-bert"])
def test_checkpointing_whole_block_calls_breaks_writing_hooks_and_is_refused(arch):
    """The pitfall the hooks-outside rule avoids: when the checkpointed code includes the hooks, backward
    recomputes a block after its intervention hook was removed, so the recomputation differs from the forward."""
    plain, teacher, batch = distill_module(arch, reuse=False)
    old = copy.deepcopy(plain)
    old_style_checkpointing(old.student)
    _, grads, _ = loss_and_grads(plain, teacher, batch)
    try:
        _, old_grads, _ = loss_and_grads(old, teacher, batch)
    except torch.utils.checkpoint.CheckpointError:
        pass  # torch noticed the recomputation differs
    else:
        assert any(not torch.allclose(old_grads[n], g, rtol=1e-5, atol=1e-7) for n, g in grads.items())
    assert not _checkpoints_forward(find_blocks(old.student)[1][0])
    assert _checkpoints_forward(find_blocks(plain.student)[1][0])
    with pytest.raises(ConfigError, match="student.gradient_checkpointing: the installed transformers .* checkpoints "
                       "whole WholeCall calls"):
        prepare_student(old.student, StudentSpec(gradient_checkpointing=True))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["compiled", "compiled+checkpointed"])
def test_compiled_student_blocks_give_the_same_loss_and_gradients_with_iit_kd_cosine(checkpointing):
    """Regional compilation keeps the objectives' hooks eager around the compiled block code. aot_eager traces
    what inductor would compile (graph capture, autograd) without its slow C++ code generation."""
    torch._dynamo.reset()
    plain, teacher, batch = distill_module("tiny-gpt2", reuse=False)
    compiled = copy.deepcopy(plain)
    prepare_student(compiled.student, StudentSpec(compile=True, compile_backend="aot_eager",
                                                  gradient_checkpointing=checkpointing))
    loss, grads, _ = loss_and_grads(plain, teacher, batch)
    counters.clear()
    for _ in range(2):  # the second step runs the cached graphs
        # (no counting hooks: inside a compiled block they would be side effects that break the graph)
        c_loss, c_grads, _ = loss_and_grads(compiled, teacher, batch, count=False)
        torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(c_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Compiled, not run eagerly after a graph break: every block shares graphs (no recompile per layer).
    assert counters["stats"]["unique_graphs"] >= 1 and not any("graph_break" in k for k in counters)
    assert counters["stats"]["unique_graphs"] <= 4


# ------------------------------------------------------------------------------------------ config and loading
def config(*overrides: str):
    return load_config(None, ["teacher.name=tiny-gpt2", *overrides])


@pytest.mark.parametrize("override, words", [
    ("student.attn_implementation=flash3", ["student.attn_implementation", "'sdpa'", "'flash_attention_2'",
                                            "'eager'", "flash3"]),
    ("teacher.torch_dtype=fp8", ["teacher.torch_dtype", "'float32'", "'bfloat16'", "'float16'", "fp8"]),
    ("student.compile_backend=tvm", ["student.compile_backend", "'inductor'", "'aot_eager'", "tvm"]),
    ("student.gradient_checkpointing=maybe", ["student.gradient_checkpointing", "maybe"]),
])
def test_bad_values_name_the_field_the_value_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        config(override)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("overrides, words", [
    # DeepSpeed trains the student in train.precision's dtype: another student dtype would not be what runs.
    (["student.torch_dtype=bfloat16"], ["student.torch_dtype 'bfloat16'", "train.precision 'fp32'",
                                        "allowed: 'float32' or unset"]),
    (["student.torch_dtype=float32", "train.precision=bf16"], ["student.torch_dtype 'float32'",
                                                               "allowed: 'bfloat16' or unset"]),
    # A ZeRO-3-sharded teacher is cast by DeepSpeed to train.precision's dtype.
    (["teacher.torch_dtype=float32", "train.precision=bf16", "deepspeed.zero_stage=3"],
     ["teacher.torch_dtype 'float32'", "ZeRO-3", "allowed: 'bfloat16' or unset, or deepspeed.shard_teacher=false"]),
    (["student.compile=true", "deepspeed.zero_stage=3"], ["student.compile", "zero_stage 3", "allowed: compile=false"]),
])
def test_contradictory_combinations_are_refused(overrides, words):
    with pytest.raises(ConfigError) as e:
        config(*overrides)
    for word in words:
        assert word in str(e.value)


def test_coherent_combinations_are_accepted_and_set_the_teacher_dtype():
    assert teacher_dtype(config()) is None  # fp32: the teacher stays as loaded
    assert teacher_dtype(config("train.precision=bf16")) is torch.bfloat16  # default: train.precision's
    assert teacher_dtype(config("student.torch_dtype=bfloat16", "train.precision=bf16")) is torch.bfloat16
    # A frozen, unsharded teacher may keep full precision under bf16 training, or run in half under fp32.
    assert teacher_dtype(config("teacher.torch_dtype=float32", "train.precision=bf16")) is torch.float32
    assert teacher_dtype(config("teacher.torch_dtype=bfloat16")) is torch.bfloat16
    assert teacher_dtype(config("teacher.torch_dtype=float32", "train.precision=bf16", "deepspeed.zero_stage=3",
                                "deepspeed.shard_teacher=false")) is torch.float32
    cfg = config("student.gradient_checkpointing=true", "student.compile=true", "student.attn_implementation=eager")
    assert cfg.student.gradient_checkpointing and cfg.student.compile and cfg.student.compile_backend == "inductor"


def test_models_load_with_the_attention_kernel_and_dtype_asked_for():
    cfg = preset_config("tiny-gpt2", 100, SPECIAL)
    model = build_model(cfg, spec=ModelSpec(name="tiny-gpt2", attn_implementation="eager", torch_dtype="bfloat16"))
    assert model.config._attn_implementation == "eager" and model.dtype == torch.bfloat16
    # Teacher mode trains the teacher: its attention kernel but not its dtype (train.precision decides).
    model = build_model(cfg, spec=ModelSpec(name="tiny-gpt2", attn_implementation="eager", torch_dtype="float16"),
                        dtype=False)
    assert model.config._attn_implementation == "eager" and model.dtype == torch.float32
    assert build_model(cfg).config._attn_implementation == "sdpa"  # unset: transformers' default


def test_flash_attention_is_refused_by_name_where_it_is_not_installed():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    spec = ModelSpec(name="tiny-bert", attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match=r"teacher.attn_implementation 'flash_attention_2' needs the 'flash_attn' "
                       r"package.*allowed here: sdpa, eager"):
        check_attention(preset_config("tiny-bert", 100, SPECIAL), spec, "teacher")
    check_attention(preset_config("tiny-bert", 100, SPECIAL), ModelSpec(name="tiny-bert", attn_implementation="sdpa"),
                    "teacher")


def test_an_attention_kernel_the_model_class_lacks_is_refused_by_name(monkeypatch):
    from transformers import GPT2LMHeadModel

    monkeypatch.setattr(GPT2LMHeadModel, "_supports_sdpa", False)
    with pytest.raises(ConfigError, match=r"student.attn_implementation: GPT2LMHeadModel does not support 'sdpa'; "
                       r"allowed: .*eager"):
        check_attention(preset_config("tiny-gpt2", 100, SPECIAL), ModelSpec(name="x", attn_implementation="sdpa"),
                        "student")


def test_the_driver_checks_run_the_model_options_before_ray():
    from raydistill.train.preflight import check_models

    check_models(config("student.gradient_checkpointing=true", "student.attn_implementation=eager"))
    if __import__("importlib.util").util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="student.attn_implementation 'flash_attention_2'"):
            check_models(config("student.attn_implementation=flash_attention_2"))
