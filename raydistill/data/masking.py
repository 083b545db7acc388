"""Training targets: BERT-style MLM masking for encoders, shifted next-token labels for decoders.
Both return ``labels`` aligned with the logits (-100 where nothing is predicted)."""

from __future__ import annotations

import torch

IGNORE = -100


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, mask_id: int, vocab_size: int,
                probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``probability`` of the non-special tokens; of those 80% -> [MASK], 10% -> random, 10% kept.

    At least one token per row with a maskable position is chosen, so no row contributes an empty loss."""
    rand = torch.rand(input_ids.shape, generator=generator)
    candidates = ~special_mask.bool()
    chosen = (rand < probability) & candidates
    # Guarantee one target per row: pick the candidate with the smallest draw where nothing was chosen.
    empty = ~chosen.any(-1) & candidates.any(-1)
    if empty.any():
        first = rand.masked_fill(~candidates, 2.0).argmin(-1)
        chosen[empty, first[empty]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    action = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (action < 0.8)] = mask_id
    randomize = chosen & (action >= 0.8) & (action < 0.9)
    inputs[randomize] = torch.randint(vocab_size, input_ids.shape, generator=generator)[randomize]
    return inputs, labels


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """labels[t] = input_ids[t+1] where t+1 is a real token; the last position predicts nothing."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), IGNORE)
    return labels
