"""Interchange-intervention agreement (IIA): how often the student's counterfactual prediction equals the
teacher's, per aligned pair, on held-out base/source pairs.

For each batch, sources are a derangement of the batch and spans are chosen as in training
(``raydistill.interventions.sample_plan``, seeded per batch so every evaluation sees the same pairs);
both models run the base with the span overwritten by the source's block outputs at each aligned pair's
layers. Counted predictions: the argmax at masked positions (``labels != -100``) for encoders; for
decoders the next-token argmax at every real position from the start of the base span on (earlier
positions cannot see the intervention). IIA = agreeing predictions / counted predictions, pooled over
batches. Any student can be measured, trained with IIT or not.

Under ZeRO-3 every rank must call it (parameters are gathered collectively), each on its own batches;
pool ranks with the returned ``iia/predictions`` counts.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from raydistill.alignment import AlignmentPair, LayerPair, resolve_alignment
from raydistill.models.adapters import eval_mode
from raydistill.interventions import (blocks_of, counterfactual, model_inputs, plan_generator, read, sample_plan,
                                      source_states)

_SALT = 0x11A


def prediction_mask(batch: Mapping[str, torch.Tensor], span_start: torch.Tensor, is_encoder: bool) -> torch.Tensor:
    """[B, T] bool: the predictions IIA counts (see module doc)."""
    real = batch["attention_mask"].bool()
    if is_encoder:
        if "labels" not in batch:
            raise ValueError("IIA on an encoder counts masked positions: the batch needs MLM 'labels'")
        return real & (batch["labels"] != -100)
    cols = torch.arange(real.shape[1], device=real.device)
    return real & (cols[None, :] >= span_start[:, None])


@torch.no_grad()
def interchange_agreement(student: nn.Module, teacher: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                          alignment: str | list[AlignmentPair] | list[dict] | list[LayerPair] = "full", *,
                          is_encoder: bool, seed: int = 0, span_proportion: float = 0.3,
                          include_special_tokens: bool = False, aligned_positions: bool = False,
                          max_tokens: int | None = None, student_block_path: str | None = None,
                          teacher_block_path: str | None = None) -> dict[str, float]:
    """IIA per aligned pair (``iia/<pair label>``, e.g. ``iia/t4_5-s2``), their mean (``iia/mean``) and
    the number of counted predictions per pair (``iia/predictions``).

    ``alignment`` is a preset or explicit pairs (validated against the models' depths) or resolved
    ``LayerPair``s. Batches hold ``input_ids``, ``attention_mask``, for encoders ``labels`` (MLM) and
    optionally ``special_tokens_mask``, on the models' device."""
    t_depth = len(blocks_of(teacher, teacher_block_path))
    s_depth = len(blocks_of(student, student_block_path))
    if alignment and isinstance(alignment, list) and isinstance(alignment[0], LayerPair):
        pairs = list(alignment)
    else:
        pairs = resolve_alignment(alignment, t_depth, s_depth, field="iia.alignment")
    t_layers = sorted({t for p in pairs for t in p.teacher})
    s_layers = sorted({p.student for p in pairs})
    agree = {p: 0 for p in pairs}
    total = 0
    # Dropout would make agreement noisy.
    with eval_mode(student, teacher):
        for n, batch in enumerate(batches):
            gen = plan_generator(seed * 1_000_003 + n, _SALT)
            plan = sample_plan(batch["attention_mask"], batch.get("special_tokens_mask"), gen,
                               proportion=span_proportion, include_special_tokens=include_special_tokens,
                               aligned=aligned_positions, max_tokens=max_tokens)
            inputs = model_inputs(batch, is_encoder)
            # The sources are the batch itself: one truncated run per model gives both the source values
            # and the base prefixes the counterfactual runs start from.
            t_states = source_states(teacher, inputs, t_layers, teacher_block_path)
            s_states = source_states(student, inputs, s_layers, student_block_path)
            counted = prediction_mask(batch, plan.span_start, is_encoder)
            total += int(counted.sum())
            for p in pairs:
                t_logits, _ = counterfactual(teacher, inputs, plan.base,
                                             {t: read(t_states[t], plan.source) for t in p.teacher},
                                             base_hidden=t_states[p.teacher[0]], block_path=teacher_block_path)
                s_logits, _ = counterfactual(student, inputs, plan.base,
                                             {p.student: read(s_states[p.student], plan.source)},
                                             base_hidden=s_states[p.student], block_path=student_block_path)
                same = t_logits.argmax(-1) == s_logits.argmax(-1)
                agree[p] += int((same & counted).sum())
    result = {f"iia/{p.label}": agree[p] / max(total, 1) for p in pairs}
    result["iia/mean"] = sum(result.values()) / len(pairs)
    result["iia/predictions"] = float(total)  # weight for pooling ranks: sum(iia * predictions) / sum(predictions)
    return result
