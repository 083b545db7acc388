"""Perplexity windows: the sliding window of Hugging Face's guide against non-overlapping windows and
against per-token losses computed with explicit contexts; the defaults and their reporting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig

from raydistill.eval.errors import EvalConfigError
from raydistill.eval.model_source import ModelSource
from raydistill.eval.perplexity import causal_nll, causal_windows, window_settings
from raydistill.eval.runner import evaluate
from raydistill.eval.settings import EvalSettings

PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=50, pad_token_id=PAD)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 50, (101,), generator=torch.Generator().manual_seed(1)).tolist()


def _scored(windows):
    return [t for _, end, first in windows for t in range(first, end)]


@pytest.mark.parametrize("n, context, stride", [(101, 16, 16), (101, 16, 8), (101, 16, 5), (100, 16, 1),
                                                (10, 16, 8), (2, 2, 1), (17, 16, 16)])
def test_windows_score_each_token_once(n, context, stride):
    windows = causal_windows(n, context, stride)
    scored = _scored(windows)
    assert all(end - begin <= context and begin < first for begin, end, first in windows)
    if stride == context:  # non-overlapping: a window's first token has no context and is not scored
        assert [(b, e) for b, e, _ in windows] == [(i, min(i + context, n)) for i in range(0, n, context)
                                                   if min(i + context, n) - i > 1]
        assert len(scored) == n - math.ceil(n / context)
    else:  # sliding: every token but the first, exactly once, with >= context - stride tokens before it
        assert sorted(scored) == scored == list(range(1, n))
        for begin, _, first in windows:
            assert begin == 0 or first - begin >= context - stride
    with pytest.raises(ValueError):
        causal_windows(n, context, context + 1)


@torch.no_grad()
def test_stride_equal_to_context_is_non_overlapping(model, ids):
    total, count = causal_nll(model, ids, context=16, stride=16, batch_windows=3, pad_id=PAD, device="cpu")
    # The old way, window by window: the model's own mean loss over each chunk's len - 1 predictions.
    expected, n = 0.0, 0
    for i in range(0, len(ids), 16):
        chunk = torch.tensor([ids[i:i + 16]])
        if chunk.shape[1] > 1:
            expected += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            n += chunk.shape[1] - 1
    assert count == n == len(ids) - math.ceil(len(ids) / 16)
    assert total == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("context, stride", [(16, 4), (16, 8), (16, 15), (7, 3)])
def test_sliding_window_equals_per_token_losses_with_explicit_contexts(model, ids, context, stride):
    total, count = causal_nll(model, ids, context=context, stride=stride, batch_windows=4, pad_id=PAD, device="cpu")
    assert count == len(ids) - 1  # every token but the first, once
    # By hand: token t is predicted from the tokens of its window before it, ids[begin:t] with begin the
    # start of the window that scores it (the latest window start whose window reaches past t while t is
    # not reached by the window before).
    expected, prev_end, begin_of = 0.0, 0, {}
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        for t in range(max(begin + 1, prev_end), end):
            begin_of[t] = begin
        prev_end = end
        if end == len(ids):
            break
    assert sorted(begin_of) == list(range(1, len(ids)))
    for t, begin in begin_of.items():
        assert t - begin <= context - 1 and (begin == 0 or t - begin >= context - stride)
        logits = model(torch.tensor([ids[begin:t]])).logits[0, -1]
        expected -= torch.log_softmax(logits, -1)[ids[t]].item()
    assert total == pytest.approx(expected, rel=1e-5)
    # More context can only be told apart from less: the non-overlapping value differs.
    flat, _ = causal_nll(model, ids, context=context, stride=context, batch_windows=4, pad_id=PAD, device="cpu")
    assert flat != pytest.approx(total)


def test_batching_and_padding_do_not_change_the_sum(model, ids):
    one, n1 = causal_nll(model, ids[:-3], context=16, stride=6, batch_windows=1, pad_id=PAD, device="cpu")
    many, n2 = causal_nll(model, ids[:-3], context=16, stride=6, batch_windows=64, pad_id=PAD, device="cpu")
    assert n1 == n2 and one == pytest.approx(many, rel=1e-5)


def test_window_defaults_and_overrides(tmp_path):
    gpt2 = GPT2Config(n_positions=1024)
    s = EvalSettings()
    assert window_settings(s, gpt2, encoder=False).describe() == "sliding_window(context=1024,stride=512)"
    assert window_settings(s, BertConfig(max_position_embeddings=512), encoder=True).describe() == \
        "non_overlapping(context=512)"
    long = LlamaConfig(max_position_embeddings=131072)
    assert window_settings(s, long, encoder=False).context == 4096
    w = window_settings(EvalSettings(ppl_context_length=256, ppl_stride=64), gpt2, encoder=False)
    assert (w.method, w.context, w.stride) == ("sliding", 256, 64)
    assert window_settings(EvalSettings(ppl_method="non_overlapping"), gpt2, encoder=False).stride == 1024
    # A raydistill export that records its training length is scored at that length.
    (tmp_path / "raydistill.json").write_text(json.dumps({"step": 10, "block_size": 128}))
    source = ModelSource("student", "dir", str(tmp_path), False)
    assert window_settings(s, GPT2Config(n_positions=512), False, source).describe() == \
        "sliding_window(context=128,stride=64)"
    with pytest.raises(EvalConfigError, match="exceeds the model's 1024 positions"):
        window_settings(EvalSettings(ppl_context_length=2048), gpt2, encoder=False)
    with pytest.raises(EvalConfigError, match="ppl_stride 600 exceeds the context length 512"):
        window_settings(EvalSettings(ppl_stride=600), GPT2Config(n_positions=512), encoder=False)
    with pytest.raises(EvalConfigError, match="for decoders"):
        window_settings(EvalSettings(ppl_method="sliding"), BertConfig(), encoder=True)
    with pytest.raises(EvalConfigError, match="ppl_method"):
        EvalSettings(ppl_method="strided")
    with pytest.raises(EvalConfigError, match="ppl_stride"):
        EvalSettings(ppl_context_length=64, ppl_stride=65)


def test_the_rows_say_which_windows_were_used():
    common = dict(max_train_examples=200, max_eval_examples=30, num_threads=1, ppl_context_length=64)
    sliding = evaluate("tiny-gpt2", "builtin-ppl", EvalSettings(**common))
    flat = evaluate("tiny-gpt2", "builtin-ppl", EvalSettings(ppl_method="non_overlapping", **common))
    (s,), (f,) = sliding.rows, flat.rows
    assert s.method == "sliding_window(context=64,stride=32)" and "sliding window: context 64, stride 32" in s.note
    assert f.method == "non_overlapping(context=64)" and sliding.summary[0].method == s.method
    n_tokens = s.n_eval + 1  # every token but the first
    assert f.n_eval == n_tokens - math.ceil(n_tokens / 64)
    assert s.value > 1 and f.value > 1
    with pytest.raises(EvalConfigError, match="for decoders"):
        evaluate("tiny-bert", "builtin-ppl", EvalSettings(ppl_method="sliding", **common))
