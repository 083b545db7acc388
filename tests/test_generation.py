"""Generation (left padding, EOS cuts, samples per prompt), the teacher-sample cache, on-policy draws,
ROUGE-L, and extra data streams in the distillation step."""

import json

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from raydistill.eval.rouge import mean_rouge_l, model_rouge_l, rouge_l, tokenize
from raydistill.generation import (GenerationCache, cut_at_eos, generate_responses, generation_key, left_pad,
                                   model_identity, on_policy_draw, padded_shard, shard_bounds)

PAD, EOS = 1, 0


@pytest.fixture(scope="module")
def tiny_decoder():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=64, pad_token_id=PAD,
                        eos_token_id=EOS, bos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


# ----------------------------------------------------------------------------------------------- ROUGE-L
def test_rouge_tokenizer_is_rouge_scores_with_the_porter_stemmer():
    assert tokenize("Hello, World! It's 2024 -- the END.") == ["hello", "world", "it", "s", "2024", "the", "end"]
    assert tokenize("Running dogs were jumping") == ["run", "dog", "were", "jump"]
    assert tokenize("  ... ") == []


@pytest.mark.parametrize("pred, ref, p, r, f", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6, 5 / 6, 5 / 6),
    ("a b c d e", "a c e", 3 / 5, 1.0, 0.75),
    ("A, B; C!", "a b c", 1.0, 1.0, 1.0),  # case and punctuation do not count
    ("x y z", "a b c", 0.0, 0.0, 0.0),
    ("", "a b c", 0.0, 0.0, 0.0),
    # The stemmer (use_stemmer=True, as MiniLLM scores): inflections match their stem.
    ("running dogs", "run dog", 1.0, 1.0, 1.0),
    ("police killed the gunman", "police kill the gunman", 1.0, 1.0, 1.0),  # Lin (2004)'s example: 3/4 unstemmed
    # "cats"/"cat" and "running"/"runs" meet at their stems; "quickly" stems to "quickli", not "quick".
    ("The cats were running quickly", "cat runs quick", 2 / 5, 2 / 3, 0.5),
])
def test_rouge_l_hand_examples(pred, ref, p, r, f):
    score = rouge_l(pred, ref)
    assert score.precision == pytest.approx(p) and score.recall == pytest.approx(r)
    assert score.fmeasure == pytest.approx(f)


def test_rouge_l_is_rouge_scores_rougeL_with_stemmer():
    from rouge_score import rouge_scorer

    reference_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [("The quick brown foxes jumped over the lazy dogs.", "A quick brown fox jumps over the lazy dog"),
             ("Paris is the capital of France; it has 2.1 million inhabitants.", "The capital of France is Paris."),
             ("He was studying computational linguistics", "She studies linguistics and computation"),
             ("w1 w2 w3 w4 w5 w6 w7", "w1 x w3 w4 y w7"), ("café naïve", "cafe naive"), ("", "")]
    for pred, ref in pairs:
        expected = reference_scorer.score(ref, pred)["rougeL"]  # score(target, prediction)
        got = rouge_l(pred, ref)
        assert (got.precision, got.recall, got.fmeasure) == pytest.approx(tuple(expected)), (pred, ref)
    # LCS("w1 w2 w3 w4 w5 w6 w7", "w1 x w3 w4 y w7") = w1 w3 w4 w7 = 4: P = 4/7, R = 4/6, F = 8/13.
    assert rouge_l("w1 w2 w3 w4 w5 w6 w7", "w1 x w3 w4 y w7").fmeasure == pytest.approx(8 / 13, abs=1e-12)
    assert rouge_l("café naïve", "cafe naive").fmeasure == 0.0  # non-ASCII letters are separators there


def test_rouge_l_best_of_several_references_and_mean():
    assert rouge_l("a b", ["x", "a b c"]).fmeasure == pytest.approx(0.8)  # MiniLLM: max over references
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(0.5)
    assert mean_rouge_l(["running"], [["walk", "runs"]]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], [])


def test_model_rouge_l_scores_generated_text(tiny_decoder):
    class Tok:  # decode ids as words "t<id>", EOS dropped as a special token
        pad_token_id, eos_token_id = PAD, EOS

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"t{i}" for i in ids if not (skip_special_tokens and i in (PAD, EOS)))

    prompts = [np.array([5, 6, 7], np.int32), np.array([9], np.int32)]
    kw = {"do_sample": False, "max_new_tokens": 6}
    greedy = generate_responses(tiny_decoder, prompts, pad_id=PAD, eos_id=EOS, generate_kwargs=kw)
    refs = [Tok().decode(r) for r in greedy]
    total, n = model_rouge_l(tiny_decoder, Tok(), prompts, refs, generate_kwargs=kw, seeds=[0, 1])
    assert n == 4 and total == pytest.approx(4.0)  # the greedy output is its own reference
    total, n = model_rouge_l(tiny_decoder, Tok(), prompts, ["t63 t62", refs[1]], generate_kwargs=kw, seeds=[0],
                             count=1)
    assert n == 1 and total < 1.0  # only the first prompt counts (the second pads a shard)


# ----------------------------------------------------------------------------------------------- generation
def test_left_pad_and_eos_cut():
    ids, mask = left_pad([np.array([4, 5, 6]), np.array([7])], PAD)
    assert ids.tolist() == [[4, 5, 6], [PAD, PAD, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_eos(np.array([3, 4, EOS, PAD, PAD]), EOS).tolist() == [3, 4, EOS]
    assert cut_at_eos(np.array([3, 4, 5]), EOS).tolist() == [3, 4, 5]  # max_new_tokens reached


def test_batched_left_padded_generation_equals_one_by_one(tiny_decoder):
    prompts = [np.array([5, 6, 7, 8, 9], np.int32), np.array([11, 12], np.int32), np.array([20], np.int32)]
    kw = {"do_sample": False, "max_new_tokens": 5}
    batched = generate_responses(tiny_decoder, prompts, pad_id=PAD, eos_id=EOS, generate_kwargs=kw, batch_size=3)
    single = [generate_responses(tiny_decoder, [p], pad_id=PAD, eos_id=EOS, generate_kwargs=kw)[0] for p in prompts]
    assert [r.tolist() for r in batched] == [r.tolist() for r in single]
    assert all(1 <= len(r) <= 5 for r in batched)


def test_samples_per_prompt_are_prompt_major_and_seeded(tiny_decoder):
    prompts = [np.array([5, 6], np.int32), np.array([30, 31], np.int32)]
    kw = {"do_sample": True, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    a = generate_responses(tiny_decoder, prompts, pad_id=PAD, eos_id=EOS, generate_kwargs=kw, num_samples=3, seed=7)
    b = generate_responses(tiny_decoder, prompts, pad_id=PAD, eos_id=EOS, generate_kwargs=kw, num_samples=3, seed=7)
    assert len(a) == 6 and [x.tolist() for x in a] == [x.tolist() for x in b]
    assert len({tuple(x.tolist()) for x in a}) > 1  # samples differ
    assert tiny_decoder.training is False


def test_shards_cover_every_prompt_once_with_equal_lengths():
    items = list(range(7))
    seen = []
    for rank in range(3):
        mine, real = padded_shard(items, rank, 3)
        assert len(mine) == shard_bounds(7, rank, 3)[2] == 3
        seen += mine[:real]
    assert seen == items
    assert padded_shard([1], 1, 2) == ([1], 0)  # more ranks than prompts: pad, score nothing


# ----------------------------------------------------------------------------------------------- cache
def test_cache_hit_miss_and_atomic_files(tmp_path):
    cache = GenerationCache(tmp_path)
    key = generation_key({"hub": "gpt2"}, "p1", "t1", {"temperature": 1.0})
    assert not cache.exists(key)
    responses = [np.array([3, 4, EOS], np.int32), np.array([5], np.int32), np.array([], np.int32)]
    path = cache.save(key, responses, {"prompts": 3})
    assert cache.exists(key) and path.parent == tmp_path / "generations"
    assert [r.tolist() for r in cache.load(key)] == [r.tolist() for r in responses]
    assert json.loads((tmp_path / "generations" / f"{key}.json").read_text())["prompts"] == 3
    assert sorted(p.name for p in (tmp_path / "generations").iterdir()) == [f"{key}.json", f"{key}.npz"]


def test_cache_key_covers_teacher_prompts_tokenizer_and_settings(tmp_path):
    base = dict(teacher={"hub": "gpt2", "revision": None}, prompt_digest="p", tokenizer_fingerprint="t",
                settings={"temperature": 1.0, "num_samples": 8})
    key = generation_key(**base)
    assert generation_key(**base) == key
    for change in ({"teacher": {"hub": "gpt2-xl", "revision": None}}, {"prompt_digest": "q"},
                   {"tokenizer_fingerprint": "u"}, {"settings": {"temperature": 0.7, "num_samples": 8}}):
        assert generation_key(**{**base, **change}) != key, change
    # A local teacher is identified by its weight files: retraining it (new file) changes the key.
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    before = model_identity(str(tmp_path), None, "{}", 0, "fp32")
    assert model_identity(str(tmp_path), None, "{}", 0, "fp32") == before
    (tmp_path / "model.safetensors").write_bytes(b"y" * 11)
    assert model_identity(str(tmp_path), None, "{}", 0, "fp32") != before
    assert model_identity(None, None, "{}", 0, "fp32") != model_identity(None, None, "{}", 1, "fp32")
    # A teacher dtype or attention kernel changes the samples; unset options keep the identity from before them.
    plain = model_identity(None, None, "{}", 0, "fp32")
    assert model_identity(None, None, "{}", 0, "fp32", {"torch_dtype": None, "attn_implementation": None}) == plain
    assert model_identity(None, None, "{}", 0, "fp32", {"torch_dtype": "bfloat16"}) != plain
    assert model_identity(None, None, "{}", 0, "fp32", {"attn_implementation": "eager"}) != plain
    assert model_identity("org/model", "main", "{}", 0, "bf16") != model_identity("org/model", "main", "{}", 0, "fp32")


# ----------------------------------------------------------------------------------------------- on-policy
def test_on_policy_draws_are_deterministic_and_match_lambda():
    draws = [on_policy_draw(42, step, micro, 0.3) for step in range(1, 2001) for micro in range(2)]
    assert draws == [on_policy_draw(42, step, micro, 0.3) for step in range(1, 2001) for micro in range(2)]
    assert np.mean(draws) == pytest.approx(0.3, abs=0.03)
    assert draws != [on_policy_draw(43, step, micro, 0.3) for step in range(1, 2001) for micro in range(2)]
    assert not any(on_policy_draw(42, s, 0, 0.0) for s in range(100))
    assert all(on_policy_draw(42, s, 0, 1.0) for s in range(100))


# ----------------------------------------------------------------------------------------------- streams
def test_extra_stream_adds_its_weighted_loss_and_prefixes_its_terms(tiny_decoder):
    from raydistill.data.masking import next_token_labels
    from raydistill.objectives import build_objectives
    from raydistill.objectives.base import ModelInfo, ObjectiveSettings
    from raydistill.objectives.kd import KDSettings
    from raydistill.train.step import DistillModule

    info = ModelInfo(is_encoder=False, vocab_size=64, student_layers=2, student_hidden=32, teacher_layers=2,
                     teacher_hidden=32)
    main = {"task": ObjectiveSettings(weight=1.0)}
    lm = {"task": ObjectiveSettings(weight=0.5), "kd": KDSettings(weight=0.5)}
    module = DistillModule(tiny_decoder, build_objectives(main, info), info, streams={"lm": build_objectives(lm, info)})
    ids = torch.randint(2, 64, (2, 6))
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": next_token_labels(ids, mask)}
    ids2 = torch.randint(2, 64, (3, 5))
    mask2 = torch.ones_like(ids2)
    other = {"input_ids": ids2, "attention_mask": mask2, "labels": next_token_labels(ids2, mask2)}
    with torch.no_grad():
        alone, alone_logs = module(batch)
        total, logs = module(batch, tiny_decoder, streams={"lm": other})
    assert {"task", "loss", "lm/task", "lm/kd", "lm/loss"} <= logs.keys()
    assert logs["task"] == pytest.approx(alone_logs["task"].item())
    assert logs["lm/kd"].item() == pytest.approx(0.0, abs=1e-6)  # the teacher is the student here
    assert total.item() == pytest.approx(alone.item() + 0.5 * logs["lm/task"].item() + 0.5 * logs["lm/kd"].item())
    assert logs["loss"].item() == pytest.approx(total.item())
