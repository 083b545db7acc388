"""Loaders: every GLUE, CoNLL-2003 and SQuAD file of ../shared/data with the row counts its SOURCE.md
documents, and clear errors for missing or malformed files."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from raydistill.eval import loaders
from raydistill.eval.errors import EvalDataError
from raydistill.eval.settings import EvalSettings
from raydistill.eval.taskdata import check_data, load_task_data
from raydistill.eval.tasks import TASKS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data folder {DATA} is absent")

# (task, split) -> (rows, label counts or mean score) from glue/SOURCE.md
GLUE_COUNTS = {
    ("sst2", "train"): (67349, {0: 29780, 1: 37569}), ("sst2", "dev"): (872, {0: 428, 1: 444}),
    ("sst2", "test"): (1821, None),
    ("mrpc", "train"): (3668, {0: 1194, 1: 2474}), ("mrpc", "dev"): (408, {0: 129, 1: 279}),
    ("mrpc", "test"): (1725, None),
    ("cola", "train"): (8551, {0: 2528, 1: 6023}), ("cola", "dev"): (1043, {0: 322, 1: 721}),
    ("cola", "test"): (1063, None),
    ("stsb", "train"): (5749, 2.701), ("stsb", "dev"): (1500, 2.364), ("stsb", "test"): (1379, None),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}), ("rte", "dev"): (277, {0: 146, 1: 131}),
    ("rte", "test"): (3000, None),
    ("qnli", "dev"): (5463, {0: 2702, 1: 2761}), ("qnli", "test"): (5463, None),
}


@needs_data
@pytest.mark.parametrize("task,split", list(GLUE_COUNTS))
def test_glue_files_parse_with_documented_counts(task, split):
    rows, skipped = loaders.read_glue(loaders.glue_path(DATA, task, split), task)
    count, labels = GLUE_COUNTS[(task, split)]
    assert len(rows) == count and skipped == 0
    assert all(r["text_a"] for r in rows)
    if TASKS[task].num_labels and task in ("mrpc", "stsb", "rte", "qnli"):
        assert all(r["text_b"] for r in rows)
    if labels is None:
        assert all(r["label"] is None for r in rows)
    elif isinstance(labels, float):
        assert sum(r["label"] for r in rows) / len(rows) == pytest.approx(labels, abs=1e-3)
    else:
        assert dict(collections.Counter(r["label"] for r in rows)) == labels


@needs_data
def test_glue_quoting_is_disabled():
    # STS-B dev has unbalanced quotes; csv's default quoting would merge rows and lose some.
    rows, _ = loaders.read_glue(loaders.glue_path(DATA, "stsb", "dev"), "stsb")
    assert any('"' in r["text_a"] + r["text_b"] for r in rows)
    mrpc, _ = loaders.read_glue(loaders.glue_path(DATA, "mrpc", "train"), "mrpc")
    assert mrpc[0]["text_a"].startswith("Amrozi accused his brother")  # header with BOM recognised


@needs_data
@pytest.mark.parametrize("split,sentences,tokens,entities", [
    ("train", 14041, 203621, {"PER": 6600, "LOC": 7140, "ORG": 6321, "MISC": 3438}),
    ("valid", 3250, 51362, {"PER": 1842, "LOC": 1837, "ORG": 1341, "MISC": 922}),
    ("test", 3453, 46435, {"PER": 1617, "LOC": 1668, "ORG": 1661, "MISC": 702}),
])
def test_conll_files_parse_with_documented_counts(split, sentences, tokens, entities):
    rows = loaders.read_conll(DATA / "conll2003" / f"{split}.txt")
    assert len(rows) == sentences
    assert sum(len(r["tokens"]) for r in rows) == tokens
    assert all(len(r["tokens"]) == len(r["tags"]) for r in rows)
    counts = collections.Counter(t[2:] for r in rows for t in r["tags"] if t.startswith("B-"))
    assert dict(counts) == entities


@needs_data
def test_squad_dev_parses_and_splits_by_article():
    articles = loaders.read_squad(DATA / "squad-v1.1" / "dev-v1.1.json")
    questions = [q for a in articles for q in a["questions"]]
    assert len(articles) == 48 and len(questions) == 10570
    assert len({q["context"] for q in questions}) == 2067
    for q in questions[:500]:
        for text, start in zip(q["answers"]["text"], q["answers"]["answer_start"]):
            assert q["context"][start:start + len(text)] == text
    data = load_task_data(TASKS["squad"], EvalSettings(), DATA)
    assert len(data.train) + len(data.eval) == 10570
    assert not {q["title"] for q in data.train} & {q["title"] for q in data.eval}
    assert "split by article" in data.note


@needs_data
def test_wikitext_and_qnli_fallback():
    lines = loaders.read_wikitext(DATA / "wikitext-2" / "wiki.test.tokens")
    assert len(lines) > 2000 and lines[0] == "= Robert <unk> ="
    data = load_task_data(TASKS["qnli"], EvalSettings(), DATA)  # QNLI has no train.tsv here
    assert len(data.train) + len(data.eval) == 5463 and "dev split in two" in data.note


@needs_data
def test_caps_give_the_same_subset_for_every_call():
    settings = EvalSettings(max_train_examples=100, max_eval_examples=50)
    a = load_task_data(TASKS["sst2"], settings, DATA)
    b = load_task_data(TASKS["sst2"], settings, DATA)
    assert len(a.train) == 100 and len(a.eval) == 50 and a.train == b.train


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        check_data(TASKS["sst2"], tmp_path / "nope")
    with pytest.raises(EvalDataError, match=r"glue/SST-2/dev\.tsv"):
        check_data(TASKS["sst2"], tmp_path)
    with pytest.raises(EvalDataError, match="no such file"):
        loaders.read_conll(tmp_path / "train.txt")


def test_wrong_formats_name_file_and_line(tmp_path):
    conll = tmp_path / "bad.txt"
    conll.write_text("EU NNP B-NP B-ORG\nrejects VBZ O\n")
    with pytest.raises(EvalDataError, match=r"bad\.txt:2: 3 columns"):
        loaders.read_conll(conll)
    conll.write_text("EU NNP B-NP B-COMPANY\n")
    with pytest.raises(EvalDataError, match="NER tag 'B-COMPANY'"):
        loaders.read_conll(conll)
    glue = tmp_path / "dev.tsv"
    glue.write_text("sentence\tlabel\ngood film\t1\nbad film\n")
    with pytest.raises(EvalDataError, match=r"dev\.tsv:3: 1 tab-separated fields, expected 2"):
        loaders.read_glue(glue, "sst2")
    glue.write_text("sentence\tlabel\ngood film\tpositive\n")
    with pytest.raises(EvalDataError, match="label 'positive'"):
        loaders.read_glue(glue, "sst2")
    glue.write_text("text\tlabel\ngood film\t1\n")
    with pytest.raises(EvalDataError, match="lacks the text column"):
        loaders.read_glue(glue, "sst2")
    squad = tmp_path / "dev-v1.1.json"
    squad.write_text("{not json")
    with pytest.raises(EvalDataError, match="not valid JSON"):
        loaders.read_squad(squad)
    squad.write_text('{"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}')
    with pytest.raises(EvalDataError, match="not in the SQuAD v1.1 format"):
        loaders.read_squad(squad)
