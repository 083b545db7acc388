"""Fine-tuning and evaluation settings (one object, passed unchanged to every local or Ray job)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from raydistill.eval.errors import EvalConfigError


@dataclass(frozen=True)
class EvalSettings:
    # None: 1e-3 for a random-init preset (trained from scratch), 5e-5 for pretrained weights.
    learning_rate: float | None = None
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    doc_stride: int = 32  # SQuAD: tokens shared by consecutive windows of a long context (HF's `stride`)
    max_answer_tokens: int = 30
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seeds: tuple[int, ...] = (0,)
    max_train_examples: int | None = None  # a fixed subset, the same for every seed
    max_eval_examples: int | None = None
    vocab_size: int = 8000  # tokenizer trained for a preset
    builtin_seed: int = 0  # world of the built-in corpus (match the seed the student was trained on)
    builtin_train_examples: int = 4000
    builtin_eval_examples: int = 1000
    squad_finetune_fraction: float = 0.5  # share of dev articles fine-tuned on when train-v1.1.json is absent
    mlm_probability: float = 0.15  # masked-token perplexity of encoders
    # Perplexity windows. "sliding" (decoders' default; Hugging Face's perplexity guide): windows of
    # ppl_context_length tokens, ppl_stride apart, each scoring only its tokens that the previous window
    # did not, the rest serving as context, so every token but the first is scored once. "non_overlapping":
    # the stream cut into windows scored whole (encoders' only method: masked-token perplexity).
    ppl_method: str | None = None  # None: "sliding" for decoders, "non_overlapping" for encoders
    ppl_context_length: int | None = None  # None: the model's training length when its raydistill.json
    # records one ("block_size"), else its max positions (capped at 4096)
    ppl_stride: int | None = None  # None: half the context length
    device: str = "auto"  # "auto" (GPU when present), "cpu" or "cuda"
    # torch CPU threads inside a job (None: torch's default, all cores). On a shared machine 1 thread can be
    # many times faster than oversubscribed OpenMP threads; a Ray task uses int(num_cpus).
    num_threads: int | None = None
    num_cpus: float = 1  # resources of one Ray evaluation task
    num_gpus: float | None = None  # None: one GPU per Ray task when the cluster has GPUs, else none

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "eval_batch_size", "max_length", "vocab_size",
                    "builtin_train_examples", "builtin_eval_examples", "max_answer_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise EvalConfigError(f"eval setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_examples", "max_eval_examples", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EvalConfigError(f"eval setting {name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise EvalConfigError(f"eval setting learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.doc_stride <= self.max_length // 2:
            raise EvalConfigError(f"eval setting doc_stride must be in [0, max_length/2], got {self.doc_stride}")
        if not 0 < self.squad_finetune_fraction < 1:
            raise EvalConfigError("eval setting squad_finetune_fraction must be in (0, 1)")
        if not 0 < self.mlm_probability < 1:
            raise EvalConfigError("eval setting mlm_probability must be in (0, 1)")
        if not self.seeds:
            raise EvalConfigError("eval setting seeds: give at least one seed")
        if self.num_cpus <= 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise EvalConfigError("eval settings num_cpus must be > 0 and num_gpus >= 0")
        if self.ppl_method not in (None, "sliding", "non_overlapping"):
            raise EvalConfigError(f"eval setting ppl_method {self.ppl_method!r}: allowed sliding, non_overlapping")
        if self.ppl_context_length is not None and self.ppl_context_length < 4:
            raise EvalConfigError(f"eval setting ppl_context_length must be >= 4 (or unset), got "
                                  f"{self.ppl_context_length}")
        if self.ppl_stride is not None and not 1 <= self.ppl_stride <= (self.ppl_context_length or self.ppl_stride):
            raise EvalConfigError(f"eval setting ppl_stride must be in [1, ppl_context_length] (or unset), got "
                                  f"{self.ppl_stride}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise EvalConfigError(f"eval setting device {self.device!r}: allowed auto, cpu, cuda")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    def to_dict(self) -> dict:
        return asdict(self)
