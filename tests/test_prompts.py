"""Prompt/response data: loading (jsonl, templates, the built-in set), prompt masking, deterministic
batches, and the config sections around them (checked before Ray starts)."""

import json

import numpy as np
import pytest
import torch

from raydistill.config import PromptDataSpec, load_config
from raydistill.data.blocks import TokenInfo
from raydistill.data.prompts import (PromptExample, ResponseSampler, batch_prompts, build_sequences,
                                     builtin_prompt_rows, load_prompt_examples, response_labels, rows_to_batch,
                                     tokenize_prompts)
from raydistill.data.tokenizer import train_tokenizer
from raydistill.errors import ConfigError

INFO = TokenInfo(is_encoder=False, vocab_size=100, pad_id=1, mask_id=None, special_ids=(0, 1))
TINY = ["teacher.name=tiny-gpt2", "data.builtin.num_documents=200", "data.block_size=32", "tokenizer.vocab_size=256",
        "objectives.td.weight=1"]


@pytest.fixture(scope="module")
def tok():
    from raydistill.data.synthetic import generate_documents

    return train_tokenizer(generate_documents(200), "bpe", 256)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


DOLLY = [{"instruction": f"Name a colour number {i}.", "context": "" if i % 2 else "Colours: red, blue.",
          "response": f"Colour {i} is red.", "category": "open_qa"} for i in range(40)]


# ----------------------------------------------------------------------------------------------- labels
def test_labels_only_on_response_tokens_and_eos():
    # prompt [10 11 12], response [20 21 EOS=0] ; second row: prompt [13], response [22 0], then padding.
    rows = build_sequences([np.array([10, 11, 12]), np.array([13])], [np.array([20, 21, 0]), np.array([22, 0])],
                           pad_id=1)
    assert rows.ids.tolist() == [[10, 11, 12, 20, 21, 0], [13, 22, 0, 1, 1, 1]]
    assert rows.lengths.tolist() == [6, 3] and rows.prompt_lengths.tolist() == [3, 1]
    arrays = (rows.ids, rows.lengths, rows.prompt_lengths)
    batch = rows_to_batch(*(torch.from_numpy(a.astype(np.int64)) for a in arrays))
    x = -100
    # labels[t] is the token at t+1: the last prompt position predicts the first response token.
    assert batch["labels"].tolist() == [[x, x, 20, 21, 0, x], [22, 0, x, x, x, x]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert [p.tolist() for p in batch_prompts(batch)] == [[10, 11, 12], [13]]
    # EOS (id 0 here) and padding are special: IIT spans skip them unless include_special_tokens.
    special = rows_to_batch(*(torch.from_numpy(a.astype(np.int64)) for a in arrays), special_ids=(0,))
    assert special["special_tokens_mask"].tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 1, 1]]


def test_response_labels_match_next_token_labels_when_the_prompt_is_one_token():
    from raydistill.data.masking import next_token_labels

    ids = torch.randint(2, 50, (3, 7))
    lengths = torch.tensor([7, 5, 2])
    mask = (torch.arange(7)[None] < lengths[:, None]).long()
    assert torch.equal(response_labels(ids, lengths, torch.ones(3, dtype=torch.long)), next_token_labels(ids, mask))


def test_rows_must_fit():
    with pytest.raises(ValueError, match="does not fit"):
        build_sequences([np.array([1, 2, 3])], [np.array([4, 5])], pad_id=0, length=4)


def test_batches_are_a_pure_function_of_seed_step_micro_rank_and_trim_padding():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 90, rng.integers(1, 6)) for _ in range(30)]
    responses = [rng.integers(2, 90, rng.integers(1, 6)) for _ in range(30)]
    rows = build_sequences(prompts, responses, pad_id=1, length=12)
    kw = dict(batch_size=4, grad_accum=2, world_size=2, seed=3)
    a = ResponseSampler(rows, INFO, rank=0, **kw)
    b = ResponseSampler(rows, INFO, rank=1, **kw)
    first = a.batch(5, 1)
    again = ResponseSampler(rows, INFO, rank=0, **kw).batch(5, 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["input_ids"].size(1) == int(first["attention_mask"].sum(1).max()) <= 12
    assert not set(a.indices(5, 1).tolist()) & set(b.indices(5, 1).tolist())
    with pytest.raises(ValueError, match="decoders"):
        ResponseSampler(rows, TokenInfo(True, 100, 0, 3, (0,)), rank=0, **kw)


# ----------------------------------------------------------------------------------------------- tokenisation
def test_tokenize_keeps_prompt_end_and_cuts_responses(tok):
    examples = [PromptExample("Where does Alice Smith live in the world of the corpus? Alice Smith lives",
                              " in Oslo, Norway.")]
    full = tokenize_prompts(examples, tok, 1000, 1000)
    cut = tokenize_prompts(examples, tok, 5, 4)
    assert full.responses[0][-1] == tok.eos_token_id
    assert cut.prompts[0].tolist() == full.prompts[0][-5:].tolist()  # the end, next to the response
    assert cut.responses[0].tolist() == full.responses[0][:4].tolist()
    assert tok.decode(full.prompts[0]) == examples[0].prompt
    assert full.references == [" in Oslo, Norway."]
    assert full.digest() != cut.digest() and full.digest() == tokenize_prompts(examples, tok, 1000, 1000).digest()


def test_builtin_prompts_are_deterministic_and_about_the_corpus_world():
    rows = builtin_prompt_rows(50, seed=0)
    assert rows == builtin_prompt_rows(50, seed=0) and rows != builtin_prompt_rows(50, seed=1)
    assert len({r["prompt"] for r in rows}) == 50
    assert all(r["response"].startswith(" ") and r["response"].endswith(".") for r in rows)
    from raydistill.data.synthetic import build_world

    person = build_world(0).persons[0]
    every = builtin_prompt_rows(10_000, seed=0)
    assert {"prompt": f"{person.name} lives", "response": f" in {person.city}."} in every
    assert len(every) == 3 * 120 + 24
    train, val = load_prompt_examples(PromptDataSpec(builtin={"num_examples": 100}))
    assert len(train) + len(val) == 100 and not {e.prompt for e in train} & {e.prompt for e in val}


# ----------------------------------------------------------------------------------------------- files
def test_dolly_style_jsonl_with_template(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    spec = PromptDataSpec(path=path, template="Instruction: {instruction}\nInput: {context}\nResponse:",
                          validation_fraction=0.1)
    train, val = load_prompt_examples(spec)
    assert len(train) == 36 and len(val) == 4
    ex = next(e for e in train + val if e.response == "Colour 0 is red.")
    assert ex.prompt == "Instruction: Name a colour number 0.\nInput: Colours: red, blue.\nResponse:"
    # A .json list and a separate validation file work too.
    json_path = tmp_path / "val.json"
    json_path.write_text(json.dumps([{"prompt": "p", "response": "r"}]))
    train, val = load_prompt_examples(PromptDataSpec(path=write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a",
                                                                                              "response": "b"}]),
                                                     validation_path=str(json_path)))
    assert train == [PromptExample("a", "b")] and val == [PromptExample("p", "r")]


def test_missing_fields_name_the_setting_file_and_example(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOLLY[:3] + [{"instruction": "x", "response": "y"}])
    spec = PromptDataSpec(path=path, template="{instruction} {context}")
    with pytest.raises(ConfigError, match=r"prompts\.template: field 'context' missing in .*d\.jsonl example 4 "
                                          r"\(found \['instruction', 'response'\]\)"):
        load_prompt_examples(spec)
    spec = PromptDataSpec(path=path, template="{instruction}", response_field="answer")
    with pytest.raises(ConfigError, match=r"prompts\.response_field: field 'answer' missing in .*example 1"):
        load_prompt_examples(spec)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: not valid JSON"):
        load_prompt_examples(PromptDataSpec(path=str(tmp_path / "bad.jsonl")))


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (["prompts.path=/nonexistent/dolly.jsonl"], r"prompts\.path: no file matches '/nonexistent/dolly\.jsonl'"),
    (["prompts.path=pyproject.toml"], r"prompts\.path: .*pyproject\.toml': allowed file types \.jsonl, \.json"),
    (["prompts.template=no fields"], r"prompts\.template: template 'no fields' names no field"),
    (["prompts.template='{a!r}'"], r"prompts\.template: .*takes no format spec or conversion"),
    (["prompts.responses=student"], r"prompts\.responses: allowed: 'teacher' or 'dataset' \(got 'student'\)"),
    (["prompts.generation.num_samples=0"], r"prompts\.generation\.num_samples: .*greater than or equal to 1"),
    (["prompts.generation.top_p=1.5"], r"prompts\.generation\.top_p: .*less than or equal to 1"),
    (["prompts.on_policy.probability=2"], r"prompts\.on_policy\.probability: .*less than or equal to 1 \(got 2\)"),
    (["prompts.max_response_tokens=16", "prompts.generation.max_new_tokens=32"],
     r"generation\.max_new_tokens 32 exceeds max_response_tokens 16"),
    (["prompts.genration={}"], r"prompts\.genration: unknown key; allowed: .*generation.*on_policy"),
    (["rouge.seeds=[]"], r"rouge\.seeds: List should have at least 1 item"),
    (["rouge.data.path=/nope.jsonl"], r"rouge\.data\.path: no file matches"),
    (["streams.lm.objectives.kd.weight=0"], r"streams\.lm\.objectives: no objective has a positive weight"),
    (["streams.lm.objectives.mystery.weight=1"], r"streams\.lm\.objectives\.mystery: unknown key; allowed: .*kd.*task"),
    (["streams.lm.data.block_size=2", "streams.lm.objectives.kd.weight=1"], r"streams\.lm\.data\.block_size: .*8"),
    (["streams.td.objectives.kd.weight=1"], r"streams\.td: a stream name is a lowercase identifier"),
])
def test_config_errors_name_field_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])


def test_debug_td_config_is_valid_offline():
    from conftest import ROOT

    cfg = load_config(ROOT / "sweeps" / "configs" / "debug_td.yaml")
    assert cfg.prompts.responses == "teacher" and cfg.objectives.td.weight > 0
    assert set(cfg.stream_objectives("lm")) == {"task", "kd"} and cfg.rouge is not None


def test_prepare_builds_prompt_rows_streams_and_rouge(tmp_path):
    from raydistill.train.plan import prepare

    cfg = load_config(None, [*TINY, f"cache_dir={tmp_path}", f"output_dir={tmp_path / 'run'}",
                             "prompts={builtin: {num_examples: 60}, responses: dataset, max_prompt_tokens: 24, "
                             "max_response_tokens: 24}", "rouge={num_prompts: 5}",
                             "streams.lm.objectives={task: {weight: 0.5}, kd: {weight: 0.5}}"])
    plan = prepare(cfg)
    p = plan.prompts
    assert p.train_rows is not None and len(p.train_rows) == len(p.train) == 57
    assert p.train_rows.ids.shape[1] == 48 and (p.train_rows.prompt_lengths <= 24).all()
    assert set(plan.streams["lm"].objectives) == {"task", "kd"}
    assert plan.streams["lm"].blocks is plan.fetch_blocks()  # data: null reuses the corpus
    assert len(plan.rouge.prompts) == 3  # the 3 held-out prompts (fewer than num_prompts)
    assert plan.rouge.max_new_tokens == 24


def test_prepare_refuses_prompts_for_encoders_and_too_long_rows(tmp_path):
    from raydistill.train.plan import prepare

    base = [f"cache_dir={tmp_path}", "data.builtin.num_documents=200", "tokenizer.vocab_size=256"]
    with pytest.raises(ConfigError, match=r"prompts: prompt/response data and generation need decoders"):
        prepare(load_config(None, [*base, "teacher.name=tiny-bert", "prompts={}"]))
    with pytest.raises(ConfigError, match=r"rouge: .*need decoders"):
        prepare(load_config(None, [*base, "teacher.name=tiny-bert", "rouge={}"]))
    with pytest.raises(ConfigError, match=r"prompts: max_prompt_tokens \+ max_response_tokens = 1000 exceeds the "
                                          r"models' 512 positions"):
        prepare(load_config(None, [*base, "teacher.name=tiny-gpt2", "prompts={max_prompt_tokens: 500, "
                                   "max_response_tokens: 500}"]))
