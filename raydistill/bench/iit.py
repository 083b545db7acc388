"""``raydistill bench iit``: the step time of standard distillation (task + kd + cosine) against the same
plus ``iit``, side by side in one process, on the same models and batches.

Each measured step is the real training step (``DistillModule``: the forward passes the objectives ask
for, the weighted loss) plus backward and an AdamW step, as a worker runs it without DeepSpeed. The two
variants alternate step by step (their order flipping each time) so that drift in machine load hits both
alike. Models have random weights: the cost does not depend on them.

With ``pair_sampling: uniform_one`` (the paper's) a step's cost depends on the sampled pair: the lower the
intervened layers, the more blocks the counterfactual runs repeat. Sampling pairs at random over a few timed
steps would make the ratio depend on the draws, so each aligned pair is timed as its own variant (iit with
that pair alone) and the iit time is the mean over pairs: the expected step time under uniform sampling.
Rows list the time and ratio of every pair. With ``all`` the variant runs every pair each step.

``flop_ratio`` is the same comparison in counted FLOPs (``torch.utils.flop_counter``: matrix multiplies and
attention, forward and backward, over one untimed step per variant): the work the algorithm does,
independent of how efficiently a device runs each kind of operation. Where ``ratio`` exceeds it, the extra
time is in operations that run less efficiently than the standard step's average.

Host memory is kept as training workers keep it (``scaling.keep_freed_host_memory``, on by default, see
``raydistill.train.host_memory``); ``keep_freed_memory=False`` (``--release-freed-memory``) measures with
glibc's defaults instead, where each step faults its freed B x T x V tensors back in, which costs the IIT
step (more such tensors) more than the standard one. The setting lasts for the process, so a run measures
one setting.

Sizes: the default case is 8 sequences of 128 tokens (CPU-sized); ``--batch-size`` / ``--seq-len`` change it and
``--gpu-sizes`` adds the GPU-sized case 16 x 512 (rows carry their ``batch_size`` and ``seq_len``; ``by_size``
has each size's ratios, the top-level ``ratio`` stays the default case's).
"""

from __future__ import annotations

import copy
import platform
import time
from statistics import mean

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, PretrainedConfig

from raydistill.data.masking import mask_tokens, next_token_labels
from raydistill.models.adapters import hidden_size, num_layers, set_num_layers
from raydistill.models.loading import is_encoder
from raydistill.models.presets import preset_config
from raydistill.objectives import REGISTRY, build_objectives
from raydistill.objectives.base import ModelInfo
from raydistill.objectives.iit import IITSettings
from raydistill.train.host_memory import keep_freed_host_memory
from raydistill.train.step import DistillModule

BENCH_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-llama", "bert-base")
RATIO_MODEL = "bert-base"
STANDARD = ("task", "kd", "cosine")
TINY_VOCAB = 2048
PAD, BOS, EOS, CLS, SEP, MASK = 0, 1, 2, 3, 4, 5


def _teacher_config(name: str) -> PretrainedConfig:
    if name == "bert-base":  # bert-base-uncased's shape: 12 blocks, width 768, vocab 30522
        config = BertConfig(pad_token_id=PAD)
        config.architectures = ["BertForMaskedLM"]
        return config
    return preset_config(name, TINY_VOCAB, {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS})


def _models(name: str, device: torch.device):
    t_cfg = _teacher_config(name)
    s_cfg = copy.deepcopy(t_cfg)
    set_num_layers(s_cfg, max(1, num_layers(t_cfg) // 2))
    cls = AutoModelForMaskedLM if is_encoder(t_cfg) else AutoModelForCausalLM
    teacher = cls.from_config(t_cfg).to(device).eval().requires_grad_(False)
    student = cls.from_config(s_cfg).to(device).train()
    info = ModelInfo(is_encoder=is_encoder(t_cfg), vocab_size=t_cfg.vocab_size, student_layers=num_layers(s_cfg),
                     student_hidden=hidden_size(s_cfg), teacher_layers=num_layers(t_cfg),
                     teacher_hidden=hidden_size(t_cfg))
    return teacher, student, info


def _batch(info: ModelInfo, batch_size: int, seq_len: int, generator: torch.Generator, device
           ) -> tuple[dict, dict]:
    """(on the host, on ``device``): the step reads its plan from the host copy, as in training."""
    ids = torch.randint(MASK + 1, info.vocab_size, (batch_size, seq_len), generator=generator)
    attn = torch.ones_like(ids)
    if not info.is_encoder:
        batch = {"input_ids": ids, "attention_mask": attn, "labels": next_token_labels(ids, attn)}
    else:
        ids[:, 0], ids[:, -1] = CLS, SEP
        special = torch.zeros_like(ids)
        special[:, 0] = special[:, -1] = 1
        masked, labels = mask_tokens(ids, special, MASK, info.vocab_size, 0.15, generator)
        batch = {"input_ids": masked, "attention_mask": attn, "labels": labels, "special_tokens_mask": special}
    return batch, {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_model(name: str, *, batch_size: int, seq_len: int, steps: int, warmup: int, device: torch.device,
                 seed: int, iit_settings: IITSettings) -> dict:
    torch.manual_seed(seed)
    teacher, student, info = _models(name, device)
    settings = {n: REGISTRY[n].Settings() for n in STANDARD}
    variants = {"standard": settings}
    pairs = build_objectives({"iit": iit_settings}, info)["iit"].pairs
    if iit_settings.pair_sampling == "uniform_one":
        for pair in pairs:
            one = type(iit_settings).model_validate(
                {**iit_settings.model_dump(), "alignment": [{"teacher": list(pair.teacher), "student": pair.student}]})
            variants[pair.label] = {**settings, "iit": one}
    else:
        variants["all"] = {**settings, "iit": iit_settings}
    modules = {key: DistillModule(student, build_objectives(objs, info), info).to(device)
               for key, objs in variants.items()}
    params = list({id(p): p for m in modules.values() for p in m.parameters() if p.requires_grad}.values())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {k: [] for k in variants}
    flops: dict[str, int] = {}

    def train_step(key: str, batches: tuple[dict, dict], i: int) -> None:
        host, batch = batches
        loss, _ = modules[key](batch, teacher, {"seed": seed * 100_003 + i, "step": i}, host=host)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counted = _batch(info, batch_size, seq_len, gen, device)
    for key in variants:  # one untimed step each, counting matrix-multiply and attention FLOPs
        with FlopCounterMode(display=False) as counter:
            train_step(key, counted, -1)
        flops[key] = counter.get_total_flops()
    for i in range(warmup + steps):
        batch = _batch(info, batch_size, seq_len, gen, device)
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for key in order:
            _sync(device)
            start = time.perf_counter()
            train_step(key, batch, i)
            _sync(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    standard, standard_flops = mean(times.pop("standard")), flops.pop("standard")
    per_variant = {key: mean(ts) for key, ts in times.items()}
    iit = mean(per_variant.values())
    iit_flops = mean(flops.values())
    return {"model": name, "teacher_layers": info.teacher_layers, "student_layers": info.student_layers,
            "hidden": info.teacher_hidden, "vocab": info.vocab_size, "standard_s": round(standard, 5),
            "iit_s": round(iit, 5), "ratio": round(iit / standard, 4),
            "flop_ratio": round(iit_flops / standard_flops, 4), "standard_gflop": round(standard_flops / 1e9, 2),
            "by_pair": {key: {"iit_s": round(t, 5), "ratio": round(t / standard, 4),
                              "flop_ratio": round(flops[key] / standard_flops, 4)} for key, t in per_variant.items()}}


# The GPU case (``--gpu-sizes``): 16 sequences of 512 tokens.
GPU_SIZES = ((16, 512),)


def bench_iit(models: tuple[str, ...] | list[str] = BENCH_MODELS, *, batch_size: int = 8, seq_len: int = 128,
              steps: int = 10, warmup: int = 2, device: str | None = None, seed: int = 0,
              alignment: str = "full", pair_sampling: str = "uniform_one", keep_freed_memory: bool = True,
              extra_sizes: tuple[tuple[int, int], ...] | list[tuple[int, int]] = ()) -> dict:
    """Measure the variants for each model; ``ratio`` is iit / standard step time for ``bert-base``
    (None when it is not among ``models``) at ``batch_size`` x ``seq_len``, ``rows`` has every model's times
    (and each pair's). ``extra_sizes`` (batch, seq_len) pairs add rows and their ratios under ``by_size``."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kept = keep_freed_memory and keep_freed_host_memory()
    iit_settings = IITSettings(alignment=alignment, pair_sampling=pair_sampling)
    sizes = list(dict.fromkeys([(batch_size, seq_len), *((int(b), int(t)) for b, t in extra_sizes)]))
    rows, by_size = [], {}
    for b, t in sizes:
        mine = [{**_bench_model(name, batch_size=b, seq_len=t, steps=steps, warmup=warmup, device=dev, seed=seed,
                                iit_settings=iit_settings), "batch_size": b, "seq_len": t} for name in models]
        ratio_row = next((r for r in mine if r["model"] == RATIO_MODEL), {})
        by_size[f"{b}x{t}"] = {"batch_size": b, "seq_len": t, "ratio": ratio_row.get("ratio"),
                               "flop_ratio": ratio_row.get("flop_ratio")}
        rows += mine
    main = by_size[f"{batch_size}x{seq_len}"]
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    return {"ratio": main["ratio"], "flop_ratio": main["flop_ratio"], "ratio_model": RATIO_MODEL,
            "target": 1.6, "device": where, "host_memory": "kept" if kept else "released (glibc default)",
            "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "warmup": warmup,
            "objectives": {"standard": list(STANDARD), "iit": [*STANDARD, "iit"]},
            "iit": {"alignment": alignment, "pair_sampling": pair_sampling}, "by_size": by_size, "rows": rows}
