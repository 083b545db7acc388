"""Perplexity on held-out text, with no fine-tuning: masked-token perplexity for encoders (a seeded
``mlm_probability`` of the tokens of each window replaced by [MASK] and predicted), next-token perplexity
for decoders. The text is one token stream cut into non-overlapping windows of ``max_length``."""

from __future__ import annotations

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
    tokenizer = load_tokenizer(source, data.train, settings.vocab_size)
    torch.manual_seed(seed)
    model = build_model(source, AutoModelForMaskedLM if source.encoder else AutoModelForCausalLM, tokenizer)
    model.to(device).eval()
    ids = _stream(tokenizer, data.eval)
    if source.encoder:
        if None in (tokenizer.mask_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id):
            raise EvalConfigError(f"model {source.name!r}: masked-token perplexity needs the tokenizer's mask, "
                                  "cls and sep tokens")
        width = settings.max_length - 2
    else:
        width = settings.max_length
    windows = [ids[i:i + width] for i in range(0, len(ids), width)]
    windows = [w for w in windows if len(w) > 1]
    generator = torch.Generator().manual_seed(seed)
    total_nll, count = 0.0, 0
    for start in range(0, len(windows), settings.eval_batch_size):
        chunk = windows[start:start + settings.eval_batch_size]
        if source.encoder:
            nll, k = _masked_nll(model, tokenizer, chunk, settings.mlm_probability, generator, device)
        else:
            nll, k = _causal_nll(model, tokenizer, chunk, device)
        total_nll += nll
        count += k
    note = "; ".join(x for x in (data.note, "random-init preset, not trained" if source.from_scratch else "",
                                 "masked-token perplexity" if source.encoder else "next-token perplexity") if x)
    return TaskOutcome({"perplexity": metrics.perplexity(total_nll, count)}, 0, count, note)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    tokens = torch.tensor([r + [pad_id] * (n - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], dtype=torch.long)
    return tokens, mask


def _masked_nll(model, tokenizer, chunk, probability, generator, device) -> tuple[float, int]:
    inputs, targets = [], []
    for w in chunk:
        chosen = (torch.rand(len(w), generator=generator) < probability).tolist()
        if not any(chosen):  # at least one prediction per window, so short windows still count
            chosen[int(torch.randint(len(w), (1,), generator=generator))] = True
        inputs.append([tokenizer.cls_token_id] + [tokenizer.mask_token_id if c else t for t, c in zip(w, chosen)]
                      + [tokenizer.sep_token_id])
        targets.append([-100] + [t if c else -100 for t, c in zip(w, chosen)] + [-100])
    tokens, mask = _pad(inputs, tokenizer.pad_token_id)
    labels, _ = _pad(targets, -100)
    logits = model(input_ids=tokens.to(device), attention_mask=mask.to(device)).logits.float()
    labels = labels.to(device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return nll.item(), int((labels != -100).sum())


def _causal_nll(model, tokenizer, chunk, device) -> tuple[float, int]:
    tokens, mask = _pad(chunk, tokenizer.pad_token_id)
    logits = model(input_ids=tokens.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    targets = tokens[:, 1:].masked_fill(~mask[:, 1:].bool(), -100).to(device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return nll.item(), int((targets != -100).sum())
