"""Checks of a run's inputs that need no corpus and no tokenizer: run on the driver before anything else,
so a bad input fails in a second with one message, before Ray starts and before anything is written.

- ``output_dir`` and ``cache_dir`` can be created and written (a file in their place, an unwritable parent);
- local model directories hold complete weights (safetensors headers against file sizes, zip directories);
- ``deepspeed.extra`` merged into the generated DeepSpeed config is one DeepSpeed accepts and one that agrees
  with the fields raydistill generates it from (ZeRO stage, batch sizes, precision);
- model shapes: heads dividing widths, ``data.block_size`` within the models' positions, and for
  ``student.init: teacher`` a student that is a shallower copy of the teacher (checked parameter by
  parameter on meta-device models, so no weights are allocated).

``prepare`` (train/plan.py) runs these first; ``raydistill config`` runs ``prepare``."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from raydistill.config import PRESETS, ExperimentConfig, ModelSpec
from raydistill.errors import ConfigError


def check_before_ray(cfg: ExperimentConfig, mode: str = "distill") -> None:
    check_writable_dir(cfg.output_dir, "output_dir")
    check_writable_dir(cfg.cache_dir, "cache_dir")
    specs = [("teacher", cfg.teacher)] + ([("student", cfg.student)] if mode == "distill" else [])
    for where, spec in specs:
        if spec.name is not None and spec.name not in PRESETS and Path(spec.name).is_dir():
            check_weights(Path(spec.name), f"{where}.name")
    check_deepspeed(cfg)
    check_models(cfg, mode)


# ----------------------------------------------------------------------------------------------- files
def check_writable_dir(path: str, field: str) -> None:
    """``path`` is a directory raydistill can create (or has) and write into; nothing is created here."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{field} {path!r} exists and is not a directory; allowed: a directory, existing or "
                              "to be created")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{field} {path!r} is not writable (permission denied); allowed: a directory this "
                              "user can write")
        return
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{field} {path!r} cannot be created: {str(parent)!r} is a file; allowed: a path "
                          "whose existing parents are directories")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{field} {path!r} cannot be created: {str(parent)!r} is not writable (permission "
                          "denied); allowed: a directory this user can create")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weights(model_dir: Path, field: str) -> None:
    """The weights of a save_pretrained directory are all there: every safetensors file is as long as its
    header says, every shard an index names exists, every .bin is a readable zip archive."""
    present = [name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not present:
        raise ConfigError(f"{field} {str(model_dir)!r}: no weights ({', '.join(WEIGHT_FILES)}); allowed: a "
                          "save_pretrained directory with its weights")
    files: list[Path] = []
    for name in present:
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads((model_dir / name).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{field} {str(model_dir)!r}: {name} is not a valid weight index ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if not (model_dir / shard).is_file():
                    raise ConfigError(f"{field} {str(model_dir)!r}: shard {shard!r} named in {name} is missing")
                files.append(model_dir / shard)
        else:
            files.append(model_dir / name)
    for path in files:
        problem = _safetensors_problem(path) if path.suffix == ".safetensors" else _zip_problem(path)
        if problem:
            raise ConfigError(f"{field} {str(model_dir)!r}: {path.name} is truncated or corrupt ({problem}); "
                              "re-export or re-download the model")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"header of {n} bytes in a {size}-byte file"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header: {e}"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        return "malformed header"
    if 8 + n + end > size:
        return f"the header promises {8 + n + end} bytes, the file has {size}"
    return None


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        if not zipfile.is_zipfile(path) and path.stat().st_size > 0 and _legacy_torch_file(path):
            return None  # torch's pre-1.6 format: not a zip, nothing cheap to check
        return str(e)
    return None


def _legacy_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x80\x02"  # a pickle (protocol 2) stream


# ----------------------------------------------------------------------------------------------- deepspeed
def _ds_conflicts(cfg: ExperimentConfig, merged: dict[str, Any], world: int) -> None:
    extra = cfg.deepspeed.extra
    zero = extra.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        stage = zero["stage"]
        if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
            raise ConfigError(f"deepspeed.extra.zero_optimization.stage: {stage!r} is not a ZeRO stage; allowed: "
                              "0, 1, 2, 3 (set it with deepspeed.zero_stage)")
        if stage != cfg.deepspeed.zero_stage:
            raise ConfigError(f"deepspeed.extra.zero_optimization.stage: {stage!r} conflicts with "
                              f"deepspeed.zero_stage {cfg.deepspeed.zero_stage}; allowed: set the stage with "
                              "deepspeed.zero_stage only")
    t = cfg.train
    batch = {"train_micro_batch_size_per_gpu": (t.batch_size, "train.batch_size"),
             "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
             "train_batch_size": (t.batch_size * t.grad_accum * world,
                                  "train.batch_size x train.grad_accum x scaling.num_workers")}
    for key, (value, fields) in batch.items():
        if key in extra and extra[key] != value:
            raise ConfigError(f"deepspeed.extra.{key}: {extra[key]!r} conflicts with {fields} = {value}; allowed: "
                              f"{value} or leave it out (set {fields} instead)")
    for key in ("bf16", "fp16"):
        given = extra.get(key)
        if isinstance(given, dict) and "enabled" in given and bool(given["enabled"]) != (t.precision == key):
            raise ConfigError(f"deepspeed.extra.{key}.enabled: {given['enabled']!r} conflicts with train.precision "
                              f"{t.precision!r}; allowed: set the precision with train.precision only")


def check_deepspeed(cfg: ExperimentConfig) -> None:
    """The generated DeepSpeed config with ``deepspeed.extra`` merged in: no conflict with the fields it is
    generated from, and accepted by DeepSpeed's own config parser (only imported when extra is set)."""
    extra = cfg.deepspeed.extra
    if not extra:
        return
    from raydistill.train.ds_config import deepspeed_config, import_deepspeed

    world = cfg.scaling.num_workers
    merged = deepspeed_config(cfg, world)
    _ds_conflicts(cfg, merged, world)
    # DeepSpeed validates for the world size it finds (1 here): state the batch for one worker.
    single = {**merged, "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum}
    try:
        from pydantic import ValidationError

        import_deepspeed()
        from deepspeed.runtime.config import DeepSpeedConfig
    except Exception:  # noqa: BLE001 - DeepSpeed not importable here: the workers will say why
        return
    try:
        DeepSpeedConfig(single)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"]]
        path = _find_in(extra, loc) or ".".join(loc)
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"deepspeed.extra.{path}: {msg} (got {first.get('input')!r}); DeepSpeed refuses the "
                          "merged config") from None
    except Exception as e:  # noqa: BLE001 - DeepSpeed's asserts and config errors
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"deepspeed.extra {json.dumps(extra, default=str)}: DeepSpeed refuses the merged config "
                          f"({text})") from None


def _find_in(tree: Any, loc: list[str], prefix: str = "") -> str | None:
    """The dotted path under ``tree`` where the key path ``loc`` starts (DeepSpeed reports errors relative to
    the sub-config it validates, e.g. ``stage`` for ``zero_optimization.stage``)."""
    if not isinstance(tree, dict):
        return None
    node: Any = tree
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        return prefix + ".".join(loc)
    for key, sub in tree.items():
        hit = _find_in(sub, loc, f"{prefix}{key}.")
        if hit:
            return hit
    return None


# ----------------------------------------------------------------------------------------------- models
class _Vocab:
    """Stands in for the tokenizer when building model configs before there is one: shapes other than the
    vocabulary do not depend on it (the vocabulary is checked once the tokenizer exists)."""

    pad_token_id = bos_token_id = eos_token_id = 0  # within any vocabulary (presets' defaults may not be)

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _overrides_field(spec: ModelSpec, where: str, *keys: str) -> str:
    """``student.config_overrides.n_head`` when the user set one of ``keys`` there, else the section."""
    hit = [k for k in keys if k in spec.config_overrides]
    return f"{where}.config_overrides.{hit[0]}" if hit else f"{where}.config_overrides"


HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "hidden_size", "n_embd", "d_model")
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def check_heads(config: PretrainedConfig, spec: ModelSpec, where: str) -> None:
    from raydistill.models.adapters import hidden_size

    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or "head_dim" in spec.config_overrides:
        return
    width = hidden_size(config)
    field = _overrides_field(spec, where, *HEAD_KEYS)
    if heads < 1 or width % heads:
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        raise ConfigError(f"{field}: {heads} attention heads do not divide the {where}'s hidden size {width}; "
                          f"allowed head counts: {', '.join(map(str, divisors))}")
    kv = getattr(config, "num_key_value_heads", None)
    if isinstance(kv, int) and (kv < 1 or heads % kv):
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        field = _overrides_field(spec, where, "num_key_value_heads", "num_attention_heads")
        raise ConfigError(f"{field}: {kv} key/value heads do not divide the {where}'s {heads} attention heads; "
                          f"allowed: {', '.join(map(str, divisors))}")


def check_positions(cfg: ExperimentConfig, configs: dict[str, PretrainedConfig]) -> None:
    """Every corpus's block_size fits the positions of every model that reads it."""
    limits = {w: n for w, c in configs.items() if (n := max_positions(c))}
    if not limits:
        return
    where, limit = min(limits.items(), key=lambda kv: kv[1])
    datas = [("data", cfg.data)] + [(f"streams.{k}.data", s.data) for k, s in cfg.streams.items()
                                    if s.data is not None]
    for name, data in datas:
        if data.block_size > limit:
            raise ConfigError(f"{name}.block_size: {data.block_size} tokens exceed the {where}'s {limit} positions; "
                              f"allowed: at most {limit} (or raise the model's max_position_embeddings / n_positions "
                              "in its config_overrides, for models with rotary positions)")


def build_on_meta(config: PretrainedConfig, spec: ModelSpec, where: str):
    """The model with its parameters on the meta device (nothing allocated), or a ConfigError saying why the
    model class refuses the config."""
    import torch

    from raydistill.models.loading import model_class

    try:
        with torch.device("meta"):
            return model_class(config).from_config(config)
    except Exception as e:  # noqa: BLE001 - whatever the model class refuses is the config's fault
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}.config_overrides {spec.config_overrides}: the {config.model_type} model "
                          f"cannot be built from this config ({text})") from None


def check_models(cfg: ExperimentConfig, mode: str = "distill") -> None:
    """Shapes, before the tokenizer: configs built with a stand-in vocabulary."""
    from raydistill.models.adapters import hidden_size, num_layers
    from raydistill.models.loading import (check_attention, model_config, model_info, prepare_student,
                                           student_config, teacher_layer_map)
    from raydistill.objectives import build_objectives

    vocab = _Vocab(cfg.tokenizer.vocab_size)
    teacher_cfg = model_config(cfg.teacher, vocab)
    check_heads(teacher_cfg, cfg.teacher, "teacher")
    check_attention(teacher_cfg, cfg.teacher, "teacher")
    if mode != "distill":
        check_positions(cfg, {"teacher": teacher_cfg})
        if cfg.teacher.config_overrides:
            build_on_meta(teacher_cfg, cfg.teacher, "teacher")
        return
    student_cfg = student_config(cfg, teacher_cfg, vocab)
    check_heads(student_cfg, cfg.student, "student")
    check_attention(student_cfg, cfg.student, "student")
    check_positions(cfg, {"teacher": teacher_cfg, "student": student_cfg})
    if cfg.student.init == "teacher":
        t_width, s_width = hidden_size(teacher_cfg), hidden_size(student_cfg)
        if t_width != s_width:
            field = _overrides_field(cfg.student, "student", "hidden_size", "n_embd", "d_model")
            raise ConfigError(f"{field}: the student's hidden size {s_width} differs from the teacher's {t_width}, "
                              "but student.init 'teacher' copies the teacher's weights; allowed: the teacher's "
                              f"width {t_width}, or student.init=random")
        layers = teacher_layer_map(cfg.student.init_layers, num_layers(teacher_cfg), num_layers(student_cfg))
    if teacher_cfg.vocab_size == student_cfg.vocab_size:  # else: refused once the tokenizer is known
        info = model_info(teacher_cfg, student_cfg)
        build_objectives(cfg.active_objectives(), info)
        for name in cfg.streams:
            build_objectives(cfg.stream_objectives(name), info)
    student = build_on_meta(student_cfg, cfg.student, "student")
    if cfg.student.gradient_checkpointing:  # refused here, before Ray, when the student cannot checkpoint safely
        prepare_student(student, cfg.student.model_copy(update={"compile": False}),
                        cfg.student.block_path or cfg.teacher.block_path)
    if cfg.student.init == "teacher":
        from raydistill.models.loading import teacher_init_sources

        teacher = build_on_meta(teacher_cfg, cfg.teacher, "teacher")
        try:
            teacher_init_sources(student, teacher, layers, cfg.student.block_path or cfg.teacher.block_path)
        except ConfigError as e:
            if not cfg.student.config_overrides:
                raise
            raise ConfigError(f"student.config_overrides {cfg.student.config_overrides}: {e}") from None
    elif cfg.teacher.config_overrides:
        build_on_meta(teacher_cfg, cfg.teacher, "teacher")


# ----------------------------------------------------------------------------------------------- sweeps
def check_sweep_before_ray(sweep) -> None:
    """What ``raydistill sweep`` checks before Ray starts, beyond the sweep file itself (load_sweep): the
    storage directory, and the base config through everything ``raydistill train`` checks (``prepare``:
    files, models, corpus, tokenizer; what it caches, the sweep's own preparation then reuses)."""
    from raydistill.train.plan import prepare

    if sweep.is_local:
        check_writable_dir(sweep.spec.storage_path, "storage_path")
    try:
        prepare(sweep.base_config())
    except ConfigError as e:
        raise ConfigError(f"sweep base config: {e}") from None
