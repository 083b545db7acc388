"""Driver-side preparation: everything that can be resolved and checked before Ray starts.

``prepare`` turns a validated config into a picklable ``RunPlan``: tokenizer, packed data, model configs
and shapes, objectives checked against those shapes, and where each model's weights come from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from raydistill.config import PRESETS, ExperimentConfig, ModelSpec, PromptDataSpec, PromptsSpec, RougeSpec
from raydistill.data.blocks import Blocks, TokenInfo
from raydistill.data.pipeline import Corpus, DataSession, data_key, data_session, packed_corpus, token_info
from raydistill.data.shards import ShardedBlocks
from raydistill.data.prompts import PromptSet, Sequences, build_sequences, load_prompt_examples, tokenize_prompts
from raydistill.data.tokenizer import cached_tokenizer, load_tokenizer
from raydistill.errors import ConfigError
from raydistill.models.loading import is_encoder, model_config, model_info, student_config, teacher_layer_map
from raydistill.models.presets import ENCODER_PRESETS
from raydistill.objectives import REGISTRY, build_objectives
from raydistill.objectives.base import ModelInfo, ObjectiveSettings

Mode = Literal["distill", "teacher"]


@dataclass
class PromptPlan:
    """Prompt/response training data (regimes b and c, or reference responses)."""

    spec: PromptsSpec
    train: PromptSet
    val_rows: Sequences  # held-out prompts + reference responses: validation batches
    train_rows: Sequences | None  # prompts + reference responses; None when the teacher writes them
    tokenizer_fingerprint: str

    @property
    def length(self) -> int:
        return self.spec.max_length


@dataclass
class StreamPlan:
    """An extra data stream: its corpus blocks (descriptions of shards on storage) and objectives."""

    objectives: dict[str, ObjectiveSettings]
    blocks: tuple[Blocks | ShardedBlocks, Blocks | ShardedBlocks]
    batch_size: int
    mlm_probability: float


@dataclass
class RougePlan:
    spec: RougeSpec
    prompts: PromptSet  # the first num_prompts held-out prompts and their references
    max_new_tokens: int


@dataclass
class RunPlan:
    cfg: ExperimentConfig
    mode: Mode
    tokenizer: PreTrainedTokenizerBase
    token_info: TokenInfo
    info: ModelInfo
    objectives: dict[str, ObjectiveSettings]
    student_config: PretrainedConfig
    student_source: str | None  # None: random init from the config
    student_revision: str | None
    teacher_config: PretrainedConfig | None
    teacher_source: str | None
    teacher_revision: str | None
    init_layers: list[int] | None
    block_paths: tuple[str | None, str | None]
    output_dir: str
    export_dir: str
    # The packed corpus: ShardedBlocks describe token shards on storage (a few KB however large the corpus);
    # each worker opens them as memory maps. In-memory Blocks work too.
    blocks: tuple[Blocks | ShardedBlocks, Blocks | ShardedBlocks] | None = None
    blocks_ref: Any = None  # a Ray ObjectRef once the driver has put the blocks in the object store
    notes: list[str] = field(default_factory=list)
    prompts: PromptPlan | None = None  # None: the main objectives train on the corpus blocks (regime a)
    streams: dict[str, StreamPlan] = field(default_factory=dict)
    rouge: RougePlan | None = None
    teacher_cache: Any = None  # teacher_cache.CacheUse once the cache covers the run (launcher.with_teacher)

    def fetch_blocks(self) -> tuple[Blocks | ShardedBlocks, Blocks | ShardedBlocks]:
        if self.blocks is not None:
            return self.blocks
        import ray

        return ray.get(self.blocks_ref)


def _source(spec: ModelSpec) -> str | None:
    return None if spec.name is None or spec.name in PRESETS else spec.name


def _encoder_kind(cfg: ExperimentConfig) -> bool:
    if cfg.teacher.name in PRESETS:
        return cfg.teacher.name in ENCODER_PRESETS
    try:
        return is_encoder(AutoConfig.from_pretrained(cfg.teacher.name, revision=cfg.teacher.revision))
    except OSError as e:
        raise ConfigError(f"teacher.name {cfg.teacher.name!r}: cannot load its config ({str(e).splitlines()[0]})") \
            from None


def resolve_tokenizer(cfg: ExperimentConfig, train_docs: Iterable[str], encoder: bool) -> PreTrainedTokenizerBase:
    """The named tokenizer, the models', or one trained on ``train_docs`` (iterated only when it is not cached
    yet: a corpus's documents are read piece by piece, never held)."""
    if cfg.tokenizer.name:
        return load_tokenizer(cfg.tokenizer.name)
    for spec in (cfg.teacher, cfg.student):
        if _source(spec):
            return load_tokenizer(spec.name, spec.revision)
    kind = cfg.tokenizer.kind if cfg.tokenizer.kind != "auto" else ("wordpiece" if encoder else "bpe")
    return cached_tokenizer(cfg.cache_dir, data_key(cfg.data), train_docs, kind, cfg.tokenizer.vocab_size)


def _check_vocab(config: PretrainedConfig, tok: PreTrainedTokenizerBase, what: str) -> None:
    if len(tok) > config.vocab_size:
        raise ConfigError(f"{what}: the tokenizer has {len(tok)} tokens but the model's vocabulary has "
                          f"{config.vocab_size}; use the model's own tokenizer (tokenizer.name)")


def pretrained_teacher_dir(cfg: ExperimentConfig, tok: PreTrainedTokenizerBase) -> Path:
    """Where a teacher pretrained by raydistill for this (model, pretrain, data, tokenizer) is cached."""
    from raydistill.data.pipeline import tokenizer_fingerprint

    # The teacher trains in train.precision whatever its torch_dtype (read when it is loaded to distil), and an
    # unset attention kernel leaves the key of teachers cached before the option existed.
    teacher = cfg.teacher.model_dump(mode="json", exclude={"torch_dtype"})
    if teacher["attn_implementation"] is None:
        del teacher["attn_implementation"]
    key = json.dumps({"teacher": teacher, "data": data_key(cfg.data),
                      "block": cfg.data.block_size, "mlm": cfg.data.mlm_probability, "tok": tokenizer_fingerprint(tok),
                      "workers": cfg.scaling.num_workers, "seed": cfg.train.seed}, sort_keys=True)
    return Path(cfg.cache_dir) / "teachers" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _start_ray_for_data(cfg: ExperimentConfig) -> None:
    """Connect to the config's cluster (or start a local one) for the corpus pipeline; no dashboard. The data
    session shuts it down again once the corpora are packed, so training starts Ray as it always has."""
    from raydistill.train.launcher import init_ray

    init_ray(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"dashboard": False})}))


def prepare(cfg: ExperimentConfig, mode: Mode = "distill") -> RunPlan:
    """Resolve and validate everything for a run. The checks that need no corpus come first. Ray is used only
    to prepare a corpus too large for this process (data.pipeline), and only until it is packed."""
    with data_session(lambda: _start_ray_for_data(cfg)) as session:
        return _prepare(cfg, mode, session)


def _prepare(cfg: ExperimentConfig, mode: Mode, session: DataSession) -> RunPlan:
    from raydistill.train.preflight import check_before_ray

    check_before_ray(cfg, mode)
    encoder = _encoder_kind(cfg)
    corpus = Corpus(cfg.data, "data", session)
    tok = resolve_tokenizer(cfg, corpus.train_documents(), encoder)
    blocks = packed_corpus(cfg.data, corpus, tok, encoder, cfg.cache_dir)
    if len(blocks[0]) == 0 or len(blocks[1]) == 0:
        raise ConfigError("data: the corpus produced no training or validation blocks")
    out = Path(cfg.output_dir).expanduser().resolve()
    teacher_cfg = model_config(cfg.teacher, tok)
    _check_vocab(teacher_cfg, tok, "teacher")
    common = dict(cfg=cfg, mode=mode, tokenizer=tok, token_info=token_info(tok, encoder), output_dir=str(out),
                  blocks=blocks)

    if mode == "teacher":
        skipped = [k for k in ("prompts", "rouge") if getattr(cfg, k) is not None] + \
            [f"streams.{k}" for k in cfg.streams]
        objectives = {"task": REGISTRY["task"].Settings(weight=1.0)}
        info = model_info(None, teacher_cfg)
        notes = [f"teacher mode trains {cfg.teacher.name} with the task loss only"]
        ignored = sorted(set(cfg.active_objectives()) - {"task"})
        if ignored:
            notes.append(f"objectives {ignored} need a teacher and are ignored in teacher mode")
        if skipped:
            notes.append(f"{', '.join(skipped)}: distillation settings, ignored in teacher mode (the teacher "
                         "trains on the data corpus)")
        return RunPlan(**common, info=info, objectives=objectives, student_config=teacher_cfg,
                       student_source=_source(cfg.teacher), student_revision=cfg.teacher.revision,
                       teacher_config=None, teacher_source=None, teacher_revision=None, init_layers=None,
                       block_paths=(cfg.teacher.block_path, None), export_dir=str(out / "teacher"), notes=notes)

    teacher_source = _source(cfg.teacher)
    notes = []
    if teacher_source is None and cfg.teacher.pretrain is None:
        notes.append("the teacher is a randomly initialised preset: set teacher.pretrain to train it first")
    student_cfg = student_config(cfg, teacher_cfg, tok)
    _check_vocab(student_cfg, tok, "student")
    info = model_info(teacher_cfg, student_cfg)
    objectives = cfg.active_objectives()
    built = build_objectives(objectives, info)  # constructors validate layer indices etc. against the shapes
    if cfg.teacher_cache is not None:
        from raydistill.objectives.teacher_signals import check_cache_columns

        tc = cfg.teacher_cache
        check_cache_columns(tc.top_k, built, tc.tail_samples, tc.tail_temperature)
    max_positions = min((n for n in (_max_positions(teacher_cfg), _max_positions(student_cfg)) if n), default=None)
    prompt_sets = None
    if cfg.prompts is not None:
        _decoder_only(encoder, "prompts")
        prompt_sets = _prompt_set(cfg.prompts, "prompts", tok, max_positions)
    prompts = _prompt_plan(cfg, tok, prompt_sets)
    streams = {}
    for name, stream in cfg.streams.items():
        settings = cfg.stream_objectives(name)
        build_objectives(settings, info)
        data = stream.data or cfg.data
        stream_blocks = blocks if stream.data is None else packed_corpus(
            data, Corpus(data, f"streams.{name}.data", session), tok, encoder, cfg.cache_dir)
        if len(stream_blocks[0]) == 0 or len(stream_blocks[1]) == 0:
            raise ConfigError(f"streams.{name}.data: the corpus produced no training or validation blocks")
        streams[name] = StreamPlan(settings, stream_blocks, stream.batch_size or cfg.train.batch_size,
                                   data.mlm_probability)
    rouge = _rouge_plan(cfg, tok, encoder, max_positions, prompt_sets)
    init_layers = None
    if cfg.student.init == "teacher":
        init_layers = teacher_layer_map(cfg.student.init_layers, info.teacher_layers, info.student_layers)
    return RunPlan(**common, info=info, objectives=objectives, student_config=student_cfg,
                   student_source=_source(cfg.student), student_revision=cfg.student.revision,
                   teacher_config=teacher_cfg, teacher_source=teacher_source, teacher_revision=cfg.teacher.revision,
                   init_layers=init_layers, block_paths=(cfg.student.block_path or cfg.teacher.block_path,
                                                         cfg.teacher.block_path),
                   export_dir=str(out / "student"), notes=notes, prompts=prompts, streams=streams, rouge=rouge)


def _max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _prompt_set(spec: PromptDataSpec, where: str, tok: PreTrainedTokenizerBase,
                max_positions: int | None) -> tuple[PromptSet, PromptSet]:
    if max_positions is not None and spec.max_length > max_positions:
        raise ConfigError(f"{where}: max_prompt_tokens + max_response_tokens = {spec.max_length} exceeds the "
                          f"models' {max_positions} positions")
    train, val = load_prompt_examples(spec, where)
    return (tokenize_prompts(train, tok, spec.max_prompt_tokens, spec.max_response_tokens),
            tokenize_prompts(val, tok, spec.max_prompt_tokens, spec.max_response_tokens))


def _decoder_only(encoder: bool, where: str) -> None:
    if encoder:
        raise ConfigError(f"{where}: prompt/response data and generation need decoders (causal LMs); the "
                          "teacher is an encoder")


def _prompt_plan(cfg: ExperimentConfig, tok: PreTrainedTokenizerBase,
                 sets: tuple[PromptSet, PromptSet] | None) -> PromptPlan | None:
    from raydistill.data.pipeline import tokenizer_fingerprint

    spec = cfg.prompts
    if spec is None:
        return None
    train, val = sets
    pad = tok.pad_token_id
    return PromptPlan(spec=spec, train=train, val_rows=build_sequences(val.prompts, val.responses, pad),
                      train_rows=build_sequences(train.prompts, train.responses, pad)
                      if spec.responses == "dataset" else None,
                      tokenizer_fingerprint=tokenizer_fingerprint(tok))


def _rouge_plan(cfg: ExperimentConfig, tok: PreTrainedTokenizerBase, encoder: bool, max_positions: int | None,
                prompt_sets: tuple[PromptSet, PromptSet] | None) -> RougePlan | None:
    spec = cfg.rouge
    if spec is None:
        return None
    _decoder_only(encoder, "rouge")
    if spec.data is not None:
        data, where = spec.data, "rouge.data"
    elif cfg.prompts is not None:
        data, where = cfg.prompts, "prompts"
    else:  # the built-in questions about the built-in corpus's world
        data, where = PromptDataSpec(builtin={"seed": cfg.data.builtin.seed}), "rouge"
    # Scoring the prompts section's held-out split: reuse the set already loaded and tokenized.
    _, val = prompt_sets if data is cfg.prompts else _prompt_set(data, where, tok, max_positions)
    if spec.max_new_tokens is not None and max_positions is not None and \
            data.max_prompt_tokens + spec.max_new_tokens > max_positions:
        raise ConfigError(f"rouge.max_new_tokens {spec.max_new_tokens}: prompts of up to {data.max_prompt_tokens} "
                          f"tokens plus the response exceed the models' {max_positions} positions")
    return RougePlan(spec=spec, prompts=val.subset(spec.num_prompts),
                     max_new_tokens=spec.max_new_tokens or data.max_response_tokens)
