"""The fine-tuning loop and batched prediction shared by every task head (plain PyTorch: AdamW, linear
warmup and decay, gradient clipping, dynamic padding)."""

from __future__ import annotations

import math

import torch
from torch import nn

IGNORE = -100
_PAD_VALUE = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}


def collate(features: list[dict], pad_id: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Stack ``keys`` of the features into tensors; per-token lists are right-padded to the longest."""
    batch = {}
    for key in keys:
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            width = max(len(v) for v in values)
            fill = pad_id if key == "input_ids" else _PAD_VALUE.get(key, 0)
            values = [v + [fill] * (width - len(v)) for v in values]
        dtype = torch.float32 if isinstance(values[0], float) else torch.long
        batch[key] = torch.tensor(values, dtype=dtype)
    return batch


def model_keys(features: list[dict], model: nn.Module) -> tuple[str, ...]:
    """Input keys the model takes: token_type_ids only for models with segment embeddings (BERT)."""
    keys = ["input_ids", "attention_mask"]
    if "token_type_ids" in features[0] and getattr(model.config, "type_vocab_size", 0):
        keys.append("token_type_ids")
    return tuple(keys)


def train(model: nn.Module, features: list[dict], *, label_keys: tuple[str, ...], lr: float, epochs: int,
          batch_size: int, warmup_ratio: float, weight_decay: float, seed: int, device: torch.device,
          pad_id: int) -> dict[str, float]:
    """Fine-tune ``model`` in place; returns steps and the mean loss of the last epoch."""
    keys = model_keys(features, model) + label_keys
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "LayerNorm" in n or "norm" in n.lower()]
    ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if id(p) not in ids]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, int(total * warmup_ratio))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    last_losses: list[tuple[float, int]] = []  # (batch mean, examples)
    for _ in range(epochs):
        last_losses = []
        for chunk in torch.randperm(len(features), generator=generator).split(batch_size):
            batch = collate([features[i] for i in chunk.tolist()], pad_id, keys)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            last_losses.append((loss.item(), len(chunk)))
    # The last epoch's mean per example: its last batch may be smaller than the others.
    seen = sum(n for _, n in last_losses)
    return {"steps": total, "train_loss": sum(value * n for value, n in last_losses) / max(1, seen)}


@torch.no_grad()
def predict(model: nn.Module, features: list[dict], *, outputs: tuple[str, ...], per_token: bool,
            batch_size: int, device: torch.device, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Per feature, the named model outputs (e.g. ``logits``); ``per_token`` outputs are cut to the
    feature's own length. Batches are formed by length, so little time goes into padding."""
    keys = model_keys(features, model)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    results: list[dict | None] = [None] * len(features)
    model.to(device).eval()
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = collate([features[i] for i in index], pad_id, keys)
        out = model(**{k: v.to(device) for k, v in batch.items()})
        for row, i in enumerate(index):
            n = len(features[i]["input_ids"])
            results[i] = {name: out[name][row, :n].float().cpu() if per_token else out[name][row].float().cpu()
                          for name in outputs}
    return results  # type: ignore[return-value]
