"""Resolve teacher and student: configs (cheap, on the driver) and models (in the workers)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from raydistill.config import PRECISION_DTYPES, PRESETS, ExperimentConfig, ModelSpec, StudentSpec
from raydistill.errors import ConfigError
from raydistill.models.adapters import find_blocks, hidden_size, num_layers, set_num_layers
from raydistill.models.presets import preset_config
from raydistill.objectives.base import ModelInfo

# The DistilBERT / Causal-Distill table (teacher depth, student depth) -> teacher blocks.
DISTILBERT_LAYERS = {(12, 6): [0, 2, 4, 7, 9, 11], (12, 3): [0, 2, 4], (6, 3): [0, 2, 5]}


def is_encoder(config: PretrainedConfig) -> bool:
    archs = config.architectures or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return True
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return False
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def special_ids(tok: PreTrainedTokenizerBase) -> dict[str, int | None]:
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def _hub_config(spec: ModelSpec) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(spec.name, revision=spec.revision)
    except OSError as e:
        raise ConfigError(f"model {spec.name!r}: not a preset {PRESETS}, not a local directory, and could not "
                          f"be fetched from the Hugging Face hub ({str(e).splitlines()[0]})") from None
    for key, value in spec.config_overrides.items():
        setattr(config, key, value)
    return config


def model_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    if spec.name in PRESETS:
        return preset_config(spec.name, len(tokenizer), special_ids(tokenizer), spec.config_overrides)
    return _hub_config(spec)


def student_config(cfg: ExperimentConfig, teacher_cfg: PretrainedConfig,
                   tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    spec = cfg.student
    if spec.name is not None:
        config = model_config(spec, tokenizer)
    else:
        config = teacher_cfg.__class__.from_dict(teacher_cfg.to_dict())
        depth = spec.num_layers or max(1, num_layers(teacher_cfg) // 2)
        set_num_layers(config, depth)
        for key, value in spec.config_overrides.items():
            setattr(config, key, value)
    if spec.name is not None and spec.num_layers is not None:
        set_num_layers(config, spec.num_layers)
    return config


def teacher_layer_map(rule, teacher_depth: int, student_depth: int) -> list[int]:
    """Teacher blocks copied into student blocks 0..student_depth-1."""
    if student_depth > teacher_depth:
        raise ConfigError(f"student.num_layers: a {student_depth}-block student is deeper than its "
                          f"{teacher_depth}-block teacher, and student.init 'teacher' copies one distinct teacher "
                          f"block into each student block; allowed: 1..{teacher_depth} blocks, or "
                          "student.init=random")
    if isinstance(rule, list):
        layers = list(rule)
    elif rule == "first":
        layers = list(range(student_depth))
    elif rule == "distilbert":
        if (teacher_depth, student_depth) not in DISTILBERT_LAYERS:
            raise ConfigError(f"student.init_layers 'distilbert' has no entry for a {student_depth}-block student "
                              f"of a {teacher_depth}-block teacher; allowed pairs: {sorted(DISTILBERT_LAYERS)}; "
                              "use 'uniform' (the general rule) or an explicit list")
        layers = DISTILBERT_LAYERS[(teacher_depth, student_depth)]
    else:  # uniform: evenly spaced, first and last teacher blocks kept
        if student_depth == 1:
            layers = [teacher_depth - 1]
        else:
            layers = [int(i * (teacher_depth - 1) / (student_depth - 1) + 0.5) for i in range(student_depth)]
    if len(layers) != student_depth:
        raise ConfigError(f"student.init_layers: {len(layers)} layers {layers} for a {student_depth}-block student")
    if any(not 0 <= i < teacher_depth for i in layers):
        raise ConfigError(f"student.init_layers: {layers} out of range for a {teacher_depth}-block teacher "
                          f"(allowed: 0..{teacher_depth - 1})")
    return layers


# Config fields of architectures that transform logits after the output head (Gemma's softcap, Cohere's and
# Granite's scales), with the value that means "no transform".
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def logit_transform(config: PretrainedConfig) -> str | None:
    """The name of the config field through which ``config``'s model transforms its head's output, or None."""
    for name, identity in LOGIT_TRANSFORMS.items():
        if getattr(config, name, identity) not in (identity, None):
            return name
    return None


def model_info(teacher_cfg: PretrainedConfig | None, student_cfg: PretrainedConfig) -> ModelInfo:
    if teacher_cfg is not None:
        if teacher_cfg.vocab_size != student_cfg.vocab_size:
            raise ConfigError(f"teacher and student vocabularies differ ({teacher_cfg.vocab_size} vs "
                              f"{student_cfg.vocab_size}); they must share one tokenizer")
        if is_encoder(teacher_cfg) != is_encoder(student_cfg):
            raise ConfigError("teacher and student must both be encoders (masked LM) or both decoders (causal LM)")
    return ModelInfo(
        is_encoder=is_encoder(student_cfg), vocab_size=student_cfg.vocab_size,
        student_layers=num_layers(student_cfg), student_hidden=hidden_size(student_cfg),
        teacher_layers=None if teacher_cfg is None else num_layers(teacher_cfg),
        teacher_hidden=None if teacher_cfg is None else hidden_size(teacher_cfg),
        student_logit_transform=logit_transform(student_cfg))


def model_class(config: PretrainedConfig):
    return AutoModelForMaskedLM if is_encoder(config) else AutoModelForCausalLM


# --------------------------------------------------------------------------------------------- model options
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (4.56).
_DTYPE_KW = "dtype" if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
# attn_implementation -> (the model-class flags saying it is supported, the package it needs)
_ATTENTION = {"sdpa": (("_supports_sdpa",), None),
              "flash_attention_2": (("_supports_flash_attn", "_supports_flash_attn_2"), "flash_attn"),
              "eager": ((), None)}


def load_options(spec: ModelSpec | None, dtype: bool = True) -> dict:
    """from_config / from_pretrained keyword arguments of a model section's options (unset: transformers')."""
    kwargs: dict = {}
    if spec is not None and spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    if dtype and spec is not None and spec.torch_dtype is not None:
        kwargs[_DTYPE_KW] = DTYPES[spec.torch_dtype]
    return kwargs


def check_attention(config: PretrainedConfig, spec: ModelSpec, where: str) -> None:
    """``{where}.attn_implementation`` is one this model class supports and whose package is installed here
    (the driver; the workers' transformers checks again when it loads the model)."""
    name = spec.attn_implementation
    if name is None:
        return
    flags, package = _ATTENTION[name]
    cls = model_class(config)._model_mapping.get(type(config), None)
    if cls is not None and flags and not any(getattr(cls, f, False) for f in flags):
        supported = [k for k, (fl, _) in _ATTENTION.items() if not fl or any(getattr(cls, f, False) for f in fl)]
        raise ConfigError(f"{where}.attn_implementation: {cls.__name__} does not support {name!r}; allowed: "
                          f"{', '.join(supported)} (or unset: transformers' default)")
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(f"{where}.attn_implementation {name!r} needs the {package!r} package, which is not "
                          f"installed (pip install flash-attn, on CUDA machines); allowed here: sdpa, eager (or "
                          "unset: transformers' default)")


def teacher_dtype(cfg: ExperimentConfig) -> torch.dtype | None:
    """The dtype the teacher runs in: teacher.torch_dtype, else train.precision's (None: leave as loaded)."""
    if cfg.teacher.torch_dtype is not None:
        return DTYPES[cfg.teacher.torch_dtype]
    return None if cfg.train.precision == "fp32" else DTYPES[PRECISION_DTYPES[cfg.train.precision]]


def build_model(config: PretrainedConfig, source: str | None = None, revision: str | None = None,
                spec: ModelSpec | None = None, dtype: bool = True) -> PreTrainedModel:
    """Random init from ``config`` (source None) or pretrained weights from a directory or hub id, with the
    attention kernel and (``dtype``) the weights' dtype of the model section ``spec``."""
    kwargs = load_options(spec, dtype)
    if kwargs:  # transformers records the kernel and dtype on the config: keep the caller's as it was
        config = copy.deepcopy(config)
    if source is None:
        return model_class(config).from_config(config, **kwargs)
    return model_class(config).from_pretrained(source, config=config, revision=revision, **kwargs)


def prepare_student(student: PreTrainedModel, spec: StudentSpec, block_path: str | None = None) -> PreTrainedModel:
    """Activation checkpointing and torch.compile of the student's blocks, as ``spec`` asks (in place).

    Checkpointing is transformers' own (non-reentrant); raydistill's objectives read and write block outputs in
    forward hooks, which must run once, outside the checkpointed code: otherwise a hook that writes a block's
    output (an interchange intervention) would be absent, or different, when backward recomputes the block after
    the hook's context has exited. Compilation is regional for the same reason: each block's ``forward`` is
    compiled, and the module hooks around it run eagerly."""
    if spec.gradient_checkpointing:
        _, blocks = find_blocks(student, block_path)
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise ConfigError(f"student.gradient_checkpointing: {type(student).__name__} does not support "
                              "activation checkpointing; allowed: false")
        if not all(_checkpoints_forward(b) for b in blocks):
            raise ConfigError(
                "student.gradient_checkpointing: the installed transformers " + transformers.__version__ +
                f" checkpoints whole {type(blocks[0]).__name__} calls, hooks included, so raydistill's block hooks "
                "would not be replayed when backward recomputes a block; allowed: false, or a transformers that "
                "checkpoints the blocks' forward (5.x)")
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):  # the name since transformers 5.x
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if spec.compile:
        _, blocks = find_blocks(student, block_path)
        for block in blocks:
            block.forward = torch.compile(block.forward, backend=spec.compile_backend)
    return student


def _checkpoints_forward(block: torch.nn.Module) -> bool:
    """Whether transformers checkpoints this block's ``forward`` (its module hooks then run outside)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    # transformers 4.x's layers checkpointed ``__call__`` (hooks inside); 5.x wraps ``forward`` and keeps ``__call__``.
    return (isinstance(block, GradientCheckpointingLayer) and hasattr(type(block).forward, "__wrapped__")
            and type(block).__call__ is torch.nn.Module.__call__)


def teacher_init_sources(student: PreTrainedModel, teacher: PreTrainedModel, layers: list[int],
                         block_path: str | None = None) -> dict[str, str]:
    """Student state key -> the teacher state key it is copied from; a ConfigError when the teacher has no
    parameter of that name and shape. Works on meta-device models (the driver checks shapes this way)."""
    s_path, _ = find_blocks(student, block_path)
    t_path, _ = find_blocks(teacher, block_path)
    t_state = teacher.state_dict()
    sources = {}
    for key, value in student.state_dict().items():
        if key.startswith(s_path + "."):
            index, rest = key[len(s_path) + 1:].split(".", 1)
            src = f"{t_path}.{layers[int(index)]}.{rest}"
        else:
            src = key
        if src not in t_state or t_state[src].shape != value.shape:
            found = f"shape {tuple(t_state[src].shape)}" if src in t_state else "none"
            raise ConfigError(f"student.init 'teacher': the student's {key!r} has shape {tuple(value.shape)} but the "
                              f"teacher's {src!r} has {found}; the student must be a shallower copy of the "
                              "teacher's architecture (same widths: remove the student's config_overrides that "
                              "change them), or use student.init=random")
        sources[key] = src
    return sources


def init_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel, layers: list[int],
                      block_path: str | None = None) -> None:
    """Copy embeddings, final norms, LM head and the given teacher blocks into the student."""
    sources = teacher_init_sources(student, teacher, layers, block_path)
    t_state = teacher.state_dict()
    new_state = {key: t_state[src] for key, src in sources.items()}
    with torch.no_grad():
        student.load_state_dict(new_state, strict=True)


def save_pretrained(model: PreTrainedModel, tokenizer, out_dir: str | Path, state_dict=None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)
