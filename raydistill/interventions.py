"""Interchange interventions on Hugging Face models, without copying model code.

Reading and overwriting the residual stream happens in forward hooks on the transformer blocks (found by
``raydistill.models.adapters.find_blocks``: BERT-family encoders, GPT-2, Llama/Qwen2/Mistral, or any model
whose block ``ModuleList`` is named by ``block_path``). A layer index always means *the output of block
l* (0-based; the embeddings are not a layer), and the hook that reads layer l and the hook that writes it
see the same tensor: a value read from the source at layer l and written into the base at layer l
replaces exactly what block l produced.

Hooks and block swaps only touch activations and module slots, never parameters, so they work when
ZeRO-3 partitions the parameters (its own hooks gather them when a block is called); they are undone on
exit, also when the forward raises. With activation checkpointing, hooks must run outside the checkpointed
code, or backward would recompute a block without its (removed) writing hook: ``student.gradient_checkpointing``
(``raydistill.models.loading.prepare_student``) uses transformers' checkpointing of each block's ``forward``,
which leaves module hooks outside, and refuses versions that checkpoint whole block calls. Stand-ins are plain
modules, never checkpointed.

Besides hooks, two cost savers swap blocks for parameter-free stand-ins for one run (always restored):
``resume_from`` (a counterfactual run equals the base run below the lowest intervened layer, so it can
start from the base run's block output there) and ``stop_after`` (a source run only needs the blocks up to
the highest intervened layer). A third one is ``counterfactual``'s ``changed``: the output head runs only at
the positions the intervention can change (``changed_positions``), the others keep the base run's logits.

Planning (``sample_plan``): sources are a derangement of the batch; one contiguous span per example over
its eligible tokens (non-padding; special tokens optional) of max(1, floor(p * min(real length of base,
real length of source))) tokens (capped by ``max_tokens`` and by the eligible tokens there are), at
independent offsets in base and source, or at the same positions (``aligned``).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from raydistill.errors import ConfigError
from raydistill.models.adapters import block_hidden, capture_input, find_blocks, output_head, replace_block_hidden

# Block class -> "tensor" | "tuple": whether its forward returns the hidden state itself or a tuple that
# starts with it (transformers < 5 returns tuples). Learned from real calls in our hooks; a stand-in can
# only take a block's place once its class's convention is known, because the model's loop reads the
# output as ``out`` or ``out[0]`` and a wrong guess would silently take the first batch row.
_OUTPUT_KIND: dict[type, str] = {}


def _learn_kind(module: nn.Module, output) -> None:
    _OUTPUT_KIND[type(module)] = "tensor" if isinstance(output, torch.Tensor) else "tuple"


def blocks_of(model: nn.Module, block_path: str | None = None) -> nn.ModuleList:
    return find_blocks(model, block_path)[1]


def _check_layers(blocks: nn.ModuleList, layers: Iterable[int], what: str) -> None:
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise IndexError(f"{what}: layer {layer} out of range for a model with {len(blocks)} blocks")


# ------------------------------------------------------------------------------------------ positions
def _moved(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device``; a copy from the host is queued (non-blocking), as a blocking one would first wait
    for the device to finish its queued work. Copies to the host stay blocking: their data is read next."""
    return tensor.to(device, non_blocking=tensor.device.type == "cpu")


@dataclass(frozen=True)
class Positions:
    """A flat list of token positions ``(rows[i], cols[i])`` in a [batch, seq] grid."""

    rows: torch.Tensor
    cols: torch.Tensor

    def to(self, device) -> "Positions":
        return Positions(_moved(self.rows, device), _moved(self.cols, device))

    def __len__(self) -> int:
        return int(self.rows.numel())


def read(hidden: torch.Tensor, where: Positions) -> torch.Tensor:
    """hidden[rows, cols] -> [N, H]."""
    return hidden[where.rows, where.cols]


def write(hidden: torch.Tensor, where: Positions, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``hidden`` with ``values`` [N, H] at ``where``; differentiable in both arguments."""
    return hidden.index_put((where.rows, where.cols), values.to(hidden.dtype))


# ------------------------------------------------------------------------------------------ hooks
@contextmanager
def intervene(model: nn.Module, writes: Mapping[int, tuple[Positions, torch.Tensor]] | None = None,
              capture: Iterable[int] = (), block_path: str | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Overwrite and/or record block outputs during the forward passes run inside the context.

    ``writes``: layer -> (positions, values [N, H]): block ``layer``'s output gets ``values`` at
    ``positions``. ``capture``: layers whose output (after any write at that layer) is recorded into the
    yielded dict. One hook per layer does both, so a capture sees what actually flows to the next block."""
    writes = dict(writes or {})
    capture = set(capture)
    blocks = blocks_of(model, block_path)
    _check_layers(blocks, set(writes) | capture, "intervene")
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        spec = writes.get(layer)

        def hook(module, args, output):
            _learn_kind(module, output)
            if spec is not None:
                output = replace_block_hidden(output, write(block_hidden(output), *spec))
            if layer in capture:
                captured[layer] = block_hidden(output)
            return output if spec is not None else None

        return hook

    handles = []
    try:
        for layer in sorted(set(writes) | capture):
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------ block swaps
class _StandIn(nn.Module):
    """Takes a block's slot for one run without computing it: returns ``hidden`` (or, when that is None,
    the block's input hidden state) in the replaced block's output convention."""

    def __init__(self, block_type: type, hidden: torch.Tensor | None):
        super().__init__()
        self.block_type = block_type
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        h = self.hidden if self.hidden is not None else (args[0] if args else kwargs["hidden_states"])
        kind = _OUTPUT_KIND.get(self.block_type)
        if kind is None:  # pragma: no cover - guarded by can_swap / stop_after's capture hook
            raise RuntimeError(f"output convention of {self.block_type.__name__} unknown")
        return h if kind == "tensor" else (h,)


def can_swap(model: nn.Module, layers: Iterable[int], block_path: str | None = None) -> bool:
    """Whether the output convention of these blocks is known, so stand-ins may replace them."""
    blocks = blocks_of(model, block_path)
    return all(type(blocks[i]) in _OUTPUT_KIND for i in layers)


@contextmanager
def _swapped(blocks: nn.ModuleList, replacements: dict[int, nn.Module]) -> Iterator[None]:
    originals = {i: blocks[i] for i in replacements}
    try:
        for i, module in replacements.items():
            blocks[i] = module
        yield
    finally:
        for i, module in originals.items():
            blocks[i] = module


@contextmanager
def resume_from(model: nn.Module, layer: int, hidden: torch.Tensor, block_path: str | None = None) -> Iterator[None]:
    """Run only the blocks above ``layer``: blocks 0..layer are skipped and block ``layer``'s output is
    ``hidden``. The embeddings and the masks are still computed by the model (cheap), so nothing of its
    forward is copied. Requires ``can_swap(model, range(layer + 1))``."""
    blocks = blocks_of(model, block_path)
    _check_layers(blocks, [layer], "resume_from")
    if not can_swap(model, range(layer + 1), block_path):
        raise RuntimeError("resume_from: the blocks' output convention is not known yet; run the model once "
                           "inside intervene() first")
    with _swapped(blocks, {i: _StandIn(type(blocks[i]), hidden) for i in range(layer + 1)}):
        yield


@contextmanager
def stop_after(model: nn.Module, layer: int, block_path: str | None = None) -> Iterator[None]:
    """Skip the blocks above ``layer`` (they pass their input through): for runs that only need block
    outputs up to ``layer``. Capture ``layer`` inside ``intervene`` in the same run: that hook fires
    before any stand-in and teaches it the output convention."""
    blocks = blocks_of(model, block_path)
    _check_layers(blocks, [layer], "stop_after")
    with _swapped(blocks, {i: _StandIn(type(blocks[i]), None) for i in range(layer + 1, len(blocks))}):
        yield


# ------------------------------------------------------------------------------------------ runs
def model_inputs(batch: Mapping[str, torch.Tensor], is_encoder: bool) -> dict:
    """The keyword arguments of a plain forward pass over ``batch`` (no labels: losses are ours)."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    if not is_encoder:
        kwargs["use_cache"] = False  # no KV cache: nothing is generated
    return kwargs


def source_states(model: nn.Module, inputs: Mapping, layers: Iterable[int],
                  block_path: str | None = None) -> dict[int, torch.Tensor]:
    """Block outputs at ``layers`` of a run over ``inputs``, computing no block above the highest one and
    no LM head (the model's ``base_model`` runs)."""
    layers = sorted(set(layers))
    body = getattr(model, "base_model", model)
    with intervene(model, capture=layers, block_path=block_path) as captured, \
            stop_after(model, layers[-1], block_path):
        body(**inputs)
    return captured


def counterfactual(model: nn.Module, inputs: Mapping, where: Positions, values: Mapping[int, torch.Tensor], *,
                   base_hidden: torch.Tensor | None = None, capture: Iterable[int] = (),
                   block_path: str | None = None, changed: torch.Tensor | None = None,
                   base_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Logits of the base run over ``inputs`` with block outputs overwritten at ``where`` by ``values``
    (layer -> [N, H]), and the block outputs at ``capture``.

    ``base_hidden``: the base run's output of the lowest intervened block, when the caller has it; the
    run then starts there instead of recomputing the blocks below (same result without dropout).
    ``changed`` (B x T bool, see ``changed_positions``) with ``base_logits``: the positions whose logits
    can differ from the base run's; the output head runs on those only and the others are taken from
    ``base_logits`` (same result without dropout; with dropout, the same in distribution)."""
    lowest = min(values)
    capture = set(capture)
    writes = {layer: (where, v) for layer, v in values.items()}
    # Resuming skips blocks 0..lowest, so it cannot serve captures below the lowest intervened block.
    resume = base_hidden is not None and min(capture, default=lowest) >= lowest
    select = head = None
    # ``changed`` is best built on the host (from the plan before it moved): these reads then wait for nothing.
    if changed is not None and base_logits is not None and not bool(changed.all()):
        try:
            head = output_head(model)
            select = tuple(_moved(i, base_logits.device) for i in changed.nonzero(as_tuple=True))
        except ConfigError:  # no linear output head to hook: run the head everywhere
            pass
    with ExitStack() as stack:
        if resume and can_swap(model, range(lowest + 1), block_path):
            stack.enter_context(resume_from(model, lowest, write(base_hidden, where, values[lowest]), block_path))
            writes.pop(lowest)
        captured = stack.enter_context(intervene(model, writes, capture, block_path))
        if select is not None:
            stack.enter_context(capture_input(head, select=select))
        logits = model(**inputs).logits
    if select is not None:
        logits = base_logits.index_put(select, logits[0].to(base_logits.dtype))
    return logits, captured


def changed_positions(plan: "InterchangePlan", seq_len: int, layer: int, num_blocks: int,
                      is_encoder: bool) -> torch.Tensor | None:
    """B x T bool: the positions whose logits an intervention at block ``layer`` and above (at the plan's
    base positions) can change, or None when that is every position. After the last block only the
    intervened positions themselves change (the head works position by position); in a decoder, positions
    before an example's span never see it."""
    batch = plan.span_start.numel()
    if layer == num_blocks - 1:
        mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=plan.span_start.device)
        mask[plan.base.rows, plan.base.cols] = True
        return mask
    if not is_encoder:
        return torch.arange(seq_len, device=plan.span_start.device)[None, :] >= plan.span_start[:, None]
    return None


# ------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class InterchangePlan:
    """Which source each base example takes values from, and where.

    ``source.rows`` index the batch of sources in batch order (the batch itself when sources are a
    permutation of it): ``source.rows[i] = source_index[base.rows[i]]``. Base and source positions are
    matched element-wise; each example's span is listed in increasing position order."""

    source_index: torch.Tensor  # [B]
    base: Positions
    source: Positions
    span_start: torch.Tensor    # [B] first intervened base position (seq length when the span is empty)
    span_length: torch.Tensor   # [B]

    def to(self, device) -> "InterchangePlan":
        return InterchangePlan(_moved(self.source_index, device), self.base.to(device), self.source.to(device),
                               _moved(self.span_start, device), _moved(self.span_length, device))


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of range(n) without fixed points (rejection: ~e draws)."""
    if n < 2:
        raise ValueError(f"interchange interventions pair each example with another one in its batch; a batch "
                         f"of {n} has no such pairing (use a batch size of at least 2)")
    ident = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if bool((perm != ident).all()):
            return perm


def partners(n: int) -> torch.Tensor:
    """Sources for keyed plans (``sample_plan(keys=...)``): neighbours swap (0 <-> 1, 2 <-> 3, ...) and an odd
    batch's last three rotate. Batches are random draws from the shuffled corpus, so neighbours are random
    pairs, and a pair never straddles two micro-batches of even size: an optimiser step pairs the same
    examples however it is split."""
    if n < 2:
        return derangement(n, torch.Generator())  # its error message
    perm = torch.arange(n) ^ 1
    if n % 2:
        perm[-3:] = torch.tensor([n - 2, n - 1, n - 3])
    return perm


def eligible_positions(attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor | None,
                       include_special_tokens: bool) -> torch.Tensor:
    """[B, T] bool: real (non-padding) tokens, without special tokens unless asked for."""
    eligible = attention_mask.bool()
    if special_tokens_mask is not None and not include_special_tokens:
        eligible = eligible & ~special_tokens_mask.bool()
    return eligible


def _span(eligible: torch.Tensor, offset: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the eligible tokens whose rank among the row's eligible tokens is in [offset, offset+length)."""
    rank = eligible.long().cumsum(1) - 1
    return eligible & (rank >= offset[:, None]) & (rank < (offset + length)[:, None])


def _uniform_int(high_inclusive: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Integers uniform in [0, high] from uniforms ``u`` in [0, 1)."""
    return torch.minimum((u * (high_inclusive + 1)).long(), high_inclusive)


def sample_plan(attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor | None, generator: torch.Generator,
                *, proportion: float = 0.3, include_special_tokens: bool = False, aligned: bool = False,
                max_tokens: int | None = None, keys: torch.Tensor | None = None) -> InterchangePlan:
    """Pair the batch with a derangement of itself and choose one span per example (see module doc).

    All draws come from ``generator`` on the CPU, so a plan depends only on the seed and the masks. With
    ``keys`` (one integer per example, e.g. its position in the run's sample stream) the plan is the same
    for an example whichever batch it is in: sources are ``partners`` and each example's offsets come from
    its own generator, seeded by one draw of ``generator`` mixed with its key. The plan is made on the host and
    returned on the masks' device: given host masks (and keys), it reads nothing from an accelerator."""
    device = attention_mask.device
    eligible = eligible_positions(attention_mask, special_tokens_mask, include_special_tokens).cpu()
    batch = eligible.shape[0]
    if keys is None:
        perm = derangement(batch, generator)
        u = torch.rand((2, batch), generator=generator, dtype=torch.float64)
    else:
        perm = partners(batch)
        base = int(torch.randint(2**62, (1,), generator=generator))
        u = torch.stack([torch.rand(2, generator=plan_generator(base, int(k)), dtype=torch.float64)
                         for k in keys.tolist()], 1)
    src_eligible = eligible[perm]
    real = attention_mask.bool().sum(1).cpu()
    shorter = torch.minimum(real, real[perm])
    # floor(p * n) with a tolerance, so 0.3 * 10 is 3 despite binary rounding; at least one token.
    length = torch.floor(proportion * shorter.double() + 1e-9).long().clamp_min(1)
    if max_tokens is not None:
        length = length.clamp_max(max_tokens)
    if aligned:
        # Same absolute positions in base and source: choose among positions eligible in both.
        eligible = src_eligible = eligible & src_eligible
    n_base, n_src = eligible.sum(1), src_eligible.sum(1)
    length = torch.minimum(length, torch.minimum(n_base, n_src))
    base_offset = _uniform_int(n_base - length, u[0])
    src_offset = base_offset if aligned else _uniform_int(n_src - length, u[1])
    base_sel = _span(eligible, base_offset, length)
    src_sel = _span(src_eligible, src_offset, length)
    b_rows, b_cols = base_sel.nonzero(as_tuple=True)
    s_rows, s_cols = src_sel.nonzero(as_tuple=True)  # rows in base order: row b holds source perm[b]
    seq = eligible.shape[1]
    start = torch.where(base_sel.any(1), base_sel.long().argmax(1), torch.full((batch,), seq))
    plan = InterchangePlan(perm, Positions(b_rows, b_cols), Positions(perm[s_rows], s_cols), start, length)
    return plan.to(device)


def plan_generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator for one step's plan: the step's seed mixed with a per-purpose salt, so two users of
    the same step seed draw independent streams."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + salt) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)
