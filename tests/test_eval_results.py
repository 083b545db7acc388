"""Aggregation over seeds and the GLUE average, checked by hand; tidy CSV/JSON output."""

from __future__ import annotations

import csv
import json

import pytest

from raydistill.eval.results import ResultRow, summarize, summary_table, write_results
from raydistill.eval.runner import metric_value
from raydistill.eval.errors import EvalConfigError


def _rows():
    values = {("sst2", "accuracy"): (0.8, 0.6), ("mrpc", "f1"): (0.9, 0.7), ("mrpc", "accuracy"): (0.8, 0.6),
              ("stsb", "pearson"): (0.5, 0.5), ("stsb", "spearman"): (0.7, 0.3), ("squad", "f1"): (0.3, 0.5)}
    return [ResultRow("m", task, metric, v, seed, 100, 50) for (task, metric), pair in values.items()
            for seed, v in enumerate(pair)]


def test_mean_std_glue_scores_and_average():
    summary = {(s.task, s.metric): s for s in summarize(_rows())}
    assert summary[("sst2", "accuracy")].mean == pytest.approx(0.7)
    assert summary[("sst2", "accuracy")].std == pytest.approx(0.1414213, rel=1e-5)  # sample std
    assert summary[("mrpc", "glue_score")].mean == pytest.approx(0.75)  # mean of F1 and accuracy
    assert summary[("stsb", "glue_score")].mean == pytest.approx(0.5)
    assert ("sst2", "glue_score") not in summary  # single-metric tasks need no extra row
    glue = summary[("glue", "glue_average")]
    # per seed: (0.8 + 0.85 + 0.6) / 3 = 0.75 and (0.6 + 0.65 + 0.4) / 3 = 0.55
    assert glue.mean == pytest.approx(0.65) and glue.std == pytest.approx(0.1414213, rel=1e-5)
    assert glue.n_seeds == 2 and "partial: 3/8" in glue.note
    assert metric_value(list(summary.values()), "SST-2", "accuracy") == pytest.approx(0.7)
    assert metric_value(list(summary.values()), "glue", "glue_average") == pytest.approx(0.65)
    with pytest.raises(EvalConfigError, match="has no metric 'bleu'"):
        metric_value(list(summary.values()), "sst2", "bleu")
    with pytest.raises(EvalConfigError, match="no result for cola/matthews_corr"):
        metric_value(list(summary.values()), "cola", "matthews_corr")


def test_written_files_are_tidy(tmp_path):
    rows = _rows()
    summary = summarize(rows)
    paths = write_results(tmp_path / "out", rows, summary, {"timing": {"wall_s": 1.0}})
    with paths["results_csv"].open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["model", "task", "metric", "value", "seed", "n_train", "n_eval", "note", "method"]
    assert len(table) == len(rows) and float(table[0]["value"]) == rows[0].value
    with paths["summary_csv"].open() as f:
        assert list(next(csv.DictReader(f))) == ["model", "task", "metric", "mean", "std", "n_seeds", "note", "method"]
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == len(rows) and data["timing"] == {"wall_s": 1.0}
    assert {"task": "glue", "metric": "glue_average"}.items() <= [s for s in data["summary"]
                                                                  if s["task"] == "glue"][0].items()
    assert summary_table(summary).row_count == len(summary)


def test_the_method_of_a_metric_reaches_the_summary():
    method = "sliding_window(context=512,stride=256)"
    rows = [ResultRow("m", "wikitext2", "perplexity", v, seed, 0, 1000, "", method) for seed, v in ((0, 30.0), (1, 32.0))]
    (row,) = summarize(rows)
    assert row.method == method and row.mean == pytest.approx(31.0)
    assert all(s.method == "" for s in summarize(_rows()))
