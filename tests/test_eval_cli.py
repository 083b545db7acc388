"""The ``raydistill eval`` command function: an offline run end to end, and bad inputs giving clear
RaydistillError messages (the CLI prints them without a traceback)."""

from __future__ import annotations

import json

import pytest

from raydistill.errors import RaydistillError
from raydistill.eval.cli import eval_command
from raydistill.eval.errors import EvalConfigError, EvalDataError
from raydistill.eval.settings import EvalSettings
from raydistill.eval.tasks import resolve_tasks


def _run(**kw):
    args = dict(model="tiny-bert", suite="builtin-cola", data_dir=None, max_train_examples=120,
                max_eval_examples=40, seeds="0", output=None, epochs=1, batch_size=None, learning_rate=None,
                max_length=64, doc_stride=None, builtin_seed=0, objective=None, use_ray=False, num_cpus=1,
                num_gpus=None, num_threads=1, device="cpu")
    args.update(kw)
    return eval_command(**args)


def test_builtin_run_writes_results_and_prints_table(tmp_path, capsys):
    _run(suite="builtin-cola,builtin-ner", seeds="0,1", output=tmp_path, objective="builtin-ner:entity_f1")
    out = capsys.readouterr().out
    assert "builtin-ner" in out and "examples/s" in out and "objective builtin-ner:entity_f1 =" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["seed"] for r in data["rows"]} == {0, 1}
    assert {(r["task"], r["metric"]) for r in data["rows"]} == {
        ("builtin-cola", "accuracy"), ("builtin-cola", "matthews_corr"), ("builtin-ner", "entity_f1"),
        ("builtin-ner", "entity_precision"), ("builtin-ner", "entity_recall")}
    assert all(r["n_train"] == 120 and r["n_eval"] == 40 for r in data["rows"])
    assert data["settings"]["seeds"] == [0, 1] and data["timing"]["examples_per_s"] > 0
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "summary.csv").is_file()


def test_task_names_and_suites_resolve():
    assert [t.name for t in resolve_tasks("SST-2, STS-B,conll")] == ["sst2", "stsb", "conll2003"]
    assert [t.name for t in resolve_tasks("quick,sst2")] == ["sst2", "conll2003", "squad", "wikitext2"]
    assert len(resolve_tasks("glue")) == 8


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(suite="sst3"), EvalConfigError, "unknown task or suite 'sst3'"),
    (dict(suite=" , "), EvalConfigError, "no task given"),
    (dict(objective="sst2:f1"), EvalConfigError, "task sst2 has no metric 'f1'"),
    (dict(objective="nosuch:accuracy"), EvalConfigError, "unknown task 'nosuch'"),
    (dict(objective="accuracy"), EvalConfigError, "expected TASK:METRIC"),
    (dict(seeds="0,x"), EvalConfigError, "expected comma-separated integers"),
    (dict(epochs=0), EvalConfigError, "epochs must be >= 1"),
    (dict(device="tpu"), EvalConfigError, "device 'tpu'"),
    (dict(model="./no/such/dir"), EvalConfigError, "no such directory"),
])
def test_bad_inputs_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        _run(**kwargs)
    assert isinstance(info.value, RaydistillError)


def test_bad_data_dir_and_model_dir(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        _run(suite="sst2", data_dir=tmp_path / "missing")
    with pytest.raises(EvalDataError, match=r"missing .*conll2003/train\.txt"):
        _run(suite="conll2003", data_dir=tmp_path)
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\tyes\n")
    with pytest.raises(EvalDataError, match="label 'yes'"):
        _run(suite="sst2", data_dir=tmp_path)
    model_dir = tmp_path / "student"
    model_dir.mkdir()
    with pytest.raises(EvalConfigError, match="has no config.json"):
        _run(model=str(model_dir))


def test_settings_validation():
    with pytest.raises(EvalConfigError, match="doc_stride"):
        EvalSettings(max_length=64, doc_stride=40)
    assert EvalSettings(seeds=[1, 2]).seeds == (1, 2)
