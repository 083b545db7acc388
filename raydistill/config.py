"""Typed experiment configuration: YAML + dotted overrides -> validated ``ExperimentConfig``.

Everything here runs on the driver before Ray starts, so a bad value costs nothing but an error message.
Errors name the dotted field, the offending value and what is allowed (``ConfigError``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from raydistill.errors import ConfigError

PRESETS = ("tiny-bert", "tiny-gpt2", "tiny-llama")
# train.precision -> the torch dtype DeepSpeed computes in (the models' ``torch_dtype`` names).
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ----------------------------------------------------------------------------------------------- YAML
# PyYAML resolves plain scalars by YAML 1.1, where a float needs a dot and a signed exponent: ``1e-4`` and
# ``1.0e4`` are strings. Users write YAML 1.2 numbers, so every YAML raydistill reads (config and sweep files,
# key=value overrides) goes through this loader: SafeLoader with the YAML 1.2 core schema's float rule.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?   # 1.0  1.  1.0e-4  1.5E3
                              |[0-9][0-9_]*[eE][-+]?[0-9]+                    # 1e-4  3E+2
                              |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?)            # .5  .5e-3
                           |[-+]?\.(?:inf|Inf|INF)
                           |\.(?:nan|NaN|NAN))$""", re.X)


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading numbers as YAML 1.2 does (``1e-4`` is a float); nothing else changes."""


YamlLoader.yaml_implicit_resolvers = {  # a deep copy: add_implicit_resolver would append to SafeLoader's lists
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":  # floats before ints, as SafeLoader orders them (the int rule has no '.', 'e')
    YamlLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, (_FLOAT_TAG, _FLOAT_12))


class YamlDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings YamlLoader would read as numbers (a run named '1e5')."""


YamlDumper.yaml_implicit_resolvers = YamlLoader.yaml_implicit_resolvers


def yaml_load(text: str) -> Any:
    """Parse YAML text safely (no arbitrary objects) with YAML 1.2 numbers."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader


def yaml_dump(data: Any) -> str:
    """YAML text that ``yaml_load`` reads back as ``data`` (keys in their given order)."""
    return yaml.dump(data, Dumper=YamlDumper, sort_keys=False, allow_unicode=True)


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_model_name(name: str) -> str:
    """A preset, an existing save_pretrained directory, or a hub id (``org/name``, checked when loaded)."""
    if name in PRESETS:
        return name
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"directory {name!r} has no config.json (expected save_pretrained layout)")
        return str(p.resolve())
    if name.startswith((".", "/", "~")):
        raise ValueError(f"model directory {name!r} does not exist; allowed: a preset {PRESETS}, "
                         "an existing save_pretrained directory, or a Hugging Face hub id")
    return name


# ----------------------------------------------------------------------------------------------- models
class TeacherPretrain(Strict):
    """Train the teacher first (cached by content hash) when it is a random preset, e.g. for offline debugging."""

    max_steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    num_workers: int | None = Field(None, ge=1, description="default: scaling.num_workers")


class ModelSpec(Strict):
    name: str = Field(description="preset (tiny-bert, tiny-gpt2, tiny-llama), local save_pretrained dir, or hub id")
    config_overrides: dict[str, Any] = Field(default_factory=dict, description="fields set on the HF config")
    revision: str | None = None
    block_path: str | None = Field(
        None, description="dotted path of the ModuleList of transformer blocks, for architectures raydistill "
        "does not know (e.g. 'model.layers')")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] | None = Field(
        None, description="attention kernel; default: transformers' own choice (sdpa where the model has it)")
    torch_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the weights are loaded in; default: the teacher in train.precision's dtype, the "
        "student in float32 (DeepSpeed casts it to train.precision's)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _check_model_name(v)


class TeacherSpec(ModelSpec):
    pretrain: TeacherPretrain | None = None


class StudentSpec(ModelSpec):
    name: str | None = Field(None, description="default: the teacher's architecture with num_layers blocks")
    num_layers: int | None = Field(None, ge=1, description="student depth when derived from the teacher "
                                   "(default: half the teacher's)")
    init: Literal["teacher", "random"] = "teacher"
    init_layers: Literal["uniform", "distilbert", "first"] | list[int] = Field(
        "uniform", description="teacher blocks copied into the student: 'uniform' (evenly spaced, first and "
        "last kept; equals DistilBERT's [0,2,4,7,9,11] for 6 of 12), 'distilbert' (the paper's table), "
        "'first', or an explicit list")
    gradient_checkpointing: bool = Field(
        False, description="activation checkpointing of the student's blocks: their activations are recomputed "
        "in backward instead of kept (less memory, about one more forward of compute)")
    compile: bool = Field(False, description="torch.compile each student block's forward (regional compilation; "
                          "the objectives' block hooks stay outside the compiled code)")
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = Field(
        "inductor", description="torch.compile backend with compile=true (aot_eager/eager: to debug compilation)")

    @field_validator("init_layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("init_layers list is empty; give at least one teacher layer index")
            if any(i < 0 for i in v) or len(set(v)) != len(v) or v != sorted(v):
                raise ValueError(f"init_layers {v} must be distinct, increasing, non-negative teacher layer indices")
        return v


class TokenizerSpec(Strict):
    name: str | None = Field(None, description="HF tokenizer id or directory; default: the teacher's tokenizer "
                             "when the teacher is not a preset, else one trained on the corpus")
    vocab_size: int = Field(2048, ge=64, le=1_000_000, description="for a locally trained tokenizer")
    kind: Literal["auto", "wordpiece", "bpe"] = Field("auto", description="auto: wordpiece for encoders, "
                                                      "byte-level BPE for decoders")


# ----------------------------------------------------------------------------------------------- data
def _resolve_paths(v: str | list[str] | None) -> list[str] | None:
    """Expand files / globs to resolved paths; a pattern matching nothing is an error."""
    if v is None:
        return v
    patterns = [v] if isinstance(v, str) else v
    if not patterns:
        raise ValueError("empty list of paths")
    out = []
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise ValueError(f"{pat!r} is not a path; allowed: a file path or glob, or a list of them")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", pat):  # s3://, gs://, ...: listed when the corpus is read
            out.append(pat)
            continue
        pat = os.path.expanduser(pat)
        hits = sorted(glob.glob(pat, recursive=True))
        if not hits:
            raise ValueError(f"no file matches {pat!r}")
        files = [h for h in hits if not Path(h).is_dir()]  # a glob such as data/** also yields directories
        if not files:
            example = os.path.join(pat.rstrip("/"), "*.txt") if len(hits) == 1 else pat.rstrip("/") + "/*.txt"
            raise ValueError(f"{pat!r} {'is a directory' if len(hits) == 1 else 'matches only directories'}; "
                             f"allowed: files or globs of files, e.g. {example!r}")
        out.extend(str(Path(h).resolve()) for h in files)
    return out


class BuiltinCorpus(Strict):
    num_documents: int = Field(4000, ge=10)
    seed: int = 0


class HubDataset(Strict):
    name: str
    config: str | None = None
    split: str = "train"
    validation_split: str | None = None
    streaming: bool = Field(False, description="stream the split shard by shard instead of downloading it whole")


class DataSpec(Strict):
    source: Literal["builtin", "files", "hub"] = Field(
        "builtin", description="inferred: 'files' when path is set, 'hub' when hub is set, else 'builtin'")
    path: str | list[str] | None = Field(None, description="local files or globs (txt, jsonl, csv, parquet)")
    validation_path: str | list[str] | None = None
    validation_fraction: float = Field(0.05, gt=0, lt=1)
    hub: HubDataset | None = None
    builtin: BuiltinCorpus = Field(default_factory=BuiltinCorpus)
    text_field: str = "text"
    block_size: int = Field(128, ge=8, le=65536)
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    max_documents: int | None = Field(None, ge=1, description="cap the corpus (quick runs)")
    seed: int = 0
    pipeline: Literal["auto", "local", "ray"] = Field(
        "auto", description="where the corpus is tokenized and packed: 'local' (this process), 'ray' (a Ray Data "
        "pipeline over the cluster's CPUs), 'auto' (ray above 64 MiB of input or for remote/streamed sources); "
        "the blocks are the same either way")
    cache_uri: str | None = Field(None, description="where packed shards are written (default CACHE_DIR/data); "
                                  "s3://, gs:// or a shared path for multi-node clusters")

    @field_validator("path", "validation_path")
    @classmethod
    def _files_exist(cls, v):
        return _resolve_paths(v)

    @model_validator(mode="after")
    def _source_matches(self):
        if self.source == "builtin" and (self.path or self.hub):
            raise ValueError("data.path or data.hub is set but data.source is 'builtin'; remove data.source "
                             "(it is inferred) or set it to 'files' / 'hub'")
        if self.source == "files" and not self.path:
            raise ValueError("source 'files' needs data.path")
        if self.source == "hub" and self.hub is None:
            raise ValueError("source 'hub' needs data.hub.name")
        return self

    @model_validator(mode="before")
    @classmethod
    def _infer_source(cls, v):
        # data.path=... alone selects local files, data.hub=... alone selects the hub.
        if isinstance(v, dict) and "source" not in v:
            if v.get("path"):
                v = {**v, "source": "files"}
            elif v.get("hub"):
                v = {**v, "source": "hub"}
        return v


# ----------------------------------------------------------------------------------------------- prompts
PROMPT_SUFFIXES = (".jsonl", ".json")


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a prompt template reads, in order; a template must name at least one."""
    import string

    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string ({e}); "
                         "write literal braces as {{ and }}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"template {template!r}: placeholder {{{name}}} must name a field, e.g. {{instruction}}")
        if spec or conv:
            raise ValueError(f"template {template!r}: placeholder {{{name}}} takes no format spec or conversion")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"template {template!r} names no field; e.g. '{{prompt}}' or "
                         "'Instruction: {instruction}\\nInput: {context}\\nResponse:'")
    return names


class BuiltinPrompts(Strict):
    num_examples: int = Field(2000, ge=10, description="fact-sentence completions about the built-in corpus's "
                              "world ('Alice Smith works as' -> ' a doctor for ...'); at most ~400 distinct")
    seed: int = Field(0, description="the world (use data.builtin.seed's value to ask about the training corpus)")


class PromptDataSpec(Strict):
    """Prompt/response examples: jsonl (or a .json list) with one object per example, or the built-in set
    (rows ``{"prompt", "response"}`` about the built-in corpus's people and organisations)."""

    source: Literal["builtin", "files"] = Field("builtin", description="inferred: 'files' when path is set")
    path: str | list[str] | None = Field(None, description="jsonl/json files or globs")
    validation_path: str | list[str] | None = None
    validation_fraction: float = Field(0.05, gt=0, lt=1)
    builtin: BuiltinPrompts = Field(default_factory=BuiltinPrompts)
    template: str = Field("{prompt}", description="the prompt text, a format string over the example's fields, "
                          "e.g. 'Instruction: {instruction}\\nInput: {context}\\nResponse:'")
    response_field: str = Field("response", description="field holding the reference response")
    max_prompt_tokens: int = Field(96, ge=1, description="longer prompts keep their last tokens")
    max_response_tokens: int = Field(64, ge=1, description="longer responses are cut (EOS included)")
    max_examples: int | None = Field(None, ge=1, description="cap the training examples (quick runs)")
    seed: int = Field(0, description="shuffle seed of the held-out split")

    @field_validator("path", "validation_path")
    @classmethod
    def _files_exist(cls, v):
        paths = _resolve_paths(v)
        for path in paths or []:
            if not path.lower().endswith(PROMPT_SUFFIXES):
                raise ValueError(f"{path!r}: allowed file types {', '.join(PROMPT_SUFFIXES)} (one JSON object "
                                 "per line, or a list of objects)")
        return paths

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        template_fields(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _infer_source(cls, v):
        if isinstance(v, dict) and "source" not in v and v.get("path"):
            v = {**v, "source": "files"}
        return v

    @model_validator(mode="after")
    def _source_matches(self):
        if self.source == "builtin" and self.path:
            raise ValueError("path is set but source is 'builtin'; remove source (it is inferred) or set 'files'")
        if self.source == "files" and not self.path:
            raise ValueError("source 'files' needs path")
        return self

    @property
    def max_length(self) -> int:
        return self.max_prompt_tokens + self.max_response_tokens


class SamplingSpec(Strict):
    """How a model writes responses (Hugging Face ``generate``)."""

    do_sample: bool = Field(True, description="false: greedy")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: off")
    max_new_tokens: int | None = Field(None, ge=1, description="default: the prompt data's max_response_tokens")

    def generate_kwargs(self, default_max_new_tokens: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"do_sample": self.do_sample,
                              "max_new_tokens": self.max_new_tokens or default_max_new_tokens}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


class GenerationSpec(SamplingSpec):
    """Regime (b): the teacher answers every training prompt ``num_samples`` times, once; the samples are
    cached under cache_dir/generations by content hash and reused by later runs and restarts."""

    num_samples: int = Field(8, ge=1, description="samples per prompt (8 in the paper)")
    seed: int = 0
    batch_size: int = Field(32, ge=1, description="prompts per generate call on each worker")


class OnPolicySpec(SamplingSpec):
    """Regime (c): with probability ``probability`` (lambda) a micro-batch's responses are replaced by the
    current student's samples for the same prompts (drawn from the step seed: resumes replay it)."""

    probability: float = Field(0.0, ge=0, le=1, description="lambda; 0: off")


class PromptsSpec(PromptDataSpec):
    """Train the main objectives on prompt + response sequences (labels only on the response) instead of
    corpus text. ``responses: teacher`` (regime b): the expert tokens are the teacher's samples;
    ``dataset``: the data's reference responses."""

    responses: Literal["teacher", "dataset"] = "teacher"
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    on_policy: OnPolicySpec = Field(default_factory=OnPolicySpec)

    @model_validator(mode="after")
    def _lengths(self):
        for name, spec in (("generation", self.generation), ("on_policy", self.on_policy)):
            if spec.max_new_tokens is not None and spec.max_new_tokens > self.max_response_tokens:
                raise ValueError(f"{name}.max_new_tokens {spec.max_new_tokens} exceeds max_response_tokens "
                                 f"{self.max_response_tokens}; raise max_response_tokens")
        return self


class RougeSpec(SamplingSpec):
    """ROUGE-L of the student's responses against references, in validation (decoders)."""

    do_sample: bool = Field(False, description="false: greedy (then seeds only repeat the same result)")
    data: PromptDataSpec | None = Field(None, description="default: the prompts section's held-out split when "
                                        "prompts is set, else the built-in prompt set's")
    num_prompts: int = Field(64, ge=1, description="held-out prompts scored (the first N)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="one generation per seed; "
                             "val/rougeL is the mean over seeds")
    batch_size: int = Field(32, ge=1, description="prompts per generate call on each worker")
    teacher: bool = Field(True, description="also score the teacher once (val/rougeL_teacher), for reference")


# ----------------------------------------------------------------------------------------------- training
class TrainSpec(Strict):
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="micro-batch per worker")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0, le=10)
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    grad_clip: float = Field(5.0, ge=0, description="0 disables clipping")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 42
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="validation every N steps; 0: only at the end")
    report_every: int = Field(0, ge=0, description="extra metric reports to Ray/Tune every N steps (each is a "
                              "cross-worker barrier); evaluations and checkpoints always report")
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the last checkpoint")
    fail_at_step: int | None = Field(None, ge=1, description="testing aid: raise once at this step")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or term: 'stop' the run at that step (no export), or 'skip' the step "
        "when DeepSpeed's overflow check did not apply it (counted in the log)")
    divergence: Literal["warn", "stop", "off"] = Field(
        "warn", description="a finite loss that explodes (smoothed, above its start and divergence_factor x its "
        "lowest): 'warn' once (metrics get diverged_at_step), 'stop' the run there (no export), or 'off'")
    divergence_factor: float = Field(4.0, gt=1, description="how many times its lowest the smoothed loss must reach")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas {list(v)} must each lie in [0, 1)")
        return v


class DeepSpeedSpec(Strict):
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only")
    shard_teacher: bool = Field(True, description="with ZeRO-3, partition the teacher's parameters too")
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the generated DeepSpeed config")

    @model_validator(mode="after")
    def _offload(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got {self.zero_stage})")
        return self


class ScalingSpec(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra custom resources")
    resource_timeout_s: float | None = Field(
        None, ge=0, description="how long to wait for the cluster to offer what the workers ask (an autoscaling "
        "cluster adding nodes) before refusing; default 0 on a local cluster, 600 on an existing one")
    keep_freed_host_memory: bool = Field(
        True, description="workers' malloc keeps freed host memory for reuse instead of returning it to the OS, "
        "so big per-step tensors are not page-faulted in again each step (glibc; see README 'CPU memory')")


class RaySpec(Strict):
    address: str | None = Field(None, description="existing cluster; default: RAY_ADDRESS or a new local one")
    dashboard: bool = True
    log_to_driver: bool = True
    health_check_interval_s: float | None = Field(
        None, gt=0, le=60, description="seconds between Ray Train's controller's polls of its workers "
        "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a run's end is noticed up to one poll after its workers are done; "
        "default: that variable where set, else 0.5 (Ray's own default is 2)")


class MonitoringSpec(Strict):
    """What a run shows while it runs: Prometheus series through Ray's metrics agent, terminal progress."""

    metrics: bool = Field(True, description="export training and sweep metrics as Prometheus series "
                          "(ray_raydistill_*, through ray.util.metrics)")
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s of one worker's device, for MFU; default: "
                                     "the data-sheet peak of known GPUs at train.precision (none on CPU)")
    progress: Literal["auto", "live", "plain"] = Field(
        "auto", description="terminal progress: live (updates in place), plain (appended lines), auto (live "
        "when the output is a terminal)")


class TeacherCacheSpec(Strict):
    """The teacher's top-K log-probabilities and ids for every training and validation batch, computed once
    (before training) and read by every run or sweep trial with the same teacher, data and batch layout."""

    top_k: int = Field(64, ge=1, le=65536, description="K: the teacher's most probable tokens stored per position; "
                       "at least what the objectives read (objectives.kd.top_k, td's action set)")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="storage of the log-probabilities (ids are int32); float32 is exact, 16-bit halves "
        "the values' bytes")
    uri: str | None = Field(None, description="where the cache lives: a directory, s3:// or gs://; default: "
                            "STORAGE/NAME/teacher_cache in a sweep, CACHE_DIR/teacher_cache for a run")
    max_gb: float = Field(20.0, gt=0, description="refuse a cache larger than this (GB of 1e9 bytes)")
    tail_samples: int = Field(0, ge=0, le=4096, description="S: tokens per position drawn from the teacher's "
                              "tempered distribution outside its top top_k, stored with their log-probabilities "
                              "and the tail's tempered mass; exactly objectives.kd.tail_samples (with "
                              "objectives.kd.top_k = top_k) when kd reads them")
    tail_temperature: float = Field(1.0, gt=0, description="the temperature the tail samples are drawn at: "
                                    "objectives.kd.temperature when kd reads them")

    def bytes_per_token(self) -> int:
        """Stored bytes per position: a value and an int32 id per top-K column and per tail sample, and the tail's
        log-mass when there are samples."""
        value = 4 if self.dtype == "float32" else 2
        return (self.top_k + self.tail_samples) * (value + 4) + (value if self.tail_samples else 0)

    def footprint(self, cfg: "ExperimentConfig") -> tuple[int, int]:
        """(positions, bytes) the cache holds for ``cfg``: every training micro-batch of every worker and the
        validation batches, block_size positions per row (padding included: rows are stored whole)."""
        t, per_row = cfg.train, cfg.data.block_size
        rows = (t.max_steps * t.grad_accum + t.eval_batches) * t.batch_size * cfg.scaling.num_workers
        return rows * per_row, rows * per_row * self.bytes_per_token()


# ----------------------------------------------------------------------------------------------- objectives
def _objectives_model() -> type[BaseModel]:
    """One optional field per registered objective, so unknown names and settings are schema errors."""
    from raydistill.objectives import REGISTRY

    fields = {name: (cls.Settings | None, None) for name, cls in sorted(REGISTRY.items())}
    return create_model("ObjectivesSpec", __base__=Strict, **fields)


ObjectivesSpec = _objectives_model()


STREAM_NAME = r"^[a-z][a-z0-9_]*$"


class StreamSpec(Strict):
    """A second data stream: its own corpus batches, through the same student/teacher step, with its own
    objectives and weights; its weighted loss adds to the main one every micro-step and its terms are
    logged as ``<stream>/<term>`` (e.g. the TD paper's ``lm`` stream: task 0.5 + kd 0.5 on pre-training text)."""

    data: DataSpec | None = Field(None, description="default: the top-level data corpus")
    batch_size: int | None = Field(None, ge=1, description="micro-batch per worker; default: train.batch_size")
    objectives: ObjectivesSpec  # type: ignore[valid-type]


RUN_NAME = r"^[A-Za-z0-9_.\-]+$"


def check_run_name(v: str) -> str:
    """A name that is one directory name: letters, digits, '_', '-', '.', not '.' or '..'."""
    if not re.match(RUN_NAME, v) or set(v) == {"."} or len(v) > 128:
        raise ValueError(f"{v!r} is not a safe name (it names directories); allowed: 1-128 letters, digits, '_', "
                         "'-' and '.', not '.' or '..' (no path separators or spaces)")
    return v


class ExperimentConfig(Strict):
    name: str = Field("debug", description="run name: the resume key and a directory name")
    output_dir: str = "runs/debug"
    cache_dir: str = Field(default_factory=lambda: os.environ.get(
        "RAYDISTILL_CACHE", str(Path("~/.cache/raydistill").expanduser())))
    teacher: TeacherSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    prompts: PromptsSpec | None = Field(None, description="prompt/response training data (regimes b, c); "
                                        "unset: the main objectives train on the data corpus (regime a)")
    streams: dict[str, StreamSpec] = Field(default_factory=dict, description="extra data streams by name")
    rouge: RougeSpec | None = Field(None, description="ROUGE-L of generated responses in validation")
    objectives: ObjectivesSpec = Field(default_factory=lambda: ObjectivesSpec(task={"weight": 1.0}))  # type: ignore[call-arg]
    train: TrainSpec = Field(default_factory=TrainSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    teacher_cache: TeacherCacheSpec | None = Field(
        None, description="read the teacher's top-K signals from a cache filled once (README 'Teacher cache'); "
        "unset: the teacher runs in every step")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_run_name(v)

    @model_validator(mode="after")
    def _cross_checks(self):
        from raydistill.objectives import REGISTRY

        for cls in REGISTRY.values():
            cls.reconcile(self.objectives)
        active = self.active_objectives()
        if not active:
            raise ValueError("no objective has a positive weight; enable at least one under 'objectives'")
        needed = max(REGISTRY[name].min_batch_size for name in active)
        if self.train.batch_size < needed:
            raise ValueError(f"train.batch_size {self.train.batch_size}: objectives {sorted(active)} pair examples "
                             f"within a batch; allowed: {needed} or more")
        for name, stream in self.streams.items():
            if not re.match(STREAM_NAME, name) or name in REGISTRY or name in ("val", "loss"):
                raise ValueError(f"streams.{name}: a stream name is a lowercase identifier ({STREAM_NAME}) other "
                                 f"than an objective's name or 'val'/'loss' (it prefixes the stream's metrics)")
            for cls in REGISTRY.values():
                cls.reconcile(stream.objectives)
            terms = {k: v for k, v in stream.objectives if v is not None and v.weight > 0}
            if not terms:
                raise ValueError(f"streams.{name}.objectives: no objective has a positive weight")
            size = stream.batch_size or self.train.batch_size
            needed = max(REGISTRY[k].min_batch_size for k in terms)
            if size < needed:
                raise ValueError(f"streams.{name}.batch_size {size}: objectives {sorted(terms)} pair examples "
                                 f"within a batch; allowed: {needed} or more")
        if self.student.init == "teacher" and self.student.config_overrides.get("hidden_size") not in (
                None, self.teacher.config_overrides.get("hidden_size")):
            raise ValueError("student.init 'teacher' copies teacher weights, so the student cannot change "
                             "hidden_size; use student.init=random")
        if self.teacher_cache is not None:
            self._check_teacher_cache(self.teacher_cache)
        return self

    def _check_teacher_cache(self, tc: TeacherCacheSpec) -> None:
        if self.prompts is not None:
            raise ValueError("teacher_cache: the cache holds the teacher's signals on corpus batches, but prompts is "
                             "set (responses sampled by the teacher or the student); unset teacher_cache")
        positions, size = tc.footprint(self)
        if size > tc.max_gb * 1e9:
            raise ValueError(
                f"teacher_cache.max_gb {tc.max_gb:g}: the cache would hold {size / 1e9:.3g} GB ({positions:,} positions "
                f"x {tc.bytes_per_token()} bytes: (top_k {tc.top_k} + tail_samples {tc.tail_samples}) x "
                f"({tc.dtype} value + int32 id){' + the tail mass' if tc.tail_samples else ''}); allowed: raise "
                "teacher_cache.max_gb, or lower teacher_cache.top_k, teacher_cache.tail_samples or train.max_steps")

    @model_validator(mode="after")
    def _model_options(self):
        # DeepSpeed casts the trained module to train.precision's dtype (bf16/fp16 keeping fp32 master weights in
        # the optimizer) and a ZeRO-3-sharded teacher too: a dtype that differs there would not be what runs.
        want = PRECISION_DTYPES[self.train.precision]
        if self.student.torch_dtype not in (None, want):
            raise ValueError(f"student.torch_dtype {self.student.torch_dtype!r} contradicts train.precision "
                             f"{self.train.precision!r}: DeepSpeed trains the student in train.precision's dtype "
                             f"(half precisions with float32 master weights); allowed: {want!r} or unset (set the "
                             "training precision with train.precision)")
        sharded = self.deepspeed.zero_stage == 3 and self.deepspeed.shard_teacher
        if sharded and self.teacher.torch_dtype not in (None, want):
            raise ValueError(f"teacher.torch_dtype {self.teacher.torch_dtype!r}: a teacher sharded by ZeRO-3 "
                             f"(deepspeed.shard_teacher) runs in train.precision's dtype {want!r}; allowed: {want!r} "
                             "or unset, or deepspeed.shard_teacher=false")
        if self.student.compile and self.deepspeed.zero_stage == 3:
            raise ValueError("student.compile true with deepspeed.zero_stage 3: ZeRO-3 gathers and frees each "
                             "block's parameters around its forward, which compiled graphs do not follow; allowed: "
                             "compile=false, or zero_stage 0-2")
        return self

    def active_objectives(self) -> dict[str, Any]:
        """name -> settings of every configured objective with weight > 0, in registry order."""
        return {k: v for k, v in self.objectives if v is not None and v.weight > 0}

    def stream_objectives(self, stream: str) -> dict[str, Any]:
        """Like ``active_objectives`` for the extra stream ``stream``."""
        return {k: v for k, v in self.streams[stream].objectives if v is not None and v.weight > 0}

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of some sections (cache keys for teachers, tokenizers, packed data)."""
        dump = self.model_dump(mode="json")
        payload = {s: dump[s] for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- loading
def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key component")
    # YAML parsing gives numbers, booleans, null and [lists] / {maps} their natural types.
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy, plain types
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k!r} is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def format_validation_error(err: ValidationError, prefix: str = "",
                            model: type[BaseModel] | None = None) -> str:
    """One line per error: the dotted field, what is wrong or allowed, and the value given. ``model`` is the
    class validated (default ExperimentConfig): unknown keys list its allowed keys."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        loc = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "config")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else None
            msg = f"unknown key; allowed: {', '.join(_allowed_keys(parent, model or ExperimentConfig))}"
        elif e["type"] in ("literal_error", "enum"):
            msg = msg.replace("Input should be", "allowed:")
        val = e.get("input")
        # A section's own validators word their messages; a dict where a value belongs is shown when short.
        hide = isinstance(val, dict) and (e["type"] == "value_error" or len(repr(val)) > 80)
        shown = "" if e["type"] == "missing" or hide else f" (got {val!r})"
        lines.append(f"{loc}: {msg}{shown}")
    title = getattr(model, "error_title", "invalid configuration")
    return f"{title}:\n  " + "\n  ".join(lines)


def _allowed_keys(dotted_parent: str | None, model: Any) -> list[str]:
    keyed = False  # the previous field was a dict of sections (streams): this part is a free key
    for part in (dotted_parent.split(".") if dotted_parent else []):
        if keyed:
            keyed = False
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        keyed = getattr(ann, "__origin__", None) is dict
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
        if model is None:
            return []
    return sorted(model.model_fields)


def validate_config(data: dict, cls: type[BaseModel] = ExperimentConfig):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model=cls)) from None


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; allowed: a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (offset {e.start}); allowed: a YAML "
                          "file") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    data = load_yaml(path) if path is not None else {}
    return validate_config(apply_overrides(data, list(overrides)))


def dump_config(cfg: BaseModel) -> str:
    return yaml_dump(cfg.model_dump(mode="json", exclude_none=False))
