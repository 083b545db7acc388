"""Hooks, block swaps and intervention plans (raydistill.interventions) on real HF blocks."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from raydistill.errors import ConfigError
from raydistill.interventions import (Positions, can_swap, changed_positions, counterfactual, derangement, intervene,
                                      model_inputs, plan_generator, read, resume_from, sample_plan, source_states,
                                      stop_after)
from raydistill.models.adapters import find_blocks, output_head
from raydistill.models.presets import preset_config

ARCHS = ["tiny-bert", "tiny-gpt2", "tiny-llama"]
VOCAB = 100


def tiny(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch in ("tiny-qwen2", "tiny-mistral"):  # same block layout as Llama (model.layers)
        from transformers import MistralConfig, Qwen2Config
        cls = Qwen2Config if arch == "tiny-qwen2" else MistralConfig
        cfg = cls(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return AutoModelForCausalLM.from_config(cfg).eval()
    cfg = preset_config(arch, VOCAB, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    cls = AutoModelForMaskedLM if arch == "tiny-bert" else AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def inputs_for(arch: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    mask = torch.ones_like(ids) if mask is None else mask
    return model_inputs({"input_ids": ids, "attention_mask": mask}, arch == "tiny-bert")


def hook_state(model: nn.Module):
    """Every hook dict and every block slot, to compare before/after."""
    hooks = {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}
    return hooks, list(find_blocks(model)[1])


def span(rows: list[int], cols: list[int]) -> Positions:
    return Positions(torch.tensor(rows), torch.tensor(cols))


@pytest.mark.parametrize("arch", ARCHS)
def test_source_equal_base_at_same_positions_leaves_logits_unchanged(arch):
    model = tiny(arch)
    ids = torch.randint(3, VOCAB, (3, 12))
    inputs = inputs_for(arch, ids)
    with intervene(model, capture=[1, 2]) as cap:
        base = model(**inputs).logits
    where = span([0, 0, 1, 2, 2, 2], [2, 3, 7, 0, 1, 11])
    values = {1: read(cap[1], where), 2: read(cap[2], where)}
    full, _ = counterfactual(model, inputs, where, values)
    resumed, _ = counterfactual(model, inputs, where, values, base_hidden=cap[1])
    assert (full - base).abs().max() <= 1e-6
    assert (resumed - base).abs().max() <= 1e-6


@pytest.mark.parametrize("arch", ARCHS + ["tiny-qwen2", "tiny-mistral"])
def test_swapping_every_position_at_last_block_gives_source_logits(arch):
    model = tiny(arch)
    base_ids, src_ids = torch.randint(3, VOCAB, (2, 2, 10))
    last = len(find_blocks(model)[1]) - 1
    with intervene(model, capture=[last]) as cap:
        src_logits = model(**inputs_for(arch, src_ids)).logits
    base_logits = model(**inputs_for(arch, base_ids)).logits
    rows, cols = torch.meshgrid(torch.arange(2), torch.arange(10), indexing="ij")
    where = Positions(rows.flatten(), cols.flatten())
    cf, _ = counterfactual(model, inputs_for(arch, base_ids), where, {last: read(cap[last], where)})
    assert (cf - src_logits).abs().max() <= 1e-5
    assert (cf - base_logits).abs().max() > 1e-2  # the swap did something


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_reads_and_writes_the_same_block_output(arch):
    model = tiny(arch)
    ids = torch.randint(3, VOCAB, (2, 9))
    inputs = inputs_for(arch, ids)
    depth = len(find_blocks(model)[1])
    with intervene(model, capture=range(depth)) as cap:
        out = model(**inputs, output_hidden_states=True)
    # HF's hidden_states[0] is the embeddings, so block l's output is hidden_states[l + 1] (the decoders'
    # last entry is after the final norm, hence depth - 1).
    for layer in range(depth - 1):
        assert torch.allclose(cap[layer], out.hidden_states[layer + 1], atol=1e-6)
    layer, where = 2, span([0, 0, 0, 1, 1], [3, 4, 5, 1, 2])
    ours, _ = counterfactual(model, inputs, where, {layer: read(cap[layer], where)})
    assert (ours - out.logits).abs().max() <= 1e-6
    # The reference reads hidden_states[l] (block l-1's output) and writes it at block l: with source ==
    # base that is not a no-op, so this test fails on that off-by-one.
    off_by_one, _ = counterfactual(model, inputs, where, {layer: read(out.hidden_states[layer], where)})
    assert (off_by_one - out.logits).abs().max() > 1e-3


def test_capture_sees_the_written_value():
    model = tiny("tiny-bert")
    ids = torch.randint(3, VOCAB, (2, 6))
    where = span([0, 1], [1, 4])
    values = torch.randn(2, 64)
    with intervene(model, writes={1: (where, values)}, capture=[1]) as cap:
        model(**inputs_for("tiny-bert", ids))
    assert torch.equal(read(cap[1], where), values)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
def test_decoder_positions_before_the_span_are_unaffected(arch):
    model = tiny(arch)
    ids = torch.randint(3, VOCAB, (2, 10))
    inputs = inputs_for(arch, ids)
    with intervene(model, capture=[1]) as cap:
        base = model(**inputs).logits
    where = span([0, 0, 1, 1], [5, 6, 5, 6])
    cf, _ = counterfactual(model, inputs, where, {1: torch.randn(4, 64)})
    assert (cf[:, :5] - base[:, :5]).abs().max() <= 1e-6
    assert (cf[:, 5:] - base[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS + ["tiny-qwen2"])
def test_resumed_counterfactual_equals_full_run_and_skips_lower_blocks(arch):
    model = tiny(arch)
    ids = torch.randint(3, VOCAB, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    inputs = inputs_for(arch, ids, mask)
    with intervene(model, capture=[0, 1, 2]) as cap:
        model(**inputs)
    where = span([0, 1, 2], [2, 3, 4])
    values = {1: torch.randn(3, 64), 2: torch.randn(3, 64)}
    full, full_cap = counterfactual(model, inputs, where, values, capture=[3])
    blocks = find_blocks(model)[1]
    calls = []
    handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(4)]
    try:
        resumed, res_cap = counterfactual(model, inputs, where, values, base_hidden=cap[1], capture=[3])
    finally:
        for h in handles:
            h.remove()
    assert calls == [2, 3]  # blocks 0 and 1 were not computed
    assert (resumed - full).abs().max() <= 1e-5
    assert torch.allclose(res_cap[3], full_cap[3], atol=1e-5)
    # A capture below the lowest intervened block needs those blocks: the run is not resumed then.
    low, low_cap = counterfactual(model, inputs, where, values, base_hidden=cap[1], capture=[0, 1])
    assert (low - full).abs().max() <= 1e-5 and torch.allclose(low_cap[0], cap[0], atol=1e-6)


@pytest.mark.parametrize("arch,layer,expect", [("tiny-gpt2", 1, "from-span"), ("tiny-llama", 1, "from-span"),
                                                ("tiny-bert", 3, "span"), ("tiny-gpt2", 3, "span"),
                                                ("tiny-bert", 1, None)])
def test_head_runs_only_where_the_intervention_can_change_logits(arch, layer, expect):
    model = tiny(arch)
    ids = torch.randint(3, VOCAB, (3, 8))
    inputs = inputs_for(arch, ids)
    with intervene(model, capture=[layer]) as cap:
        base = model(**inputs).logits
    plan = sample_plan(inputs["attention_mask"], None, torch.Generator().manual_seed(4), proportion=0.3)
    changed = changed_positions(plan, 8, layer, 4, arch == "tiny-bert")
    if expect is None:
        assert changed is None
        return
    in_span = torch.zeros(3, 8, dtype=torch.bool)
    in_span[plan.base.rows, plan.base.cols] = True
    after = torch.arange(8)[None] >= plan.span_start[:, None]
    assert torch.equal(changed, in_span if expect == "span" else after) and not bool(changed.all())
    values = {layer: torch.randn(len(plan.base), 64)}
    full, _ = counterfactual(model, inputs, plan.base, values, base_hidden=cap[layer])
    head_rows = []
    handle = output_head(model).register_forward_hook(lambda m, a, out: head_rows.append(out.shape[:-1]))
    try:
        reused, _ = counterfactual(model, inputs, plan.base, values, base_hidden=cap[layer], changed=changed,
                                   base_logits=base)
    finally:
        handle.remove()
    assert head_rows == [torch.Size([1, int(changed.sum())])]
    assert (reused - full).abs().max() <= 1e-5
    assert torch.equal(reused[~changed], base[~changed])


@pytest.mark.parametrize("arch", ARCHS)
def test_source_states_stop_after_the_highest_layer(arch):
    model = tiny(arch)
    ids = torch.randint(3, VOCAB, (2, 7))
    inputs = inputs_for(arch, ids)
    with intervene(model, capture=[0, 1]) as full:
        model(**inputs)
    blocks = find_blocks(model)[1]
    calls = []
    handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(4)]
    try:
        states = source_states(model, inputs, [1, 0])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]
    assert all(torch.equal(states[k], full[k]) for k in (0, 1))


def test_hooks_and_blocks_are_restored_after_normal_exit_and_exceptions():
    model = tiny("tiny-gpt2")
    before = hook_state(model)
    ids = torch.randint(3, VOCAB, (2, 6))
    inputs = inputs_for("tiny-gpt2", ids)
    with intervene(model, capture=[0, 3]) as cap:
        model(**inputs)
    assert hook_state(model) == before
    where = span([0, 1], [1, 2])
    # An exception inside the forward, while hooks are registered and blocks swapped.
    with pytest.raises(RuntimeError):
        counterfactual(model, inputs, where, {1: torch.randn(2, 64), 2: torch.randn(2, 64)},
                       base_hidden=torch.randn(2, 6, 7))  # wrong width: block 2 fails
    assert hook_state(model) == before
    with pytest.raises(ZeroDivisionError):
        with intervene(model, writes={0: (where, torch.randn(2, 64))}, capture=[1]), stop_after(model, 1):
            model(**inputs)
            raise ZeroDivisionError
    assert hook_state(model) == before
    with pytest.raises(IndexError, match="out of range"):
        with intervene(model, capture=[4]):
            pass
    assert hook_state(model) == before


def _toy_classes():
    """A model outside the known layouts, whose blocks return tuples (the transformers < 5 convention);
    classes are fresh per call so their output convention starts unknown."""

    class TupleBlock(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin, self.mix = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, hidden, mask):
            ctx = (hidden * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
            return (hidden + torch.tanh(self.lin(hidden) + self.mix(ctx)), None)

    class ToyLM(nn.Module):
        def __init__(self, vocab=VOCAB, d=16, n=4):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.stack = nn.ModuleList([TupleBlock(d) for _ in range(n)])
            self.head = nn.Linear(d, vocab)

        def forward(self, input_ids, attention_mask):
            h, m = self.embed(input_ids), attention_mask.float()
            for block in self.stack:
                h = block(h, m)[0]
            return SimpleNamespace(logits=self.head(h))

    return ToyLM


def test_named_block_path_and_tuple_outputs():
    torch.manual_seed(0)
    model = _toy_classes()()
    ids = torch.randint(3, VOCAB, (2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(ConfigError, match="block_path"):
        with intervene(model, capture=[0]):
            pass
    where = span([0, 1], [2, 3])
    values = {1: torch.randn(2, 16), 2: torch.randn(2, 16)}
    assert not can_swap(model, range(2), "stack")
    with pytest.raises(RuntimeError, match="not known"):
        with resume_from(model, 1, torch.zeros(2, 6, 16), "stack"):
            pass
    with intervene(model, capture=[1], block_path="stack") as cap:
        base = model(**inputs).logits
    assert can_swap(model, range(4), "stack")  # learned from the capture
    full, _ = counterfactual(model, inputs, where, values, block_path="stack")
    resumed, _ = counterfactual(model, inputs, where, values, base_hidden=cap[1], block_path="stack")
    assert (resumed - full).abs().max() <= 1e-6
    assert (full - base).abs().max() > 1e-3
    same, _ = counterfactual(model, inputs, where, {1: read(cap[1], where)}, base_hidden=cap[1], block_path="stack")
    assert (same - base).abs().max() <= 1e-6


def test_counterfactual_without_known_convention_runs_in_full():
    torch.manual_seed(0)
    model = _toy_classes()()
    ids = torch.randint(3, VOCAB, (2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    reference = copy.deepcopy(model)
    where = span([0, 1], [2, 3])
    values = {1: torch.randn(2, 16)}
    # base_hidden is wrong on purpose: a full run ignores it, so this must still be the true counterfactual.
    cf, _ = counterfactual(model, inputs, where, values, base_hidden=torch.zeros(2, 6, 16), block_path="stack")
    with intervene(reference, writes={1: (where, values[1])}, block_path="stack"):
        expected = reference(**inputs).logits
    assert torch.allclose(cf, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ planning
def test_derangement_is_a_permutation_without_fixed_points():
    for n in range(2, 9):
        for seed in range(20):
            perm = derangement(n, torch.Generator().manual_seed(seed))
            assert sorted(perm.tolist()) == list(range(n))
            assert all(perm[i] != i for i in range(n))
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, torch.Generator())


def _masks(seed: int, batch: int = 6, seq: int = 24, left_pad: bool = False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, seq + 1, (batch,), generator=g)
    cols = torch.arange(seq)[None]
    attn = (cols < lengths[:, None]) if not left_pad else (cols >= seq - lengths[:, None])
    special = torch.zeros(batch, seq, dtype=torch.bool)
    first = attn.long().argmax(1)
    last = seq - 1 - attn.flip(1).long().argmax(1)
    special[torch.arange(batch), first] = True  # [CLS]
    special[torch.arange(batch), last] = True   # [SEP]
    return attn.long(), special.long()


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("include_special", [False, True])
def test_spans_stay_on_real_tokens_with_the_configured_length(left_pad, include_special):
    for seed in range(25):
        attn, special = _masks(seed, left_pad=left_pad)
        plan = sample_plan(attn, special, plan_generator(seed, 1), proportion=0.3,
                           include_special_tokens=include_special)
        eligible = attn.bool() & (~special.bool() if not include_special else True)
        perm = plan.source_index
        assert all(perm[i] != i for i in range(len(perm)))
        real = attn.sum(1)
        for b in range(attn.shape[0]):
            n_elig = min(int(eligible[b].sum()), int(eligible[perm[b]].sum()))
            expected = min(max(1, int(0.3 * min(real[b], real[perm[b]]) + 1e-9)), n_elig)
            base_cols = plan.base.cols[plan.base.rows == b]
            src_sel = plan.base.rows == b
            src_rows, src_cols = plan.source.rows[src_sel], plan.source.cols[src_sel]
            assert len(base_cols) == expected == int(plan.span_length[b])
            assert bool(eligible[b, base_cols].all()) and bool(attn[b, base_cols].all())
            assert bool((src_rows == perm[b]).all())
            assert bool(eligible[perm[b], src_cols].all())
            # Contiguous among the row's eligible tokens.
            for cols, row in ((base_cols, b), (src_cols, int(perm[b]))):
                rank = eligible[row].long().cumsum(0) - 1
                ranks = rank[cols]
                assert ranks.tolist() == list(range(int(ranks[0]), int(ranks[0]) + expected))
            assert int(plan.span_start[b]) == int(base_cols.min())


def test_plan_options_and_determinism():
    attn, special = _masks(3, batch=8, seq=40)
    plan = sample_plan(attn, special, plan_generator(7, 1), proportion=0.5, max_tokens=2)
    assert int(plan.span_length.max()) == 2
    aligned = sample_plan(attn, special, plan_generator(7, 1), aligned=True)
    assert torch.equal(aligned.base.cols, aligned.source.cols)
    free = [sample_plan(attn, special, plan_generator(s, 1)) for s in range(10)]
    assert any(not torch.equal(p.base.cols, p.source.cols) for p in free)  # offsets are independent
    again = sample_plan(attn, special, plan_generator(3, 1))
    assert torch.equal(again.base.cols, free[3].base.cols) and torch.equal(again.source_index, free[3].source_index)
    assert len({tuple(p.source_index.tolist()) for p in free}) > 1
    # No special tokens mask (decoders): every real token is eligible, never padding.
    dec = sample_plan(attn, None, plan_generator(1, 1), proportion=1.0)
    assert bool(attn[dec.base.rows, dec.base.cols].all()) and bool(attn[dec.source.rows, dec.source.cols].all())
