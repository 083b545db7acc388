"""The per-worker training function that Ray Train runs: setup, step loop, evaluation, checkpoint, export.

Every rank runs this same function; rank 0 additionally prints progress, appends ``metrics.jsonl`` and
writes the exported student.

Data regimes of the main stream: corpus blocks (teacher-forced text), or prompt + response rows (with
``prompts``) whose responses are the dataset's references or the teacher's samples, generated here once
and cached (``generation.jsonl`` in the output directory records each generation or cache hit); with
``prompts.on_policy.probability`` (lambda) a micro-batch's responses are resampled from the student.
Extra streams (``streams``) add their own batches and objectives to every micro-step."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raydistill.data.blocks import BatchSampler
from raydistill.data.blocks import step_seed as _step_seed
from raydistill.data.prompts import ResponseSampler, Sequences, batch_prompts, build_sequences, rows_to_batch
from raydistill.errors import ConfigError
from raydistill.fsutil import normalise_modes, swap_dir, write_atomic, write_text_atomic
from raydistill.generation import (GenerationCache, generate_responses, generation_key, model_identity,
                                   on_policy_draw, padded_shard)
from raydistill.models.adapters import eval_mode
from raydistill.models.loading import (build_model, init_from_teacher, prepare_student, save_pretrained,
                                       teacher_dtype)
from raydistill.monitoring import board as phases
from raydistill.monitoring.board import Monitor
from raydistill.monitoring.metrics import RunMetrics, device_peak_flops, peak_memory_bytes, step_flops_per_token
from raydistill.objectives import build_objectives
from raydistill.train import checkpoints
from raydistill.train.ds_config import deepspeed_config, import_deepspeed, teacher_deepspeed_config
from raydistill.train.faults import (DivergenceWatch, NonFiniteGuard, NonFiniteLoss, RunFailure, nonfinite,
                                     write_failure)
from raydistill.train.host_memory import keep_freed_host_memory
from raydistill.train.plan import RunPlan
from raydistill.train.prefetch import Prefetcher
from raydistill.train.progress import ProgressPrinter
from raydistill.train.schedule import lr_lambda
from raydistill.train.step import DistillModule

CKPT_TAG = "state"
# The step's non-padding tokens, summed over workers with the logged values (popped before they are logged).
TOKENS_KEY = "_tokens"


class _ResumeChoice:
    """Rank 0's decision on what to resume from, shared with every rank."""

    def __init__(self, path: str | None, step: int | None, notes: list[str], error: str | None = None):
        self.path, self.step, self.notes, self.error = path, step, notes, error


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def adamw(groups, t, device) -> torch.optim.AdamW:
    """The client optimizer: torch's AdamW, its fused kernel on CUDA (one launch for all parameters instead of
    several per tensor)."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=fused or None)


def param_groups(module: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Worker:
    """State of one rank. ``run()`` is the whole job; methods are its steps, in order."""

    def __init__(self, plan: RunPlan, attempt: str | None = None, monitor: Monitor | None = None):
        import ray.train
        import ray.train.torch

        self.plan, self.cfg = plan, plan.cfg
        self.attempt = attempt  # the driver's token for this fit: tags the failure note it reads back
        self.monitor = monitor or Monitor(run=plan.cfg.name, metrics=plan.cfg.monitoring.metrics,
                                          peak_flops=plan.cfg.monitoring.peak_flops)
        self.flops_per_token: float | None = None
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.is_main = self.rank == 0
        self.output_dir = Path(plan.output_dir)
        self._teacher_rouge: float | None = None

    # ------------------------------------------------------------------------------------------- setup
    def build(self) -> None:
        deepspeed = import_deepspeed()

        cfg, plan = self.cfg, self.plan
        torch.manual_seed(cfg.train.seed)  # identical random init on every rank
        teacher, student, error = None, None, None
        # The teacher cache covering every teacher need: the teacher is loaded at most to initialise the student.
        cached = plan.teacher_cache is not None and not plan.teacher_cache.online
        self.teacher_cache = None
        try:
            if plan.teacher_config is not None and not (cached and plan.init_layers is None):
                # On a forked generator: the student's random init is the same whether the teacher is loaded or not.
                with torch.random.fork_rng(devices=[]):
                    teacher = self._load("teacher", plan.teacher_config, plan.teacher_source, plan.teacher_revision,
                                         cfg.teacher)
                teacher.requires_grad_(False).eval()
            # Teacher mode trains the teacher: its section's attention kernel, its dtype from train.precision.
            trained = cfg.teacher if plan.mode == "teacher" else cfg.student
            student = self._load("student", plan.student_config, plan.student_source, plan.student_revision,
                                 trained, dtype=plan.mode != "teacher")
            if plan.init_layers is not None:
                init_from_teacher(student, teacher, plan.init_layers, plan.block_paths[0])
            if plan.mode != "teacher":
                prepare_student(student, cfg.student, plan.block_paths[0])
            if plan.teacher_cache is not None:
                from raydistill.train.teacher_cache import Reader

                self.teacher_cache = Reader(plan.teacher_cache, self.rank)
                teacher = None if cached else teacher
        except (RunFailure, ConfigError) as e:
            error = e.message if isinstance(e, RunFailure) else str(e)
        self._agree(error)  # every rank stops together (a rank alone would hang in DeepSpeed's collectives)
        if self.teacher_cache is not None and self.is_main:
            teacher_note = ("is not loaded" if plan.init_layers is None else "was loaded only to initialise the "
                            "student") if cached else f"still runs ({'; '.join(plan.teacher_cache.online)})"
            print(f"[raydistill] teacher top-K signals from the teacher cache {plan.teacher_cache.root}; the teacher "
                  f"{teacher_note}", flush=True)
        run_dtype = teacher_dtype(cfg)
        if teacher is not None and run_dtype is not None:
            teacher.to(run_dtype)

        objectives = build_objectives(plan.objectives, plan.info)
        streams = {name: build_objectives(stream.objectives, plan.info) for name, stream in plan.streams.items()}
        module = DistillModule(student, objectives, plan.info, plan.block_paths, streams=streams)
        self.flops_per_token = self._flops_per_token(module, teacher)
        sharded_teacher = teacher is not None and cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.shard_teacher
        ds_cfg = deepspeed_config(cfg, self.world)
        t = cfg.train
        optimizer = None if "optimizer" in ds_cfg else adamw(param_groups(module, t.weight_decay), t, self.device)
        schedule = lr_lambda(t.lr_schedule, t.max_steps, t.warmup_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_cfg,
            model_parameters=None if optimizer is not None else param_groups(module, t.weight_decay),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        if teacher is not None:
            if sharded_teacher:
                teacher = deepspeed.initialize(model=teacher, config=teacher_deepspeed_config(cfg, self.world))[0]
                teacher = teacher.module
            else:
                teacher = teacher.to(self.device)
        self.teacher = teacher

        common = dict(batch_size=t.batch_size, rank=self.rank, world_size=self.world, seed=t.seed,
                      mlm_probability=cfg.data.mlm_probability)
        if plan.prompts is None:  # corpus text, teacher-forced
            blocks = plan.fetch_blocks()
            self.train_data = BatchSampler(blocks[0], plan.token_info, grad_accum=t.grad_accum, **common)
            self.val_data = BatchSampler(blocks[1], plan.token_info, grad_accum=1, **common)
        else:  # prompt + response rows; validation uses the held-out prompts' reference responses
            rows = plan.prompts.train_rows if plan.prompts.train_rows is not None else self.teacher_rows()
            self.train_data = ResponseSampler(rows, plan.token_info, grad_accum=t.grad_accum, **common)
            self.val_data = ResponseSampler(plan.prompts.val_rows, plan.token_info, grad_accum=1, **common)
        # Each stream shuffles with its own seed: a stream over the main corpus does not mirror its batches.
        self.stream_data: dict[str, tuple[BatchSampler, BatchSampler]] = {}
        for name, stream in plan.streams.items():
            kw = dict(common, batch_size=stream.batch_size, mlm_probability=stream.mlm_probability,
                      seed=_step_seed(t.seed, zlib.crc32(name.encode())))
            self.stream_data[name] = (BatchSampler(stream.blocks[0], plan.token_info, grad_accum=t.grad_accum, **kw),
                                      BatchSampler(stream.blocks[1], plan.token_info, grad_accum=1, **kw))

    def _flops_per_token(self, module: DistillModule, teacher: torch.nn.Module | None) -> float | None:
        """The step's estimated FLOPs per token (for FLOP/s and MFU), from the models before DeepSpeed wraps them."""
        plan = self.plan
        seq_len = plan.prompts.length if plan.prompts is not None else self.cfg.data.block_size
        sequences = {None: self.cfg.train.batch_size, **{name: s.batch_size for name, s in plan.streams.items()}}
        try:
            return step_flops_per_token(module, teacher, seq_len, sequences, cached_topk=self.teacher_cache is not None)
        except (AttributeError, TypeError):  # not a transformers model: no FLOP estimate, the rest is exported
            return None

    @staticmethod
    def _load(role: str, config, source: str | None, revision: str | None, spec=None,
              dtype: bool = True) -> torch.nn.Module:
        """``build_model``, with a weight file that does not load named in one line."""
        try:
            return build_model(config, source, revision, spec, dtype)
        except Exception as e:  # noqa: BLE001 - the cause is named in the message
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if spec is not None and spec.attn_implementation is not None and "ttention" in first:
                raise RunFailure(f"{role}.attn_implementation {spec.attn_implementation!r}: {first[:300]}") from None
            where = f"{role} weights in {source}" if source else f"{role} ({role} preset)"
            files = sorted(p.name for p in Path(source).glob("*.safetensors")) + sorted(
                p.name for p in Path(source).glob("*.bin")) if source and Path(source).is_dir() else []
            named = f" ({', '.join(files)})" if files else ""
            raise RunFailure(f"cannot load the {where}{named}: {type(e).__name__}: {first[:300]}") from None

    def _agree(self, error: str | None) -> None:
        """Raise ``RunFailure`` on every rank when any rank has an error (the first rank's message)."""
        errors = [error]
        if self.world > 1:
            errors = [None] * self.world
            dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise RunFailure(first)

    # ------------------------------------------------------------------------------------------- generation
    def _broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _generation_event(self, event: dict) -> None:
        if not self.is_main:
            return
        print(f"[raydistill] teacher samples: {event['event']} ({event['responses']} responses) {event['path']}",
              flush=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "generation.jsonl", "a") as f:
            f.write(json.dumps({**event, "time": time.time()}) + "\n")

    def teacher_rows(self) -> Sequences:
        """Regime (b): the teacher's ``num_samples`` responses to every training prompt, from the cache or
        generated now (each rank its shard, gathered everywhere, written once by rank 0)."""
        plan, cfg = self.plan, self.cfg
        prompts, spec = plan.prompts, plan.prompts.spec
        gen = spec.generation
        kwargs = gen.generate_kwargs(spec.max_response_tokens)
        identity = model_identity(plan.teacher_source, plan.teacher_revision, plan.teacher_config.to_json_string(),
                                  cfg.train.seed, cfg.train.precision,
                                  cfg.teacher.model_dump(include={"torch_dtype", "attn_implementation"}))
        key = generation_key(identity, prompts.train.digest(), prompts.tokenizer_fingerprint,
                             {**kwargs, "num_samples": gen.num_samples, "seed": gen.seed})
        cache = GenerationCache(cfg.cache_dir)
        start = time.perf_counter()
        if self.is_main:
            self.monitor.post(phase=phases.GENERATION)
        expected = len(prompts.train) * gen.num_samples
        cached = None
        if self.is_main and cache.exists(key):
            cached = cache.load(key)
            if len(cached) != expected:  # not what this key promises (a damaged file): generate again
                print(f"[raydistill] ignoring {cache.path(key)}: {len(cached)} responses, expected {expected}",
                      flush=True)
                cached = None
        # Rank 0 decides and shares: every rank takes the same branch, even without a shared cache_dir.
        cached = self._broadcast(cached)
        if cached is not None:
            responses = cached
            event = "cache_hit"
        else:
            mine, real = padded_shard(prompts.train.prompts, self.rank, self.world)
            tok = plan.tokenizer
            out = generate_responses(self.teacher, mine, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                                     generate_kwargs=kwargs, num_samples=gen.num_samples, batch_size=gen.batch_size,
                                     seed=_step_seed(gen.seed, self.rank), device=self.device)
            out = out[:real * gen.num_samples]
            parts = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(parts, out)
            else:
                parts = [out]
            responses = [r for part in parts for r in part]
            if self.is_main:
                cache.save(key, responses, {"teacher": identity, "prompts": len(prompts.train),
                                            "prompt_digest": prompts.train.digest(), "settings": kwargs,
                                            "num_samples": gen.num_samples, "seed": gen.seed})
            if self.world > 1:
                dist.barrier()
            event = "generated"
        self._generation_event({"event": event, "key": key, "path": str(cache.path(key)),
                                "prompts": len(prompts.train), "responses": len(responses),
                                "seconds": round(time.perf_counter() - start, 3)})
        repeated = [p for p in prompts.train.prompts for _ in range(gen.num_samples)]
        return build_sequences(repeated, responses, plan.tokenizer.pad_token_id, length=prompts.length)

    def on_policy(self, batch: dict[str, torch.Tensor], step: int, micro: int) -> dict[str, torch.Tensor] | None:
        """Regime (c): with probability lambda, the batch's prompts answered by the current student.

        The draw depends on (seed, step, micro) only, so every rank takes the same branch (ZeRO-3's
        generate runs collectives in lockstep) and a resumed run replays it."""
        if self.plan.prompts is None:
            return None
        spec = self.plan.prompts.spec
        if not on_policy_draw(self.cfg.train.seed, step, micro, spec.on_policy.probability):
            return None
        tok = self.plan.tokenizer
        prompts = batch_prompts(batch)
        responses = generate_responses(
            self.engine.module.student, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
            generate_kwargs=spec.on_policy.generate_kwargs(spec.max_response_tokens), batch_size=len(prompts),
            seed=_step_seed(self.cfg.train.seed, step, micro, self.rank, 1), device=self.device)
        rows = build_sequences(prompts, responses, tok.pad_token_id)
        new = rows_to_batch(*(torch.from_numpy(a.astype(np.int64)) for a in (rows.ids, rows.lengths,
                                                                             rows.prompt_lengths)),
                            special_ids=self.plan.token_info.special_ids)
        return {**new, "sample_ids": batch["sample_ids"]}

    def resume(self) -> int:
        """Load the latest intact checkpoint (after a failure or a rerun); return its step.

        Ray Train hands back the latest reported checkpoint; rank 0 checks it against its manifests first and,
        if it is damaged (truncated, deleted or corrupt files, a rank's files missing), takes the newest intact
        checkpoint beside it instead, saying which and why. Every rank then loads rank 0's choice."""
        import ray.train
        from pyarrow.fs import LocalFileSystem

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        if not isinstance(checkpoint.filesystem, LocalFileSystem):  # remote storage: check the downloaded copy
            with checkpoint.as_directory() as path:
                state = checkpoints.inspect(path)
                error = None if state.intact else (f"checkpoint {checkpoint.path} is damaged ({state.problem}); "
                                                   "delete it to resume from the one before")
                self._agree(error)
                return self._load_checkpoint(path, str(checkpoint.path))
        choice = None
        if self.is_main:
            chosen, rejected = checkpoints.choose(checkpoint.path)
            notes = [f"checkpoint {r.path} is damaged ({r.problem}); not used" for r in rejected]
            if chosen is None:
                choice = _ResumeChoice(None, None, notes, error=(
                    f"no intact checkpoint to resume from: {'; '.join(notes)}. Delete {Path(checkpoint.path).parent} "
                    "to start over"))
            else:
                if rejected:
                    notes.append(f"resuming from the newest intact checkpoint {chosen.path} (step {chosen.step})")
                choice = _ResumeChoice(str(chosen.path), chosen.step, notes)
        choice = self._broadcast(choice)
        if self.is_main:
            for note in choice.notes:
                print(f"[raydistill] {note}", flush=True)
        if choice.error:
            raise RunFailure(choice.error)
        return self._load_checkpoint(choice.path, choice.path)

    def _load_checkpoint(self, path: str, name: str) -> int:
        error, step = None, 0
        try:
            _, client_state = self.engine.load_checkpoint(path, tag=CKPT_TAG)
            if client_state is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint '{CKPT_TAG}' in it")
            step = int(client_state["step"])
        except Exception as e:  # noqa: BLE001 - named in one line
            first = (str(e).strip().splitlines() or [""])[0]
            error = f"cannot load checkpoint {name}: {type(e).__name__}: {first[:300]}"
        self._agree(error)
        if self.is_main:
            print(f"[raydistill] resumed from checkpoint at step {step}", flush=True)
        self.checkpoint_step = step
        return step

    # ------------------------------------------------------------------------------------------- loop
    def micro_batches(self, step: int) -> list[tuple[dict, dict]]:
        """Step ``step``'s (batch, {stream: batch}) per micro-step, on the CPU (built by the prefetch thread)."""
        return [(self._teacher_signals(self.train_data.batch(step, micro), step, micro),
                 {name: data[0].batch(step, micro) for name, data in self.stream_data.items()})
                for micro in range(self.cfg.train.grad_accum)]

    def train_step(self, step: int, cpu: list[tuple[dict, dict]], moved: list[tuple[dict, dict]]
                   ) -> tuple[list[str], torch.Tensor, int]:
        """One optimiser step over ``grad_accum`` micro-batches (``cpu``: ``micro_batches(step)``, ``moved``: the
        same on the device). Returns the logged keys, their values as one device vector (the step's means over
        all micro-batches and workers, see ``raydistill.train.step``, and under ``TOKENS_KEY`` the step's tokens
        over all workers; read at the logging interval, so a step never waits for the device), and this rank's
        tokens (counted on the CPU batches)."""
        t = self.cfg.train
        micro_batches = []
        tokens = 0
        for micro, ((cpu_batch, cpu_streams), (batch, streams)) in enumerate(zip(cpu, moved)):
            student_batch = self.on_policy(cpu_batch, step, micro)  # before any forward: counts need every batch
            if student_batch is not None:
                batch, cpu_batch = _to(student_batch, self.device), student_batch
            tokens += int(cpu_batch["attention_mask"].sum()) + sum(int(b["attention_mask"].sum())
                                                                   for b in cpu_streams.values())
            micro_batches.append((batch, streams, student_batch is not None, cpu_batch, cpu_streams))
        counts = self._step_counts([(batch, streams) for batch, streams, *_ in micro_batches])
        share = 1.0 / (t.grad_accum * self.world)
        on_policy = self.plan.prompts is not None and self.plan.prompts.spec.on_policy.probability > 0
        # Randomness keyed per example (IIT's plans, MLM masking) uses the step's seed, not the micro-batch's,
        # so it does not depend on how the step is split.
        extras = {"step": step, "step_seed": _step_seed(t.seed, step)}
        sums: dict[str, torch.Tensor] = {}
        skip = t.nonfinite == "skip"
        bad = torch.zeros((), device=self.device)
        for micro, (batch, streams, generated, cpu_batch, cpu_streams) in enumerate(micro_batches):
            # Dropout and objective randomness are a function of the step: resumes replay exactly.
            seed = _step_seed(t.seed, step, micro, self.rank)
            torch.manual_seed(seed)
            loss, logs = self.engine(batch, self.teacher, {**extras, "seed": seed}, streams=streams, counts=counts,
                                     share=share, host=cpu_batch, host_streams=cpu_streams)
            # ``loss`` is this micro-batch's share of the step's loss; DeepSpeed divides the gradient by the
            # micro-batches and averages it over workers, which this factor undoes.
            scaled = loss / share
            if skip:  # train.nonfinite=skip: one extra all-reduce (and host read) per step, only in this mode
                bad = bad + sum((~torch.isfinite(v.detach())).float().sum() for v in (loss, *logs.values()))
                if micro == len(micro_batches) - 1 and self._any_rank(bad):
                    # Non-finite gradients make DeepSpeed's overflow check skip the whole update and zero them.
                    scaled = scaled * math.inf
            self.engine.backward(scaled)
            self.engine.step()
            if on_policy:
                logs["on_policy"] = torch.full((), float(generated) * share, device=self.device)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
        # Ranks differ in non-padding tokens (prompt + response rows): their sum rides on this all-reduce.
        sums[TOKENS_KEY] = float(tokens)
        keys, values = self._all_reduce_vector(sums)
        return keys, values, tokens

    @staticmethod
    def _read(pending: list[tuple[int, list[str], torch.Tensor, bool]]) -> list[tuple[int, dict[str, float], bool]]:
        """The pending steps' logged values as host floats, in one read: (step, {key: value}, applied)."""
        if not pending:
            return []
        flat = torch.cat([values for _, _, values, _ in pending]).tolist()
        out, at = [], 0
        for step, keys, _, applied in pending:
            out.append((step, dict(zip(keys, flat[at:at + len(keys)])), applied))
            at += len(keys)
        return out

    def _teacher_signals(self, batch: dict[str, torch.Tensor], step: int, micro: int) -> dict[str, torch.Tensor]:
        """``batch`` with its teacher signals from the teacher cache, when the run reads one."""
        return batch if self.teacher_cache is None else self.teacher_cache.signals(batch, step, micro)

    def _any_rank(self, flag: torch.Tensor) -> bool:
        flag = flag.detach().reshape(1).float().clone()
        if self.world > 1:
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _step_counts(self, micro_batches: list[tuple[dict, dict]]) -> dict[str, torch.Tensor]:
        """Each objective's positions summed over the given (batch, streams) micro-batches and all workers."""
        totals: dict[str, torch.Tensor] = {}
        for batch, streams in micro_batches:
            for k, v in self.engine.module.counts(batch, streams).items():
                totals[k] = totals.get(k, 0.0) + v
        keys = sorted(totals)
        if not keys:
            return {}
        vec = torch.stack([totals[k] for k in keys]).to(self.device)
        if self.world > 1:
            dist.all_reduce(vec)
        return dict(zip(keys, vec))

    def _all_reduce_vector(self, values: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
        """The values summed over workers, as one float32 vector on the device (in sorted key order)."""
        keys = sorted(values)
        # Host numbers as fills: torch.tensor(x, device=) is a blocking copy, which on a GPU waits for the device.
        vec = torch.stack([torch.full((), values[k], dtype=torch.float32, device=self.device)
                           if not torch.is_tensor(values[k]) else
                           values[k].to(self.device, torch.float32, non_blocking=True) for k in keys])
        if self.world > 1:
            dist.all_reduce(vec)
        return keys, vec

    def _all_reduce_sum(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys, vec = self._all_reduce_vector(values)
        return dict(zip(keys, vec.tolist()))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation: every objective's term, the weighted loss, and the student's (masked-LM) perplexity."""
        with eval_mode(self.engine.module):
            out, batches = self._validation_losses()
        out.update(self.evaluate_iia(batches))
        out.update(self.evaluate_rouge())
        return out

    def _validation_losses(self) -> tuple[dict[str, float], list[dict[str, torch.Tensor]]]:
        """Every term as one mean over all validation batches of all ranks, like a training step's."""
        module, t = self.engine.module, self.cfg.train
        batches = [_to(self._teacher_signals(b, 0, n), self.device)  # validation batches are step 0's
                   for n, b in enumerate(self.val_data.eval_batches(t.eval_batches, seed=t.seed))]
        stream_batches = {name: [_to(b, self.device) for b in data[1].eval_batches(t.eval_batches, seed=t.seed)]
                          for name, data in self.stream_data.items()}
        items = [(batch, {name: sb[n % len(sb)] for name, sb in stream_batches.items()})
                 for n, batch in enumerate(batches)]
        counts = self._step_counts(items)
        share = 1.0 / (len(items) * self.world)
        sums: dict[str, torch.Tensor] = {}
        ce_sum = torch.zeros((), device=self.device)
        ce_count = torch.zeros((), device=self.device)
        for n, (batch, streams) in enumerate(items):
            seed = _step_seed(t.seed, n)
            torch.manual_seed(seed)
            _, logs = self.engine(batch, self.teacher, {"seed": seed, "step": 0, "step_seed": _step_seed(t.seed, 0)},
                                  streams=streams, counts=counts, share=share)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            ce_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                        ignore_index=-100, reduction="sum")
            ce_count += (labels != -100).sum()
        out = self._all_reduce_sum({f"val/{k}": v for k, v in sums.items()})
        totals = torch.stack([ce_sum, ce_count.float()])
        if self.world > 1:
            dist.all_reduce(totals)
        ce = (totals[0] / totals[1].clamp_min(1)).item()
        out["val/ce"] = ce
        out["val/ppl"] = math.exp(min(ce, 50.0))
        return out, batches

    def evaluate_iia(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Interchange-intervention agreement on validation pairs, whenever an IIT objective is configured
        (weight 0 included, so a baseline student can be compared with an IIT-trained one)."""
        from raydistill.iia import interchange_agreement

        settings = self.cfg.objectives.iit or self.cfg.objectives.iit_cosine
        if settings is None or self.teacher is None:
            return {}
        res = interchange_agreement(
            self.engine.module.student, self.teacher, batches, settings.alignment, is_encoder=self.plan.info.is_encoder,
            seed=self.cfg.train.seed, span_proportion=settings.span_proportion,
            include_special_tokens=settings.include_special_tokens, aligned_positions=settings.aligned_positions,
            max_tokens=settings.max_tokens, student_block_path=self.plan.block_paths[0],
            teacher_block_path=self.plan.block_paths[1])
        # Pool ranks by their prediction counts.
        n = res.pop("iia/predictions")
        keys = sorted(res)
        vec = torch.tensor([res[k] * n for k in keys] + [n], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(vec)
        total = max(vec[-1].item(), 1.0)
        return {f"val/{k}": vec[i].item() / total for i, k in enumerate(keys)}

    def evaluate_rouge(self) -> dict[str, float]:
        """``val/rougeL``: 100 x mean ROUGE-L F of the student's responses to held-out prompts against their
        references, over prompts (sharded across ranks, pooled) and seeds (greedy decoding runs once);
        ``val/rougeL_teacher`` the same for the teacher, computed at the first evaluation."""
        rp = self.plan.rouge
        if rp is None:
            return {}
        out = {"val/rougeL": self._rouge(self.engine.module.student)}
        if rp.spec.teacher and self.teacher is not None:
            if self._teacher_rouge is None:  # the teacher does not change: score it once
                self._teacher_rouge = self._rouge(self.teacher)
            out["val/rougeL_teacher"] = self._teacher_rouge
        return out

    def _rouge(self, model: torch.nn.Module) -> float:
        from raydistill.eval.rouge import model_rouge_l

        rp = self.plan.rouge
        prompts, real = padded_shard(rp.prompts.prompts, self.rank, self.world)
        refs, _ = padded_shard(rp.prompts.references, self.rank, self.world)
        seeds = rp.spec.seeds if rp.spec.do_sample else rp.spec.seeds[:1]
        score, count = model_rouge_l(
            model, self.plan.tokenizer, prompts, refs, generate_kwargs=rp.spec.generate_kwargs(rp.max_new_tokens),
            batch_size=rp.spec.batch_size, seeds=[_step_seed(seed, self.rank) for seed in seeds], device=self.device,
            count=real)
        totals = torch.tensor([score, count], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(totals)
        return 100.0 * totals[0].item() / max(totals[1].item(), 1.0)

    def checkpoint_and_report(self, step: int, metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"step": step})
            # This rank's files with their sizes and checksums: a resume checks them before loading.
            checkpoints.write_manifest(tmp, self.rank, self.world, step)
            if self.world > 1:
                dist.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.checkpoint_step = step

    def export(self, step: int) -> None:
        """Write the student in save_pretrained layout (safetensors) with its tokenizer, from rank 0."""
        if self.cfg.deepspeed.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective: all ranks call it
        else:
            state = self.engine.module.state_dict() if self.is_main else None
        probe = self._probe()  # a forward pass: under ZeRO-3 every rank must take part
        if not self.is_main:
            return
        prefix = "student."
        student_state = {k[len(prefix):]: v.detach().cpu().clone() for k, v in state.items() if k.startswith(prefix)}
        export_dir = Path(self.plan.export_dir)
        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(self.engine.module.student, self.plan.tokenizer, tmp, state_dict=student_state)
        # block_size: the context it was trained at, which `raydistill eval` scores perplexity with.
        write_text_atomic(tmp / "raydistill.json", json.dumps({"step": step, "mode": self.plan.mode,
                                                               "name": self.cfg.name,
                                                               "block_size": self.cfg.data.block_size}))
        normalise_modes(tmp)  # safetensors writes model.safetensors 0600; give it its siblings' mode
        swap_dir(tmp, export_dir)  # readers see the old model or the new one, never none or half of one
        write_atomic(export_dir.parent / f"{export_dir.name}_probe.pt", lambda p: torch.save(probe, p))

    def _probe(self) -> dict[str, torch.Tensor]:
        """Logits of the trained model on a fixed validation batch, to check the export against."""
        batch = _to(next(self.val_data.eval_batches(1, seed=self.cfg.train.seed)), self.device)
        batch = {k: v[:2] for k, v in batch.items()}
        module = self.engine.module
        with eval_mode(module), torch.no_grad():
            logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu(),
                "logits": logits.float().cpu()}

    def run(self) -> None:
        """The whole job. A ``RunFailure`` every rank agrees on (a non-finite loss, a weight file or checkpoint
        that does not load) ends it cleanly: rank 0 leaves the reason for the driver, and the workers return
        instead of raising, so Ray Train neither retries a failure that would recur nor prints tracebacks."""
        try:
            self._run()
        except RunFailure as e:
            if self.is_main:
                write_failure(self.output_dir, self.attempt, e.message)
                print(f"[raydistill] {e.message}", flush=True)

    def _run(self) -> None:
        import ray.train

        if self.cfg.scaling.keep_freed_host_memory and not keep_freed_host_memory() and self.is_main:
            print("[raydistill] scaling.keep_freed_host_memory: not glibc, malloc left as it is", flush=True)
        self.checkpoint_step: int | None = None
        self.build()
        start = self.resume()
        t = self.cfg.train
        guard = NonFiniteGuard(t.nonfinite)
        watch = DivergenceWatch(t.divergence, t.divergence_factor)
        progress = ProgressPrinter(self.output_dir / "metrics.jsonl", t.max_steps, start, enabled=self.is_main)
        m = self.monitor
        self.series = RunMetrics(m.run, m.trial, self.rank, t.max_steps, self.flops_per_token,
                                 m.peak_flops or device_peak_flops(self.device, t.precision), self.device,
                                 enabled=m.metrics)
        training = phases.PRETRAINING if self.plan.mode == "teacher" else phases.TRAINING
        if self.is_main:
            m.post(phase=training, done=start, total=t.max_steps)
        # Tokens over all workers, this rank's tokens, steps, and the start of the timing window since the last row.
        window_tokens, rank_tokens, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
        # Each logged term summed over the steps since the last row, and how many steps logged it: a row carries
        # its interval's means (as tokens_per_s and step_time_s), not one step's noisy values.
        term_sums: dict[str, float] = {}
        term_steps: dict[str, int] = {}
        # Logged values stay on the device until a row is due: one read (and device synchronisation) per
        # logging interval instead of one per step. The guard and the divergence watch then see every step's
        # values in order, so a failure still names its step and the last row is that step's (nothing is
        # checkpointed, evaluated or reported before the read). Under train.nonfinite=skip each step reads its
        # non-finite flag anyway, so every step is read as it ends and a skipped step gets its row as before.
        pending: list[tuple[int, list[str], torch.Tensor, bool]] = []
        lrs: dict[int, float] = {}  # each pending step's lr
        prefetch = Prefetcher(self.micro_batches, range(start + 1, t.max_steps + 1), self.device)
        try:
            for step in range(start + 1, t.max_steps + 1):
                marker = self.output_dir / f".failed_at_{step}_rank{self.rank}"
                if t.fail_at_step == step and not marker.exists():  # once per rank, so a restart gets past it
                    marker.touch()
                    raise RuntimeError(f"train.fail_at_step={step}: simulated failure (testing aid)")
                skipped_before = self.engine.skipped_steps
                # The lr this step applies: DeepSpeed's engine.step() advances the schedule after the update.
                lrs[step] = self.scheduler.get_last_lr()[0]
                keys, values, tokens = self.train_step(step, *prefetch.get(step))
                pending.append((step, keys, values, self.engine.skipped_steps == skipped_before))
                rank_tokens += tokens
                window_steps += 1
                last = step == t.max_steps
                scheduled = step % t.log_every == 0 or last
                do_eval = bool((t.eval_every and step % t.eval_every == 0) or last)
                do_ckpt = bool((t.checkpoint_every and step % t.checkpoint_every == 0) or last)
                # A Ray report is a barrier costing about a second here: only evaluations, checkpoints and
                # report_every steps (what Tune schedulers act on) pay for one; logging is local.
                do_report = do_eval or do_ckpt or bool(t.report_every and step % t.report_every == 0)
                if not (scheduled or do_report or t.nonfinite == "skip"):
                    continue
                # The values are reduced over workers: every rank reaches the same verdicts.
                failure, noted, row_step = None, False, step
                read = self._read(pending)
                window_tokens += sum(values.pop(TOKENS_KEY) for _, values, _ in read)
                for row_step, logs, applied in read:
                    for k, v in logs.items():
                        term_sums[k] = term_sums.get(k, 0.0) + v
                        term_steps[k] = term_steps.get(k, 0) + 1
                    try:
                        note = guard.check(row_step, logs, applied=applied, checkpoint_step=self.checkpoint_step)
                        note = note or watch.check(row_step, logs.get("loss"))
                    except RunFailure as e:  # a non-finite loss, or a diverged one under train.divergence=stop
                        note, failure = None, e
                    if note and self.is_main:
                        print(f"[raydistill] {note}", flush=True)
                    noted = noted or note is not None
                    if failure is not None:
                        break
                pending.clear()
                lr = lrs[row_step]
                lrs.clear()
                if not (scheduled or do_report or noted or failure is not None):
                    continue
                if failure is not None:
                    last = do_eval = do_ckpt = do_report = False
                step = row_step
                elapsed = time.perf_counter() - window_start
                logs = {k: total / term_steps[k] for k, total in term_sums.items()}
                term_sums, term_steps = {}, {}
                metrics = {"step": step, **logs, "lr": lr,
                           "tokens_per_s": window_tokens / max(elapsed, 1e-9), "step_time_s": elapsed / window_steps,
                           "peak_memory_bytes": peak_memory_bytes(self.device)}
                if guard.skipped:
                    metrics["skipped_steps"] = guard.skipped
                if watch.diverged_at:
                    metrics["diverged_at_step"] = watch.diverged_at
                logged_tokens = rank_tokens
                # Evaluation, checkpoint and Ray report time below is taken out of the next window (window_start
                # moves on by it), so a row's step time is training alone; logging stays in it.
                window_tokens, rank_tokens, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
                if do_eval:
                    if self.is_main:
                        m.post(phase=phases.VALIDATION)
                    begun = time.perf_counter()
                    metrics.update(self.evaluate())
                    window_start += time.perf_counter() - begun
                    # Weights that give a non-finite validation loss are corrupt: never export them. Skipping
                    # non-finite steps, only the student's own cross-entropy counts (an objective may stay NaN).
                    bad = nonfinite({k: v for k, v in metrics.items() if k.startswith("val/")
                                     and (t.nonfinite == "stop" or k == "val/ce")})
                    if bad:
                        terms = ", ".join(f"{k}={v!r}" for k, v in sorted(bad.items()))
                        failure = NonFiniteLoss(
                            f"non-finite validation at step {step}: {terms}. The run stopped there and nothing "
                            f"was exported; " + (f"the latest checkpoint (step {self.checkpoint_step}) is intact"
                                                 if self.checkpoint_step else "no checkpoint was written before it"))
                        do_ckpt = False
                progress.log(metrics)
                self.series.log(metrics, [k for k in logs if k != "on_policy"], logged_tokens, elapsed)
                if self.is_main:
                    m.post(phase=training, done=step, total=t.max_steps, detail=_detail(metrics))
                if last and failure is None:  # before the final checkpoint: a rerun must not export it either
                    try:
                        guard.check_trained(step, self.engine.global_steps, self.engine.skipped_steps)
                    except NonFiniteLoss as e:
                        failure = e
                if failure is not None:
                    progress.close()
                    raise failure
                if do_ckpt:
                    if self.is_main:
                        m.post(phase=phases.CHECKPOINT)
                    begun = time.perf_counter()
                    self.checkpoint_and_report(step, metrics)
                    spent = time.perf_counter() - begun
                    self.series.duration("checkpoint", spent)
                    window_start += spent
                elif do_report:
                    begun = time.perf_counter()
                    ray.train.report(metrics)
                    window_start += time.perf_counter() - begun
        finally:
            prefetch.close()
        guard.check_trained(t.max_steps, self.engine.global_steps, self.engine.skipped_steps)
        if self.is_main:
            m.post(phase=phases.EXPORT)
        begun = time.perf_counter()
        self.export(t.max_steps)
        self.series.duration("export", time.perf_counter() - begun)
        if self.world > 1:
            dist.barrier()
        progress.close()
        if self.is_main:
            m.post(phase=phases.STOPPING)  # Ray Train takes a few seconds to end the worker group


def _detail(metrics: dict[str, Any]) -> str:
    """The few numbers the terminal shows beside a run's progress bar."""
    parts = [f"loss {metrics['loss']:.4g}"] if isinstance(metrics.get("loss"), float) else []
    parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    if "val/loss" in metrics:
        parts.append(f"val/loss {metrics['val/loss']:.4g}")
    return " · ".join(parts)
