"""DeepSpeed for a run: its config, generated from the experiment config, and its import."""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any

from raydistill.config import ExperimentConfig


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # Export gathers full weights on rank 0 (save_pretrained layout).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # DeepSpeed's bf16 overflow check (on by default) reads two values on the host every step, a wait for the
        # device on a GPU, and silently drops updates with non-finite gradients; raydistill's own check
        # (train.nonfinite) handles non-finite losses, so the overflow check runs only where 'skip' relies on it.
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": t.nonfinite == "skip"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 12},
        "steps_per_print": 10**9,  # raydistill reports progress itself
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        # Offloaded optimizer states need DeepSpeed's CPU Adam, configured here instead of a client optimizer.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                                           "weight_decay": t.weight_decay}}
    return _merge(config, ds.extra)


def teacher_deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """ZeRO-3 parameter partitioning for the frozen teacher (no optimizer: ZeRO-Inference)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "zero_optimization": {"stage": 3, **({"offload_param": {"device": "cpu"}} if cfg.deepspeed.offload_params
                                             else {})},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10**9,
    }


def import_deepspeed():
    """``import deepspeed`` without the MLflow import DeepSpeed's autotuner does when DeepSpeed is imported: ~1.1 s
    of every train worker's start-up on a 2-core machine (1.7 s with pandas where nothing else loads it), for
    autotuning runs, which raydistill never starts. Only that import is skipped: ``import mlflow`` afterwards works
    as usual (the sweep's MLflow callback on the driver, a user's own code)."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # a None entry makes `import mlflow` fail
        try:
            import deepspeed  # noqa: F401
        finally:
            if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
                del sys.modules["mlflow"]
    import deepspeed

    _skip_shm_comm_op()
    _defer_muon_compile()
    return deepspeed


def _skip_shm_comm_op() -> None:
    """Stop DeepSpeed's comm backend from building its shared-memory all-reduce op on CPU ranks. DeepSpeed builds
    it (a C++ extension, compiled with g++ and ninja on the machine's first run: ~40 s and ~70 s of CPU on a
    2-core VM, and a failed run where there is no compiler) whenever its process group starts on the CPU
    accelerator, but only uses it in ``inference_all_reduce`` (tensor-parallel inference), which training never
    calls. With no op, DeepSpeed keeps plain torch.distributed collectives, which training uses anyway. GPU ranks
    never build it (the CUDA accelerator has no such builder). A DeepSpeed without this hook is left as it is."""
    # (importlib: the attribute deepspeed.comm.torch is the torch package, not this module)
    backend = importlib.import_module("deepspeed.comm.torch")
    if callable(getattr(backend, "build_shm_op", None)):
        backend.build_shm_op = lambda: None


def _defer_muon_compile() -> None:
    """Make DeepSpeed's Muon kernels wrap themselves in ``torch.compile`` on their first call instead of at import.
    ZeRO's optimizer set-up imports DeepSpeed's Muon module (for an isinstance check) whatever the optimizer, and its
    ``@compiler.compile()`` decorators build ``torch.compile`` wrappers at import, which loads torch's inductor
    (~550 modules): ~1.1-1.6 s of every worker's ``deepspeed.initialize`` on a 2-core VM. Compilation itself is
    lazy in torch either way, so a Muon run compiles the same kernels at the same point, its first call. Only
    Muon's kernels use this decorator. A Muon module already imported, or a DeepSpeed without this decorator, is
    left as it is."""
    compiler = sys.modules.get("deepspeed.runtime.compiler")
    if "deepspeed.runtime.zero.muon.original_muon" not in sys.modules and callable(getattr(compiler, "compile", None)):
        compiler.compile = lambda: _compile_on_first_call


def _compile_on_first_call(fn, **options):
    """``torch.compile(fn, **options)``, built when ``fn`` is first called."""
    import torch

    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return call
