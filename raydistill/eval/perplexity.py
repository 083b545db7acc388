"""Perplexity on held-out text, with no fine-tuning. The text is one token stream (documents joined by the
tokenizer's sep or eos token).

Decoders: next-token perplexity, by default with the sliding window of Hugging Face's perplexity guide
(``transformers`` docs, "Perplexity of fixed-length models"): windows of ``context`` tokens start every
``stride`` tokens; each window scores only its last ``end - prev_end`` tokens (those the previous window
did not reach), the tokens before them are context with label -100. Every token but the stream's first is
scored exactly once, each with at least ``context - stride`` tokens of context (all it has, near the
start). ``non_overlapping`` windows (the sliding window with stride = context) score each window's tokens
from what precedes them in that window only: a window's first token is not scored at all (nothing in the
window predicts it) and the next ones see little context, so perplexity comes out higher and depends on the
window length.

Encoders: masked-token perplexity on non-overlapping windows (a seeded ``mlm_probability`` of each
window's tokens replaced by [MASK] and predicted, at least one per window).

The window settings (:class:`~raydistill.eval.settings.EvalSettings` ``ppl_*``) default to the model's
training length and half of it as the stride; :func:`window_settings` resolves them and the result rows
name what was used (``method``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from raydistill.eval import metrics
from raydistill.eval.errors import EvalConfigError
from raydistill.eval.finetune import TaskOutcome
from raydistill.eval.model_source import ModelSource, build_model, load_tokenizer
from raydistill.eval.settings import EvalSettings
from raydistill.eval.taskdata import TaskData
from raydistill.eval.tasks import TaskSpec

IGNORE = -100
MAX_DEFAULT_CONTEXT = 4096  # long-context models (RoPE, 128k positions) are scored at this by default


@dataclass(frozen=True)
class WindowSettings:
    method: str  # "sliding" or "non_overlapping"
    context: int  # tokens per window (encoders: including [CLS] and [SEP])
    stride: int  # tokens between window starts (= context for non_overlapping)

    def describe(self) -> str:
        """What the result rows carry in ``method``, e.g. ``sliding_window(context=1024,stride=512)``."""
        if self.method == "sliding":
            return f"sliding_window(context={self.context},stride={self.stride})"
        return f"non_overlapping(context={self.context})"


def max_positions(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def trained_length(source: ModelSource) -> int | None:
    """The sequence length a raydistill export was trained on, when its ``raydistill.json`` records it."""
    if source.kind != "dir":
        return None
    try:
        value = json.loads((Path(source.location) / "raydistill.json").read_text()).get("block_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def check_method(settings: EvalSettings, encoder: bool) -> None:
    if encoder and settings.ppl_method == "sliding":
        raise EvalConfigError("eval setting ppl_method 'sliding' is for decoders (next-token perplexity); an "
                              "encoder's masked-token perplexity uses non_overlapping windows")


def window_settings(settings: EvalSettings, config, encoder: bool, source: ModelSource | None = None
                    ) -> WindowSettings:
    """The perplexity windows for a model: ``settings.ppl_*`` where set, else the model's training length
    (raydistill.json's ``block_size``) or max positions (at most MAX_DEFAULT_CONTEXT) as the context, half
    of it as the stride, ``sliding`` for decoders and ``non_overlapping`` for encoders."""
    check_method(settings, encoder)
    positions = max_positions(config)
    context = settings.ppl_context_length
    if context is None:
        context = (trained_length(source) if source is not None else None) or positions or settings.max_length
        context = min(context, positions or context, MAX_DEFAULT_CONTEXT)
    elif positions is not None and context > positions:
        raise EvalConfigError(f"eval setting ppl_context_length {context} exceeds the model's {positions} positions")
    if context < 4:
        raise EvalConfigError(f"perplexity context of {context} tokens is too short (the model has {positions} "
                              "positions); set ppl_context_length >= 4")
    method = settings.ppl_method or ("non_overlapping" if encoder else "sliding")
    if method == "non_overlapping":
        return WindowSettings(method, context, context)
    stride = settings.ppl_stride or max(1, context // 2)
    if stride > context:
        raise EvalConfigError(f"eval setting ppl_stride {stride} exceeds the context length {context}: tokens "
                              "between windows would never be scored")
    return WindowSettings(method, context, stride)


def _stream(tokenizer, texts: list[str]) -> list[int]:
    separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        if separator is not None:
            ids.append(separator)
    return ids


@torch.no_grad()
def run_perplexity(spec: TaskSpec, source: ModelSource, data: TaskData, settings: EvalSettings, seed: int,
                   device: torch.device) -> TaskOutcome:
    check_method(settings, source.encoder)
    tokenizer = load_tokenizer(source, data.train, settings.vocab_size)
    torch.manual_seed(seed)
    model = build_model(source, AutoModelForMaskedLM if source.encoder else AutoModelForCausalLM, tokenizer)
    model.to(device).eval()
    windows = window_settings(settings, model.config, source.encoder, source)
    ids = _stream(tokenizer, data.eval)
    # A batch holds about as many tokens as an eval batch of the other tasks (eval_batch_size x max_length).
    batch_windows = max(1, settings.eval_batch_size * settings.max_length // windows.context)
    if source.encoder:
        if None in (tokenizer.mask_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id):
            raise EvalConfigError(f"model {source.name!r}: masked-token perplexity needs the tokenizer's mask, "
                                  "cls and sep tokens")
        total_nll, count = masked_nll(model, tokenizer, ids, width=windows.context - 2, batch_windows=batch_windows,
                                      probability=settings.mlm_probability,
                                      generator=torch.Generator().manual_seed(seed), device=device)
        kind = "masked-token perplexity"
    else:
        total_nll, count = causal_nll(model, ids, context=windows.context, stride=windows.stride,
                                      batch_windows=batch_windows, pad_id=tokenizer.pad_token_id, device=device)
        kind = "next-token perplexity"
    if windows.method == "sliding":
        how = f"sliding window: context {windows.context}, stride {windows.stride}"
    else:
        how = f"non-overlapping windows of {windows.context} tokens"
    note = "; ".join(x for x in (data.note, "random-init preset, not trained" if source.from_scratch else "",
                                 f"{kind}, {how}, {count} of {len(ids)} tokens scored") if x)
    return TaskOutcome({"perplexity": metrics.perplexity(total_nll, count)}, 0, count, note,
                       method=windows.describe())


def causal_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of each window over a stream of ``n_tokens``: the tokens
    ``[begin, end)`` go in, those from ``first_scored`` on are scored (the Hugging Face guide's loop:
    ``trg_len = end - prev_end``; a window's first token has nothing to be predicted from). Windows that
    score nothing are left out."""
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context, got context {context}, stride {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(begin + 1, prev_end)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def causal_nll(model, ids: list[int], *, context: int, stride: int, batch_windows: int, pad_id: int | None,
               device) -> tuple[float, int]:
    """(summed next-token NLL in nats, tokens scored) of ``ids`` under a causal LM, windows as
    :func:`causal_windows`; ``stride = context`` gives non-overlapping windows."""
    pad_id = 0 if pad_id is None else pad_id
    windows = causal_windows(len(ids), context, stride)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_windows):
        chunk = windows[start:start + batch_windows]
        rows = [ids[b:e] for b, e, _ in chunk]
        labels = [[IGNORE] * (f - b) + ids[f:e] for b, e, f in chunk]
        tokens, mask = _pad(rows, pad_id)
        targets, _ = _pad(labels, IGNORE)
        logits = model(input_ids=tokens.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        targets = targets[:, 1:].to(device)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((targets != IGNORE).sum())
    return total, count


def masked_nll(model, tokenizer, ids: list[int], *, width: int, batch_windows: int, probability: float,
               generator: torch.Generator, device) -> tuple[float, int]:
    """(summed NLL of the masked tokens, tokens masked) over non-overlapping windows of ``width`` tokens,
    each wrapped in [CLS] ... [SEP]."""
    windows = [w for w in (ids[i:i + width] for i in range(0, len(ids), width)) if len(w) > 1]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_windows):
        nll, k = _masked_batch(model, tokenizer, windows[start:start + batch_windows], probability, generator, device)
        total += nll
        count += k
    return total, count


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    tokens = torch.tensor([r + [pad_id] * (n - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], dtype=torch.long)
    return tokens, mask


def _masked_batch(model, tokenizer, chunk, probability, generator, device) -> tuple[float, int]:
    inputs, targets = [], []
    for w in chunk:
        chosen = (torch.rand(len(w), generator=generator) < probability).tolist()
        if not any(chosen):  # at least one prediction per window, so short windows still count
            chosen[int(torch.randint(len(w), (1,), generator=generator))] = True
        inputs.append([tokenizer.cls_token_id] + [tokenizer.mask_token_id if c else t for t, c in zip(w, chosen)]
                      + [tokenizer.sep_token_id])
        targets.append([IGNORE] + [t if c else IGNORE for t, c in zip(w, chosen)] + [IGNORE])
    tokens, mask = _pad(inputs, tokenizer.pad_token_id)
    labels, _ = _pad(targets, IGNORE)
    logits = model(input_ids=tokens.to(device), attention_mask=mask.to(device)).logits.float()
    labels = labels.to(device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    return nll.item(), int((labels != IGNORE).sum())
