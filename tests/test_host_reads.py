"""A training step reads nothing back from the device. On a GPU each such read (a value, an output whose size
depends on the data, a blocking copy) waits for all the work queued on the device and leaves it idle while
Python catches up. Checked on PyTorch's meta device, where every read raises: the step's models and batch on
meta, its host batch (as the training loop builds it) on the CPU.

The models run with eager attention here: transformers' SDPA path reads whether the attention mask is all ones
(for BERT its eager path does too), once per model forward; that read is transformers', made by any loop that
calls these models, and not the step's own."""

import math
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import raydistill
from raydistill.bench.throughput import BareLoop, bench_config

PACKAGE = Path(raydistill.__file__).parent

EAGER = ("teacher.attn_implementation=eager", "student.attn_implementation=eager")
EXTRAS = {"step": 1, "step_seed": 5, "seed": 7}


def loop_of(tmp_path, objectives, teacher, overrides=EAGER):
    cfg = bench_config(str(tmp_path / "out"), str(tmp_path / "cache"), teacher=teacher, teacher_overrides={},
                       student_layers=2, batch_size=4, block_size=32, precision="fp32",
                       objectives=tuple(objectives.split(",")), zero_stage=2, steps=2, window=1, use_gpu=False,
                       overrides=overrides)
    return BareLoop(cfg, torch.device("cpu"))


@pytest.fixture(autouse=True)
def blocking_copies_raise(monkeypatch):
    """``torch.tensor`` / ``torch.as_tensor`` of host data onto the meta device raise, as reads do: on a GPU they
    are blocking copies, which wait for the device like a read."""
    for name in ("tensor", "as_tensor"):
        def checked(data, *args, _real=getattr(torch, name), **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "meta" and not (
                    torch.is_tensor(data) and data.device.type == "meta"):
                raise RuntimeError("a blocking copy from the host onto a meta tensor")
            return _real(data, *args, **kwargs)
        monkeypatch.setattr(torch, name, checked)


def meta_step(loop, host: bool):
    """Forward and backward of one step on the meta device; the host batch given or not."""
    cpu = loop.data.batch(1)
    module, teacher = loop.module.to("meta"), loop.teacher.to("meta")
    loss, _ = module({k: v.to("meta") for k, v in cpu.items()}, teacher, dict(EXTRAS), host=cpu if host else None)
    loss.backward()
    return loss


def innermost_own(info: pytest.ExceptionInfo) -> str:
    """The innermost function of the raydistill package on the raised exception's stack."""
    return [f.name for f in info.traceback if Path(f.path).is_relative_to(PACKAGE)][-1]


def raising_site(fn) -> str:
    """The innermost raydistill function on the stack of the read that ``fn`` makes."""
    with pytest.raises(RuntimeError, match="meta tensor") as info:
        fn()
    return innermost_own(info)


@pytest.mark.parametrize("objectives,teacher", [("task,kd,cosine", "tiny-gpt2"), ("task,kd,cosine", "tiny-llama"),
                                                 ("task,iit", "tiny-gpt2"), ("kd,iit,iit_cosine", "tiny-llama")])
def test_a_step_with_its_host_batch_reads_nothing_from_the_device(tmp_path, objectives, teacher):
    assert meta_step(loop_of(tmp_path, objectives, teacher), host=True).device.type == "meta"


def test_iit_plans_from_the_host_batch_and_from_the_device_batch_without_one(tmp_path):
    """The plan depends on the masks and each example's key; without the host batch it reads them from the
    device (as evaluation helpers may), and is the same plan: the same loss and gradients."""
    loop = loop_of(tmp_path, "task,iit", "tiny-llama")
    cpu = loop.data.batch(1)
    results = []
    for host in (cpu, None):
        torch.manual_seed(0)
        loss, logs = loop.module(cpu, loop.teacher, dict(EXTRAS), host=host)
        loss.backward()
        grads = [p.grad.clone() for p in loop.module.parameters() if p.grad is not None]
        loop.module.zero_grad(set_to_none=True)
        results.append((loss.detach(), logs["iit/span_tokens"], grads))
    (loss_a, span_a, grads_a), (loss_b, span_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(span_a, span_b) and span_a > 0
    assert len(grads_a) == len(grads_b) > 0 and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert raising_site(lambda: meta_step(loop_of(tmp_path, "task,iit", "tiny-llama"), host=False)) == "sample_plan"


def test_td_online_reads_once_to_fix_ties_across_the_kth_place_and_sdpa_masks_are_read_by_transformers(tmp_path):
    """td's online top-k asks once per step whether any tie crosses its k-th place (the rows to redo); with
    SDPA attention, the first read is transformers' mask check, before any of the step's own code."""
    assert raising_site(lambda: meta_step(loop_of(tmp_path, "task,td", "tiny-llama"), host=True)) == \
        "_fix_crossing_rows"
    assert raising_site(lambda: meta_step(loop_of(tmp_path, "task,kd", "tiny-llama", overrides=()), host=True)) == \
        "run_model"


@pytest.mark.parametrize("objectives,overrides", [("task,td", ("objectives.td.fused_head=false",)),
                                                  ("task,kd", ("objectives.kd.top_k=8", "objectives.kd.tail_samples=4"))])
def test_top_k_objectives_read_nothing_else(tmp_path, monkeypatch, objectives, overrides):
    """With the tie check left out (it is the one read above), td and sparse KD with tail samples (whose
    counter-based uniforms start from the step's seed: a fill on the device, not a copy) read nothing. td's
    fused head reads once more, in its backward: the distinct tokens whose head rows get a gradient (a
    data-sized output), which keeps its accumulator to those rows instead of the V x H head."""
    import raydistill.objectives.teacher_signals as ts

    checks = []
    monkeypatch.setattr(ts, "_fix_crossing_rows", lambda *args: checks.append(args))
    meta_step(loop_of(tmp_path, objectives, "tiny-llama", overrides=EAGER + overrides), host=True)
    assert len(checks) == 1
    if objectives == "task,td":
        with pytest.raises(NotImplementedError, match="_unique2") as info:
            meta_step(loop_of(tmp_path, objectives, "tiny-llama", overrides=EAGER), host=True)
        assert innermost_own(info) == "backward"


class _Engine:
    """The calls the training loop makes of DeepSpeed's engine, on the real module (DeepSpeed's own step reads
    its gradient norm on the host: the README lists those reads)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def test_the_training_loops_step_reads_nothing_either(tmp_path):
    """Around the module: each objective's positions summed over the step's micro-batches, the logged values
    summed and put in one vector with the step's tokens (counted on the host batches), all left on the device."""
    from types import SimpleNamespace

    from raydistill.train.worker import TOKENS_KEY, Worker

    loop = loop_of(tmp_path, "task,kd,iit", "tiny-llama")
    w = Worker.__new__(Worker)
    w.rank, w.world, w.device = 0, 1, torch.device("meta")
    w.engine, w.teacher = _Engine(loop.module.to("meta")), loop.teacher.to("meta")
    w.cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=2, seed=0, nonfinite="stop"))
    w.plan = SimpleNamespace(prompts=None)
    w.on_policy = lambda batch, step, micro: None
    cpu = [(loop.data.batch(n), {}) for n in (1, 2)]
    moved = [({k: v.to("meta") for k, v in batch.items()}, {}) for batch, _ in cpu]
    keys, values, tokens = w.train_step(1, cpu, moved)
    assert values.device.type == "meta" and TOKENS_KEY in keys and "iit" in keys
    assert tokens == sum(int(batch["attention_mask"].sum()) for batch, _ in cpu)


class HostReads(TorchDispatchMode):
    """Counts the ops in ``ops`` (by default, reading a value and ``nonzero``: ops whose result a GPU hands to the
    host) made where ``where(files on the stack)`` holds (by default anywhere). On the CPU nothing waits, but the
    same calls wait for the device on a GPU."""

    def __init__(self, ops=(torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default),
                 where=None):
        super().__init__()
        self.ops, self.where, self.count = ops, where, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops and (self.where is None or self.where([f.filename for f in traceback.extract_stack()])):
            self.count += 1
        return func(*args, **(kwargs or {}))


def deepspeeds_own(files: list[str]) -> bool:
    """DeepSpeed's code, the optimizer it wraps left out (on CPU, torch's unfused AdamW reads its step counts,
    which the fused CUDA one does not)."""
    return any("/deepspeed/" in f for f in files) and not any("/torch/optim/" in f for f in files)


@pytest.mark.parametrize("nonfinite, reads, skipped", [("stop", 2, False), ("skip", 4, True)])
def test_deepspeed_checks_bf16_overflow_only_where_skipping_steps_relies_on_it(tmp_path, nonfinite, reads, skipped):
    """bf16 ZeRO-2 with clipping: DeepSpeed's overflow check reads two values per step (and drops an update
    whose gradients are not finite); its clipping reads one per parameter group. Under train.nonfinite=stop
    raydistill leaves the check off: raydistill's own check stops the run at a non-finite loss."""
    from raydistill.bench.throughput import EngineLoop, one_process_group

    cfg = bench_config(str(tmp_path / "out"), str(tmp_path / "cache"), teacher="tiny-gpt2", teacher_overrides={},
                       student_layers=2, batch_size=2, block_size=32, precision="bf16", objectives=("task",),
                       zero_stage=2, steps=2, window=1, use_gpu=False, overrides=(f"train.nonfinite={nonfinite}",))
    with one_process_group(torch.device("cpu")):
        loop = EngineLoop(cfg, torch.device("cpu"))
        engine = loop.engine
        loss, _ = engine(loop.data.batch(1), loop.teacher)
        engine.backward(loss)
        with HostReads(ops=(torch.ops.aten._local_scalar_dense.default,), where=deepspeeds_own) as mode:
            engine.step()
        assert mode.count == reads
        before = [p.detach().clone() for p in engine.module.parameters()]
        loss, _ = engine(loop.data.batch(2), loop.teacher)
        engine.backward(loss * math.inf)  # non-finite gradients
        engine.step()
        after = list(engine.module.parameters())
        assert all(torch.equal(a, b) for a, b in zip(after, before)) == skipped
        assert all(torch.isfinite(p).all() for p in after) == skipped
