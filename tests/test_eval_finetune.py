"""Fine-tuning real HF heads: feature alignment, encoder and decoder students, saved directories, and a
tiny-bert on real SST-2 and CoNLL-2003 beating the trivial baselines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raydistill.data import synthetic as syn
from raydistill.data.tokenizer import train_tokenizer
from raydistill.eval import features, loaders, qa
from raydistill.eval.loop import IGNORE
from raydistill.eval.metrics import normalize_answer
from raydistill.eval.runner import evaluate
from raydistill.eval.settings import EvalSettings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data folder {DATA} is absent")


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer(syn.generate_documents(400, seed=0), "wordpiece", 600)


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(syn.generate_documents(400, seed=0), "bpe", 600)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_tagging_labels_sit_on_each_words_first_subtoken(kind, request):
    tokenizer = request.getfixturevalue(kind)
    examples = [{"tokens": e["tokens"], "tags": e["ner_tags"]} for e in syn.ner_examples(50, seed=1)]
    examples.append({"tokens": ["Zyxwv", "Qqqq-Rrrr", "'s", "déjà", "."], "tags": ["B-PER", "I-PER", "O", "O", "O"]})
    label_ids = {t: i for i, t in enumerate(["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC",
                                             "B-MISC", "I-MISC"])}
    for example, feature in zip(examples, features.encode_tagging(tokenizer, examples, label_ids, 128)):
        words = [w for w in feature["word_index"] if w >= 0]
        assert words == list(range(len(example["tokens"])))  # every word once, in order
        for w, label in zip(feature["word_index"], feature["labels"]):
            assert label == (label_ids[example["tags"][w]] if w >= 0 else IGNORE)
    # Truncation drops whole words from the end; they get no sub-token.
    cut = features.encode_tagging(tokenizer, examples[:1], label_ids, 4)[0]
    assert 0 < sum(w >= 0 for w in cut["word_index"]) < len(examples[0]["tokens"])


def _window_spans(tokenizer, examples, max_length, stride):
    train = qa.train_features(tokenizer, examples, max_length, stride)
    evaluation = qa.eval_features(tokenizer, examples, max_length, stride)
    assert len(train) == len(evaluation)  # the same windows, labelled vs. with offsets
    spans = []
    for t, e in zip(train, evaluation):
        example = examples[e["example"]]
        if t["start_positions"] == 0:
            spans.append((example, None))
            continue
        offsets = e["context_offsets"]
        spans.append((example, example["context"][offsets[t["start_positions"]][0]:offsets[t["end_positions"]][1]]))
    return spans, evaluation


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_qa_windows_label_the_answer_and_overlap_by_the_stride(kind, request):
    tokenizer = request.getfixturevalue(kind)
    examples = syn.qa_examples(60, seed=2)
    spans, windows = _window_spans(tokenizer, examples, max_length=40, stride=12)
    assert len(windows) > len(examples)  # short windows force several per context
    labelled = [(ex, text) for ex, text in spans if text is not None]
    assert len({ex["id"] for ex, _ in labelled}) == len(examples)  # each answer lies in some window
    for example, text in labelled:
        assert text.strip() == example["answers"]["text"][0]
    for a, b in zip(windows, windows[1:]):
        if a["example"] == b["example"]:
            ctx_a = [o for o in a["context_offsets"] if o is not None]
            ctx_b = [o for o in b["context_offsets"] if o is not None]
            assert ctx_a[-12:] == ctx_b[:12]


@needs_data
def test_qa_windows_on_real_squad(wordpiece):
    questions = [q for a in loaders.read_squad(DATA / "squad-v1.1" / "dev-v1.1.json")[:3] for q in a["questions"]]
    tokenizer = train_tokenizer([q["context"] for q in questions], "wordpiece", 2000)
    spans, _ = _window_spans(tokenizer, questions, max_length=128, stride=32)
    labelled = [(ex, text) for ex, text in spans if text is not None]
    exact = sum(normalize_answer(text) == normalize_answer(ex["answers"]["text"][0]) for ex, text in labelled)
    assert exact / len(labelled) > 0.97


def test_best_answer_picks_highest_scoring_valid_span():
    examples = [{"id": "q", "context": "Alice lives in Oslo today.", "question": "?"}]
    offsets = [None, None, (0, 5), (6, 11), (12, 14), (15, 19), (20, 25)]
    feature = {"example": 0, "context_offsets": offsets}
    start = torch.tensor([9.0, 0, 0, 0, 0, 5, 0])  # position 0 is not context: never chosen
    end = torch.tensor([9.0, 0, 0, 0, 4, 6, 1])
    assert qa.best_answers(examples, [feature], [{"start_logits": start, "end_logits": end}], 30) == {"q": "Oslo"}
    # An end before its start is invalid, whatever its score: start 5 + end 3 (30) loses to 5 + 5 (16).
    start = torch.tensor([-9.0, -9, -9, -9, -9, 10, -9])
    end = torch.tensor([-9.0, -9, -9, 20, -9, 6, 1])
    out = [{"start_logits": start, "end_logits": end}]
    assert qa.best_answers(examples, [feature], out, 30) == {"q": "Oslo"}
    # Spans longer than max_answer_tokens are invalid too.
    start = torch.tensor([-9.0, -9, -9, -9, -9, 10, -20])
    end = torch.tensor([-9.0, -9, -9, -9, -9, 0, 20])
    assert qa.best_answers(examples, [feature], [{"start_logits": start, "end_logits": end}], 2) == {"q": "Oslo today"}
    assert qa.best_answers(examples, [feature], [{"start_logits": start, "end_logits": end}], 1) == {"q": "Oslo"}


def _settings(**kw):
    return EvalSettings(**{"epochs": 1, "num_threads": 1, **kw})


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_decoder_students_run_every_task_kind(preset):
    report = evaluate(preset, "builtin", _settings(max_train_examples=200, max_eval_examples=60, max_length=64))
    values = {(r.task, r.metric): r.value for r in report.rows}
    assert set(values) >= {("builtin-cola", "accuracy"), ("builtin-ner", "entity_f1"), ("builtin-qa", "f1"),
                           ("builtin-ppl", "perplexity")}
    assert all(0 <= v <= 1 for (t, m), v in values.items() if m != "perplexity")
    assert values[("builtin-ppl", "perplexity")] > 1


def test_saved_directory_is_fine_tuned_from_its_weights(tmp_path):
    from transformers import AutoModelForMaskedLM

    from raydistill.models.loading import special_ids
    from raydistill.models.presets import preset_config

    tokenizer = train_tokenizer(syn.generate_documents(500, seed=0), "wordpiece", 800)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(preset_config("tiny-bert", len(tokenizer), special_ids(tokenizer)))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    settings = _settings(max_train_examples=100, max_eval_examples=40, seeds=(0, 1), max_length=64)
    report = evaluate(str(tmp_path), "builtin-cola,builtin-ppl", settings)
    ppl = [r for r in report.rows if r.metric == "perplexity"]
    assert len(ppl) == 2 and ppl[0].n_eval > 0 and 1 < ppl[0].value < 5 * len(tokenizer)
    accuracy = [s for s in report.summary if s.metric == "accuracy"]
    assert accuracy[0].n_seeds == 2


@needs_data
def test_tiny_bert_beats_majority_class_on_sst2():
    settings = _settings(max_train_examples=4000, max_length=64, batch_size=32)
    report = evaluate("tiny-bert", "sst2", settings, data_dir=DATA)
    dev, _ = loaders.read_glue(loaders.glue_path(DATA, "sst2", "dev"), "sst2")
    majority = max(sum(r["label"] for r in dev), sum(1 - r["label"] for r in dev)) / len(dev)
    (row,) = [r for r in report.rows if r.metric == "accuracy"]
    assert row.n_train == 4000 and row.n_eval == 872
    assert row.value > majority + 0.05


@needs_data
def test_tiny_bert_finds_entities_on_conll2003():
    # From scratch, tagging first sits in the all-O minimum; small batches give it enough steps to leave it.
    settings = _settings(max_train_examples=4000, max_eval_examples=1000, max_length=64, batch_size=8)
    report = evaluate("tiny-bert", "conll2003", settings, data_dir=DATA)
    f1 = {r.metric: r.value for r in report.rows}
    assert f1["entity_f1"] > 0.1  # all-O scores 0


def test_fine_tuning_reports_the_last_epochs_mean_loss_per_example():
    """Three examples in batches of two: the last batch holds one, so a mean of batch means would weight it twice."""
    from types import SimpleNamespace

    from raydistill.eval.loop import train

    class PerExample(torch.nn.Module):  # loss: the mean of the batch's labels (lr 0: the same every epoch)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, labels):
            return SimpleNamespace(loss=labels.float().mean() + 0 * self.w.sum())

    features = [{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": v} for v in (1, 2, 6)]
    out = train(PerExample(), features, label_keys=("labels",), lr=0.0, epochs=2, batch_size=2, warmup_ratio=0.0,
                weight_decay=0.0, seed=0, device=torch.device("cpu"), pad_id=0)
    assert out["steps"] == 4 and out["train_loss"] == pytest.approx(3.0)
