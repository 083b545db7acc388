"""The per-worker training function that Ray Train runs: setup, step loop, evaluation, checkpoint, export.

Every rank runs this same function; rank 0 additionally prints progress, appends ``metrics.jsonl`` and
writes the exported student."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from raydistill.data.blocks import BatchSampler
from raydistill.models.loading import build_model, init_from_teacher, save_pretrained
from raydistill.objectives import build_objectives
from raydistill.train.ds_config import deepspeed_config, teacher_deepspeed_config
from raydistill.train.plan import RunPlan
from raydistill.train.progress import ProgressPrinter
from raydistill.train.schedule import lr_lambda
from raydistill.train.step import DistillModule

CKPT_TAG = "state"


def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _param_groups(module: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Worker:
    """State of one rank. ``run()`` is the whole job; methods are its steps, in order."""

    def __init__(self, plan: RunPlan):
        import ray.train
        import ray.train.torch

        self.plan, self.cfg = plan, plan.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.is_main = self.rank == 0
        self.output_dir = Path(plan.output_dir)

    # ------------------------------------------------------------------------------------------- setup
    def build(self) -> None:
        import deepspeed

        cfg, plan = self.cfg, self.plan
        torch.manual_seed(cfg.train.seed)  # identical random init on every rank
        teacher = None
        if plan.teacher_config is not None:  # distillation (a preset teacher has no source: random init)
            teacher = build_model(plan.teacher_config, plan.teacher_source, plan.teacher_revision)
            teacher.requires_grad_(False).eval()
        student = build_model(plan.student_config, plan.student_source, plan.student_revision)
        if plan.init_layers is not None:
            init_from_teacher(student, teacher, plan.init_layers, plan.block_paths[0])
        if cfg.train.precision != "fp32" and teacher is not None:
            teacher.to(torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16)

        objectives = build_objectives(plan.objectives, plan.info)
        sharded_teacher = teacher is not None and cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.shard_teacher
        module = DistillModule(student, objectives, plan.info, plan.block_paths,
                               teacher_inference_mode=not sharded_teacher)
        ds_cfg = deepspeed_config(cfg, self.world)
        t = cfg.train
        optimizer = None if "optimizer" in ds_cfg else torch.optim.AdamW(
            _param_groups(module, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps)
        schedule = lr_lambda(t.lr_schedule, t.max_steps, t.warmup_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_cfg,
            model_parameters=None if optimizer is not None else _param_groups(module, t.weight_decay),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        if teacher is not None:
            if sharded_teacher:
                teacher = deepspeed.initialize(model=teacher, config=teacher_deepspeed_config(cfg, self.world))[0]
                teacher = teacher.module
            else:
                teacher = teacher.to(self.device)
        self.teacher = teacher

        blocks = plan.fetch_blocks()
        common = dict(batch_size=t.batch_size, rank=self.rank, world_size=self.world, seed=t.seed,
                      mlm_probability=cfg.data.mlm_probability)
        self.train_data = BatchSampler(blocks[0], plan.token_info, grad_accum=t.grad_accum, **common)
        self.val_data = BatchSampler(blocks[1], plan.token_info, grad_accum=1, **common)

    def resume(self) -> int:
        """Load the latest checkpoint Ray Train hands back (after a failure or a rerun); return its step."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as path:
            _, client_state = self.engine.load_checkpoint(path, tag=CKPT_TAG)
        step = int(client_state["step"])
        if self.is_main:
            print(f"[raydistill] resumed from checkpoint at step {step}", flush=True)
        return step

    # ------------------------------------------------------------------------------------------- loop
    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        t = self.cfg.train
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(t.grad_accum):
            # Dropout and objective randomness are a function of the step: resumes replay exactly.
            seed = _step_seed(t.seed, step, micro, self.rank)
            torch.manual_seed(seed)
            batch = _to(self.train_data.batch(step, micro), self.device)
            loss, logs = self.engine(batch, self.teacher, {"seed": seed, "step": step})
            self.engine.backward(loss)
            self.engine.step()
            tokens += int(batch["attention_mask"].sum())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
        means = {k: v / t.grad_accum for k, v in sums.items()}
        return self._all_reduce_mean(means), tokens * self.world

    def _all_reduce_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(values)
        vec = torch.stack([torch.as_tensor(values[k], dtype=torch.float32) for k in keys]).to(self.device)
        if self.world > 1:
            dist.all_reduce(vec)
            vec /= self.world
        return dict(zip(keys, vec.tolist()))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation: every objective's term, the weighted loss, and the student's (masked-LM) perplexity."""
        module = self.engine.module
        module.eval()
        sums: dict[str, torch.Tensor] = {}
        ce_sum = torch.zeros((), device=self.device)
        ce_count = torch.zeros((), device=self.device)
        n = 0
        batches = [_to(b, self.device)
                   for b in self.val_data.eval_batches(self.cfg.train.eval_batches, seed=self.cfg.train.seed)]
        for batch in batches:
            torch.manual_seed(_step_seed(self.cfg.train.seed, n))
            _, logs = self.engine(batch, self.teacher, {"seed": _step_seed(self.cfg.train.seed, n), "step": 0})
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            ce_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                        ignore_index=-100, reduction="sum")
            ce_count += (labels != -100).sum()
            n += 1
        module.train()
        out = self._all_reduce_mean({f"val/{k}": v / max(n, 1) for k, v in sums.items()})
        totals = torch.stack([ce_sum, ce_count.float()])
        if self.world > 1:
            dist.all_reduce(totals)
        ce = (totals[0] / totals[1].clamp_min(1)).item()
        out["val/ce"] = ce
        out["val/ppl"] = math.exp(min(ce, 50.0))
        out.update(self.evaluate_iia(batches))
        return out

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

    def checkpoint_and_report(self, step: int, metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"step": step})
            if self.world > 1:
                dist.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

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
        shutil.rmtree(export_dir, ignore_errors=True)
        os.replace(tmp, export_dir)  # readers never see a half-written model
        torch.save(probe, export_dir.parent / f"{export_dir.name}_probe.pt")
        with open(export_dir / "raydistill.json", "w") as f:
            json.dump({"step": step, "mode": self.plan.mode, "name": self.cfg.name}, f)

    def _probe(self) -> dict[str, torch.Tensor]:
        """Logits of the trained model on a fixed validation batch, to check the export against."""
        batch = _to(next(self.val_data.eval_batches(1, seed=self.cfg.train.seed)), self.device)
        batch = {k: v[:2] for k, v in batch.items()}
        module = self.engine.module
        module.eval()
        with torch.no_grad():
            logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        module.train()
        return {"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu(),
                "logits": logits.float().cpu()}

    def run(self) -> None:
        import ray.train

        self.build()
        start = self.resume()
        t = self.cfg.train
        progress = ProgressPrinter(self.output_dir / "metrics.jsonl", t.max_steps, start, enabled=self.is_main)
        window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
        for step in range(start + 1, t.max_steps + 1):
            marker = self.output_dir / f".failed_at_{step}_rank{self.rank}"
            if t.fail_at_step == step and not marker.exists():  # once per rank, so a restart gets past it
                marker.touch()
                raise RuntimeError(f"train.fail_at_step={step}: simulated failure (testing aid)")
            logs, tokens = self.train_step(step)
            window_tokens += tokens
            window_steps += 1
            last = step == t.max_steps
            do_log = step % t.log_every == 0 or last
            do_eval = (t.eval_every and step % t.eval_every == 0) or last
            do_ckpt = (t.checkpoint_every and step % t.checkpoint_every == 0) or last
            # A Ray report is a barrier costing about a second here: only evaluations, checkpoints and
            # report_every steps (what Tune schedulers act on) pay for one; logging is local.
            do_report = do_eval or do_ckpt or bool(t.report_every and step % t.report_every == 0)
            if not (do_log or do_report):
                continue
            elapsed = time.perf_counter() - window_start
            metrics = {"step": step, **logs, "lr": self.scheduler.get_last_lr()[0],
                       "tokens_per_s": window_tokens / max(elapsed, 1e-9), "step_time_s": elapsed / window_steps}
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
            if do_eval:
                metrics.update(self.evaluate())
            progress.log(metrics)
            if do_ckpt:
                self.checkpoint_and_report(step, metrics)
            elif do_report:
                ray.train.report(metrics)
        self.export(t.max_steps)
        if self.world > 1:
            dist.barrier()
        progress.close()


def train_loop_per_worker(config: dict) -> None:
    """Entry point Ray Train runs on every worker."""
    Worker(config["plan"]).run()
