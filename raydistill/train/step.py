"""One distillation step: the forward passes the active objectives ask for, then their weighted sum.

Nothing here knows which objectives are active: each declares ``needs()`` and the step provides it.

Normalisation. An optimiser step runs several micro-batches on several workers, and every token-averaged
term must be one mean over all of them, not a mean of per-micro-batch means (which weights a token by the
inverse of its micro-batch's count). ``DistillModule.counts`` gives, for a micro-batch, how many positions
each objective averages over (``Objective.positions``); the training loop sums them over the step's micro-
batches and workers before running it and passes the totals to ``forward`` (``counts``), with the micro-
batch's ``share`` of the step. Each term and log value is then this micro-batch's share of the step's
value: their sum over micro-batches and workers is the step's mean. The loop scales the loss it hands to
DeepSpeed by micro-batches x workers, which DeepSpeed's own averaging (over gradient accumulation and data-
parallel ranks) divides out again, so the gradient is that of the step's mean."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from raydistill.models.adapters import capture_block_outputs, capture_input, output_head
from raydistill.objectives.base import ForwardResult, HeadInput, ModelInfo, Needs, Objective, Step
from raydistill.objectives.teacher_signals import from_batch, tail_from_batch, teacher_tail, teacher_topk

# What the models read from a batch; other keys (labels, the teacher cache's ``teacher_topk_*``, ``teacher_tail_*``)
# are not theirs.
MODEL_INPUTS = ("input_ids", "attention_mask")


def run_model(model: nn.Module, batch: dict[str, torch.Tensor], layers, block_path: str | None,
              logits: bool = True, head: bool = False) -> ForwardResult:
    """One forward with the requested block outputs; the B x T x V logits only when ``logits``, the output
    head's input when ``head``."""
    head_module = output_head(model) if head or not logits else None
    with capture_block_outputs(model, layers, block_path) as hidden, ExitStack() as stack:
        # Without ``logits`` the head is handed zero positions: the B x T x V projection never runs.
        captured = stack.enter_context(capture_input(head_module, keep=logits)) if head_module is not None else {}
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        if getattr(getattr(model, "config", None), "use_cache", False):
            # No KV cache: nothing is generated, and with a cache compiled blocks recompile per layer index.
            inputs["use_cache"] = False
        out = model(**inputs)
    return ForwardResult(logits=out.logits if logits else None, hidden=dict(hidden),
                         head=HeadInput(captured["hidden"], head_module) if head else None)


class DistillModule(nn.Module):
    """What DeepSpeed trains: the student and the objectives' own parameters (projections).

    The teacher is passed to ``forward`` rather than registered, so it never reaches the optimizer and
    can be sharded independently.

    ``streams`` (name -> objectives) are extra data streams: ``forward(..., streams={name: batch})`` runs
    each stream's batch through the same student/teacher passes with that stream's objectives and adds
    its weighted loss to the main one (one backward for all); its terms are logged as ``name/term``."""

    def __init__(self, student: nn.Module, objectives: dict[str, Objective], info: ModelInfo,
                 block_paths: tuple[str | None, str | None] = (None, None),
                 streams: dict[str, dict[str, Objective]] | None = None):
        super().__init__()
        self.student = student
        self.objectives = nn.ModuleDict(objectives)
        self.streams = nn.ModuleDict({name: nn.ModuleDict(objs) for name, objs in (streams or {}).items()})
        self.info = info
        self.student_block_path, self.teacher_block_path = block_paths
        self.needs = combined_needs(self.objectives)
        self.stream_needs = {name: combined_needs(objs) for name, objs in self.streams.items()}

    def counts(self, batch: dict[str, torch.Tensor],
               streams: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """Per objective (``name``, or ``stream/name`` for a stream's), the positions it averages over in
        this micro-batch, as float32 scalars on the batch's device (see the module doc)."""
        out = {name: obj.positions(batch).sum().float() for name, obj in self.objectives.items()}
        for stream, stream_batch in (streams or {}).items():
            out.update({f"{stream}/{name}": obj.positions(stream_batch).sum().float()
                        for name, obj in self.streams[stream].items()})
        return out

    def forward(self, batch: dict[str, torch.Tensor], teacher: nn.Module | None = None,
                extras: dict | None = None, streams: dict[str, dict[str, torch.Tensor]] | None = None,
                counts: dict[str, torch.Tensor] | None = None, share: float = 1.0,
                host: dict[str, torch.Tensor] | None = None,
                host_streams: dict[str, dict[str, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss and the logged values of one micro-batch. ``counts`` (from ``counts`` summed over
        the optimiser step) and ``share`` normalise over the step; without them the micro-batch is the step.
        ``host`` and ``host_streams``: the same batches as built on the host (``Step.host_batch``), from which
        the step decides what depends on the data without reading the device."""
        total, logs = self._run(batch, host, self.objectives, self.needs, teacher, extras, counts, share)
        for name, stream_batch in (streams or {}).items():
            mine = None if counts is None else {k[len(name) + 1:]: v for k, v in counts.items()
                                                if k.startswith(f"{name}/")}
            loss, terms = self._run(stream_batch, (host_streams or {}).get(name), self.streams[name],
                                    self.stream_needs[name], teacher, extras, mine, share)
            total = total + loss
            logs.update({f"{name}/{k}": v for k, v in terms.items()})
        logs["loss"] = total.detach()
        return total, logs

    def _run(self, batch: dict[str, torch.Tensor], host: dict[str, torch.Tensor] | None, objectives: nn.ModuleDict,
             needs: Needs, teacher: nn.Module | None, extras: dict | None, counts: dict[str, torch.Tensor] | None,
             share: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student_out = run_model(self.student, batch, needs.student_layers, self.student_block_path,
                                needs.student_logits, needs.student_head)
        # The teacher's top-K signals from the cache when the batch carries them (then the teacher runs only for
        # needs the cache does not cover), else online from its logits, by the same ``teacher_topk``.
        # The tail samples likewise, seeded by the step's seed so that the cache's fill draws the same.
        topk = from_batch(batch, needs.teacher_topk) if needs.teacher_topk else None
        tail_k, tail_s, tail_tau = needs.teacher_tail
        tail = tail_from_batch(batch, tail_s) if tail_s else None
        cached = topk is not None and (tail_s == 0 or tail is not None)
        teacher_out = None
        if needs.teacher_runs(cached_topk=cached):
            if teacher is None:
                raise RuntimeError("an active objective needs the teacher, but none was given")
            online_topk = needs.teacher_topk > 0 and not cached
            # no_grad, not inference_mode: inference tensors would need copies (B x T x V for the logits)
            # before objectives could save them for backward, and ZeRO-3 writes to parameters in forward.
            with torch.no_grad():
                teacher_out = run_model(teacher, batch, needs.teacher_layers, self.teacher_block_path,
                                        needs.teacher_logits or online_topk)
            if online_topk:
                topk = teacher_topk(teacher_out.logits, needs.teacher_topk)
                if tail_s:
                    tail = teacher_tail(teacher_out.logits, topk.first(tail_k).ids, tail_s, batch["input_ids"],
                                        (extras or {}).get("step_seed", 0), tail_tau)
                if not needs.teacher_logits:
                    teacher_out.logits = None  # nothing reads them: free the B x T x V tensor now
        step = Step(batch=batch, student=student_out, teacher=teacher_out, student_model=self.student,
                    teacher_model=teacher, info=self.info,
                    extras={"student_block_path": self.student_block_path,
                            "teacher_block_path": self.teacher_block_path, **(extras or {})},
                    counts=counts, share=share, teacher_topk=topk, teacher_tail=tail, host_batch=host)
        logs: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=batch["input_ids"].device)
        for name, objective in objectives.items():
            terms = objective(step)
            total = total + objective.settings.weight * terms[name]
            logs.update({k: v.detach().float() for k, v in terms.items()})
        logs["loss"] = total.detach()
        return total, logs


def combined_needs(objectives) -> Needs:
    """What a set of objectives (name -> Objective) needs together."""
    needs = Needs()
    for obj in objectives.values():
        needs = needs | obj.needs()
    return needs
