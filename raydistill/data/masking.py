"""Training targets: BERT-style MLM masking for encoders, shifted next-token labels for decoders.
Both return ``labels`` aligned with the logits (-100 where nothing is predicted)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100

Generators = torch.Generator | Sequence[torch.Generator]


def _draw(fn, shape: torch.Size, generator: Generators, *args) -> torch.Tensor:
    """``fn(*args, shape, generator=...)`` from one generator, or row by row from one generator per row (so
    that a row's draws depend on its own seed alone, not on which batch it is in)."""
    if isinstance(generator, torch.Generator):
        return fn(*args, shape, generator=generator)
    return torch.stack([fn(*args, shape[1:], generator=g) for g in generator])


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, mask_id: int, vocab_size: int,
                probability: float, generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``probability`` of the non-special tokens; of those 80% -> [MASK], 10% -> random, 10% kept.

    ``generator``: one for the batch, or one per row (each row's masking then depends on its seed alone).
    At least one token per row with a maskable position is chosen, so no row contributes an empty loss."""
    rand = _draw(torch.rand, input_ids.shape, generator)
    candidates = ~special_mask.bool()
    chosen = (rand < probability) & candidates
    # Guarantee one target per row: pick the candidate with the smallest draw where nothing was chosen.
    empty = ~chosen.any(-1) & candidates.any(-1)
    if empty.any():
        first = rand.masked_fill(~candidates, 2.0).argmin(-1)
        chosen[empty, first[empty]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    action = _draw(torch.rand, input_ids.shape, generator)
    inputs = input_ids.clone()
    inputs[chosen & (action < 0.8)] = mask_id
    randomize = chosen & (action >= 0.8) & (action < 0.9)
    inputs[randomize] = _draw(torch.randint, input_ids.shape, generator, vocab_size)[randomize]
    return inputs, labels


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """labels[t] = input_ids[t+1] where t+1 is a real token; the last position predicts nothing."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), IGNORE)
    return labels
