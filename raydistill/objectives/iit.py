"""``iit`` and ``iit_cosine``: causal distillation by interchange intervention training (IIT).

Per step, for the aligned pair(s) of the step (one sampled uniformly, or all):
the batch is paired with a derangement of itself (the sources), one span per example is chosen (see
``raydistill.interventions.sample_plan``), and the teacher (no gradients) and the student (gradients)
each run the base batch with the span's block outputs at the aligned layers overwritten by the source's.
``iit`` = tau^2 * KL(teacher_cf_tau || student_cf_tau) averaged over non-padding base positions;
``iit_cosine`` = 1 - cos between the last block outputs of the two counterfactual runs (same positions).

Cost. The sources are the batch itself, so their block outputs are the ones the step's ordinary forward
passes already captured (``needs()`` asks for every aligned layer): no source pass runs, and the
student's gradient reaches its source computation through that graph. Each source keeps the MLM
masking it has in the batch, drawn independently of its base's masking, as the reference's separately
masked dual examples. The counterfactual run starts from the base run's output of the lowest intervened
block (``resume_from``), so only the blocks above it and the LM head run again, and the head only at the
positions the intervention can change (``changed_positions``) when the step has the base logits for the rest.

The two objectives share one counterfactual computation per step (cached in ``step.extras``) when their
intervention settings are equal; ``share_intervention_settings`` lets the config give iit_cosine the
settings of ``objectives.iit`` so that they are.

Randomness. Pairing, spans and the sampled pair come from a CPU ``torch.Generator`` mixed with a fixed
salt. In training, batches carry ``sample_ids`` (each example's position in the run's sample stream) and
the step gives ``step.extras['step_seed']`` (one seed per optimiser step): examples are paired with their
neighbour (``interventions.partners``), each draws its span offsets from its own key, and every micro-batch
and worker of the step samples the same aligned pair, so a step's plans do not depend on how it is split
over micro-batches (of even size) and workers. Otherwise the generator is seeded with ``step.extras['seed']``
or, without one, a hash of the batch's token ids, and sources are a random derangement. Either way a resumed
run draws the same plans.

Block paths for architectures that need ``block_path`` are read from ``step.extras['student_block_path']``
and ``step.extras['teacher_block_path']`` (None: auto-detected).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Discriminator, Field, Tag, field_validator

from raydistill.alignment import ALIGNMENT_PRESETS, AlignmentPair, LayerPair, resolve_alignment
from raydistill.errors import ConfigError
from raydistill.interventions import (InterchangePlan, changed_positions, counterfactual, model_inputs,
                                      plan_generator, read, sample_plan)
from raydistill.objectives import register
from raydistill.objectives.base import (ModelInfo, Needs, Objective, ObjectiveSettings, Step,
                                        width_projection)
from raydistill.objectives.soft_kl import soft_kl

_SALT = 0x11717  # plan streams are independent of other users of the step seed
_CACHE = "_iit_counterfactuals"


# A preset name or explicit pairs; the discriminator keeps errors to the branch the value is meant for.
Alignment = Annotated[Union[Annotated[str, Tag("preset")], Annotated[list[AlignmentPair], Tag("pairs")]],
                      Discriminator(lambda v: "preset" if isinstance(v, str) else "pairs")]


class InterventionSettings(ObjectiveSettings):
    """What is intervened on, shared by ``iit`` and ``iit_cosine``."""

    alignment: Alignment = Field(
        "full", description="preset (middle, late, full) or a list of {teacher: [layers], student: layer} "
        "(0-based block outputs; negative counts from the end)")
    pair_sampling: Literal["uniform_one", "all"] = Field(
        "uniform_one", description="per step: one aligned pair drawn uniformly (the paper), or every pair")
    span_proportion: float = Field(0.3, gt=0, le=1, description="span length as a proportion of the shorter "
                                   "real length of base and source (at least one token)")
    include_special_tokens: bool = Field(False, description="let spans cover special tokens ([CLS], [SEP])")
    aligned_positions: bool = Field(False, description="the same positions in base and source instead of "
                                    "independent offsets")
    max_tokens: int | None = Field(None, ge=1, description="cap on the span length")
    reuse_base_prefix: bool = Field(True, description="start counterfactual runs from the base run's output of "
                                    "the lowest intervened block instead of recomputing the blocks below")

    @field_validator("alignment")
    @classmethod
    def _preset(cls, v):
        # Depths are unknown here; pairs are checked against the models in the objective's constructor.
        if isinstance(v, str) and v not in ALIGNMENT_PRESETS:
            raise ValueError(f"unknown preset {v!r}; allowed: {', '.join(ALIGNMENT_PRESETS)} or a list of "
                             "{teacher: [layers], student: layer}")
        return v


INTERVENTION_FIELDS = tuple(f for f in InterventionSettings.model_fields if f not in ObjectiveSettings.model_fields)


class IITSettings(InterventionSettings):
    temperature: float = Field(2.0, gt=0, description="softening temperature tau of the counterfactual KL")


class IITCosineSettings(InterventionSettings):
    pass


def share_intervention_settings(iit: IITSettings | None,
                                iit_cosine: IITCosineSettings | None) -> IITCosineSettings | None:
    """``iit_cosine`` with the intervention settings of ``iit`` where it does not set them itself, so both
    terms use one intervention (and one counterfactual computation). Raises when both set a field
    differently. Meant for the config's cross-checks; ``iit`` may have weight 0."""
    if iit is None or iit_cosine is None:
        return iit_cosine
    update = {}
    for name in INTERVENTION_FIELDS:
        mine, theirs = getattr(iit_cosine, name), getattr(iit, name)
        if name not in iit_cosine.model_fields_set:
            update[name] = theirs
        elif mine != theirs:
            raise ConfigError(f"objectives.iit_cosine.{name} ({_show(mine)}) differs from objectives.iit.{name} "
                              f"({_show(theirs)}); both terms share one intervention: set it under objectives.iit")
    return iit_cosine.model_copy(update=update)


def _show(value) -> str:
    if isinstance(value, list):
        return repr([v.model_dump() if isinstance(v, AlignmentPair) else v for v in value])
    return repr(value)


@dataclass
class PairResult:
    pair: LayerPair
    teacher_logits: torch.Tensor
    student_logits: torch.Tensor
    teacher_last: torch.Tensor
    student_last: torch.Tensor


@dataclass
class Counterfactuals:
    input_ids: torch.Tensor  # identity check: a cache entry belongs to one batch
    seed: int
    plan: InterchangePlan
    results: list[PairResult]


def step_seed(step: Step) -> int:
    seed = step.extras.get("seed")
    if seed is not None:
        return int(seed)
    digest = hashlib.sha256(step.batch["input_ids"].detach().cpu().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little")


def run_counterfactuals(step: Step, pairs: list[LayerPair], settings: InterventionSettings) -> Counterfactuals:
    """The plan of this step and, for the pair(s) it uses, both models' counterfactual logits and last
    block outputs. Source block outputs and base prefixes come from the step's captured hidden states."""
    batch, info = step.batch, step.info
    # The plan depends on the masks and keys: made from the host batch when the loop gave it (no device read).
    source = batch if step.host_batch is None else step.host_batch
    keys = source.get("sample_ids")
    # Training batches carry their examples' stream positions: the plan and the sampled pair then come from
    # the optimiser step's seed and each example's key, the same however the step is split.
    keyed = keys is not None and "step_seed" in step.extras
    gen = plan_generator(int(step.extras["step_seed"]) if keyed else step_seed(step), _SALT)
    planned = sample_plan(source["attention_mask"], source.get("special_tokens_mask"), gen,
                          proportion=settings.span_proportion, include_special_tokens=settings.include_special_tokens,
                          aligned=settings.aligned_positions, max_tokens=settings.max_tokens,
                          keys=keys if keyed else None)
    plan = planned.to(batch["input_ids"].device)
    if settings.pair_sampling == "all":
        chosen = pairs
    else:
        chosen = [pairs[int(torch.randint(len(pairs), (1,), generator=gen))]]
    inputs = model_inputs(batch, info.is_encoder)
    t_path, s_path = step.extras.get("teacher_block_path"), step.extras.get("student_block_path")
    t_last, s_last = info.teacher_layers - 1, info.student_layers - 1
    seq = batch["input_ids"].size(1)
    results = []
    for pair in chosen:
        t_low = min(pair.teacher)
        with torch.no_grad():
            t_values = {layer: read(_hidden(step, "teacher", layer), plan.source) for layer in pair.teacher}
            t_base = _hidden(step, "teacher", t_low) if settings.reuse_base_prefix else None
            t_logits, t_cap = counterfactual(
                step.teacher_model, inputs, plan.base, t_values, base_hidden=t_base, capture=[t_last],
                block_path=t_path, **_reuse_logits(step.teacher, planned, seq, t_low, info.teacher_layers, info))
        s_values = {pair.student: read(_hidden(step, "student", pair.student), plan.source)}
        s_base = _hidden(step, "student", pair.student) if settings.reuse_base_prefix else None
        s_logits, s_cap = counterfactual(
            step.student_model, inputs, plan.base, s_values, base_hidden=s_base, capture=[s_last],
            block_path=s_path, **_reuse_logits(step.student, planned, seq, pair.student, info.student_layers, info))
        results.append(PairResult(pair, t_logits, s_logits, t_cap[t_last], s_cap[s_last]))
    return Counterfactuals(batch["input_ids"], step_seed(step), plan, results)


def _reuse_logits(out, plan: InterchangePlan, seq: int, lowest: int, blocks: int, info: ModelInfo) -> dict:
    """Keyword arguments letting ``counterfactual`` take unchanged positions' logits from the step's base
    run, when the step computed them (another objective needed them)."""
    if out is None or out.logits is None:
        return {}
    return {"changed": changed_positions(plan, seq, lowest, blocks, info.is_encoder), "base_logits": out.logits}


def _hidden(step: Step, which: str, layer: int) -> torch.Tensor:
    out = step.teacher if which == "teacher" else step.student
    if out is None or layer not in out.hidden:
        raise RuntimeError(f"iit: the step did not capture the {which}'s block {layer}, which iit declared in "
                           "needs(); the training step must provide every layer objectives ask for")
    return out.hidden[layer]


class _InterchangeObjective(Objective):
    """Validates the alignment against the models and shares the per-step counterfactual runs."""

    min_batch_size = 2  # each example's source is another example of its batch

    def __init__(self, settings: InterventionSettings, info: ModelInfo):
        super().__init__(settings, info)
        if info.teacher_layers is None:
            raise ConfigError(f"objectives.{self.name} needs a teacher model")
        self.pairs = resolve_alignment(settings.alignment, info.teacher_layers, info.student_layers,
                                       field=f"objectives.{self.name}.alignment")
        self._key = settings.model_dump_json(include=set(INTERVENTION_FIELDS))

    def needs(self) -> Needs:
        # Every aligned layer: source values at all intervened layers and base prefixes come from here.
        return Needs(teacher_layers=frozenset(t for p in self.pairs for t in p.teacher),
                     student_layers=frozenset(p.student for p in self.pairs))

    def counterfactuals(self, step: Step) -> Counterfactuals:
        cache = step.extras.setdefault(_CACHE, {})
        hit = cache.get(self._key)
        if hit is not None and hit.input_ids is step.batch["input_ids"] and hit.seed == step_seed(step):
            return hit
        cache[self._key] = run_counterfactuals(step, self.pairs, self.settings)
        return cache[self._key]



@register
class IITLoss(_InterchangeObjective):
    name = "iit"
    Settings = IITSettings

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        cf = self.counterfactuals(step)
        terms = [self.mean(step, soft_kl(r.teacher_logits, r.student_logits, self.settings.temperature))
                 for r in cf.results]
        return {self.name: torch.stack(terms).mean(),
                f"{self.name}/span_tokens": cf.plan.span_length.float().mean() * step.share}


@register
class IITCosineLoss(_InterchangeObjective):
    name = "iit_cosine"
    Settings = IITCosineSettings

    @classmethod
    def reconcile(cls, objectives) -> None:
        # Both IIT terms read one counterfactual computation, so they must intervene identically.
        if objectives.iit_cosine is not None:
            objectives.iit_cosine = share_intervention_settings(objectives.iit, objectives.iit_cosine)

    def __init__(self, settings: IITCosineSettings, info: ModelInfo):
        super().__init__(settings, info)
        # Learned like cosine's: maps the student's residual width to the teacher's when they differ.
        self.proj = width_projection(info)

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        cf = self.counterfactuals(step)
        terms = []
        for r in cf.results:
            hs = r.student_last if self.proj is None else self.proj(r.student_last)
            cos = F.cosine_similarity(hs.float(), r.teacher_last.float(), dim=-1, eps=1e-8)
            terms.append(self.mean(step, 1.0 - cos))
        return {self.name: torch.stack(terms).mean()}
