"""Sweep files: search-space parsing for every primitive and structured choice, validation errors before
any trial starts, overrides, trial configs, and the results table / leaderboard."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray import tune

from raydistill.errors import ConfigError
from raydistill.sweep import results as R
from raydistill.sweep.space import grid_size, param_space, parse_space, trial_values
from raydistill.sweep.spec import load_sweep

BASE = {"teacher": {"name": "tiny-gpt2"}, "objectives": {"task": {"weight": 1.0}, "kd": {"weight": 1.0}},
        "train": {"max_steps": 10}}


def sweep_data(**extra):
    return {"name": "t", "base": BASE, **extra}


def load(tmp_path, overrides=(), **extra):
    extra.setdefault("storage_path", str(tmp_path / "sweeps"))
    return load_sweep(None, list(overrides), data=sweep_data(**extra))


def test_every_primitive_becomes_its_tune_domain():
    dims = parse_space({
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "objectives.kd.weight": {"uniform": [0.0, 2.0]},
        "objectives.kd.temperature": {"choice": [1.0, 2.0, 4.0]},
        "train.batch_size": {"grid": [8, 16]},
        "student.num_layers": {"randint": [1, 4]},
        "train.warmup_ratio": {"quniform": [0.0, 0.2, 0.05]},
    })
    space = param_space(dims)
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert isinstance(space["train.lr"].get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(space["objectives.kd.weight"].get_sampler(), tune.search.sample.Uniform)
    assert space["objectives.kd.temperature"].categories == [1.0, 2.0, 4.0]
    assert space["train.batch_size"] == {"grid_search": [8, 16]}
    assert isinstance(space["student.num_layers"], tune.search.sample.Integer)
    assert (space["student.num_layers"].lower, space["student.num_layers"].upper) == (1, 4)
    assert isinstance(space["train.warmup_ratio"].get_sampler(), tune.search.sample.Quantized)
    assert grid_size(dims) == 2
    # Sampled points come back unchanged for scalar dimensions.
    point = {"train.lr": 3e-3, "objectives.kd.weight": 0.5, "objectives.kd.temperature": 2.0,
             "train.batch_size": 16, "student.num_layers": 3, "train.warmup_ratio": 0.1}
    assert trial_values(dims, point) == point


def test_named_and_structured_choices_sample_names_and_give_values():
    dims = parse_space({
        "objectives.iit.alignment": {"choice": {"middle": "middle", "pairs": [{"teacher": [2, 3], "student": 1}]}},
        "student.init_layers": {"grid": [[0, 3], [1, 2]]},
    })
    dims += parse_space({
        "objectives": {"grid": {"kd": {"task": {"weight": 1}, "kd": {"weight": 1}}, "task": {"task": {"weight": 1}}}},
    })
    space = param_space(dims)
    assert space["objectives.iit.alignment"].categories == ["middle", "pairs"]  # Tune (and Optuna) see names
    assert space["student.init_layers"] == {"grid_search": ["[0,3]", "[1,2]"]}  # auto-named by compact JSON
    assert space["objectives"] == {"grid_search": ["kd", "task"]}
    values = trial_values(dims, {"objectives.iit.alignment": "pairs", "student.init_layers": "[1,2]",
                                 "objectives": "task"})
    assert values == {"objectives.iit.alignment": [{"teacher": [2, 3], "student": 1}], "student.init_layers": [1, 2],
                      "objectives": {"task": {"weight": 1}}}
    assert grid_size(dims) == 4


def test_trial_config_replaces_sections_and_sets_run_identity(tmp_path):
    sweep = load(tmp_path, space={"objectives": {"choice": {"only_task": {"task": {"weight": 2.0}}}},
                                  "train.lr": {"uniform": [1e-4, 1e-3]}}, set={"train.max_steps": 7})
    values = trial_values(sweep.dims, {"objectives": "only_task", "train.lr": 5e-4})
    cfg = sweep.trial_config(values, output_dir=str(tmp_path / "trial"), name="trial_1")
    assert cfg.active_objectives().keys() == {"task"} and cfg.objectives.task.weight == 2.0
    assert cfg.train.lr == 5e-4 and cfg.train.max_steps == 7  # 'set' applies to every trial
    assert (cfg.output_dir, cfg.name) == (str(tmp_path / "trial"), "trial_1")


def test_overrides_address_the_sweep_file(tmp_path):
    sweep = load(tmp_path, ["num_samples=3", f"storage_path={tmp_path / 'elsewhere'}", "set.train.lr=2e-4",
                            "scheduler.kind=asha", "set.train.eval_every=5"],
                 space={"objectives.kd.weight": {"uniform": [0, 1]}})
    assert sweep.spec.num_samples == 3
    assert sweep.dir == f"{tmp_path / 'elsewhere'}/t"
    assert sweep.base["train"]["lr"] == 2e-4


def test_base_path_is_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "base": "configs/base.yaml",
                                                     "storage_path": str(tmp_path / "out")}))
    sweep = load_sweep(tmp_path / "s.yaml")
    assert sweep.base["teacher"]["name"] == "tiny-gpt2"


@pytest.mark.parametrize("extra, message", [
    ({"space": {"train.learning_rate": {"choice": [1e-3]}}}, "'train.learning_rate' is not a config field"),
    ({"space": {"objectives.kd.temprature": {"choice": [1]}}}, "'objectives.kd.temprature' is not a config field"),
    ({"space": {"train.lr.x": {"choice": [1]}}}, "is a value, not a section"),
    ({"space": {"train.lr": {"choice": []}}}, "choice is empty"),
    ({"space": {"train.lr": {"grid": {}}}}, "grid is empty"),
    ({"space": {"train.lr": {"uniform": [1e-2, 1e-3]}}}, "needs low < high"),
    ({"space": {"train.lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
    ({"space": {"train.lr": {"quniform": [0, 1]}}}, "quniform takes [low, high, q]"),
    ({"space": {"train.lr": {"normal": [0, 1]}}}, "expected one of"),
    ({"space": {"train.lr": 1e-3}}, "constants belong under 'set'"),
    ({"space": {"train": {"choice": [{}]}, "train.lr": {"choice": [1]}}}, "overlap"),
    ({"metric": "val/accuracy"}, "metric 'val/accuracy' is never reported"),
    ({"metric": "val/iit"}, "never reported"),  # no trial runs IIT
    ({"metric": "bench/squad/f1"}, "never reported"),  # squad is not among the eval tasks
    ({"metric": "bench/builtin-cola/accuracy", "eval": {"tasks": None}}, "never reported"),
    ({"eval": {"tasks": "nonsense"}}, "nonsense"),
    ({"metric": "bench/builtin-qa/f1", "mode": "min"}, "mode 'min' for 'bench/builtin-qa/f1', which is better when "
     "higher: the sweep would keep its worst trials; allowed: max"),
    ({"metric": "val/ppl", "mode": "max"}, "allowed: min"),
    ({"metric": "bench/builtin-qa/f1", "scheduler": {"kind": "asha", "metric": "val/loss", "mode": "max"}},
     "scheduler.mode 'max' for 'val/loss', which is better when lower"),
    ({"scheduler": {"kind": "median", "mode": "max"}}, "scheduler.mode 'max': the scheduler acts on the sweep's "
     "metric 'val/loss', ranked 'min'; allowed: min"),
    ({"metric": "kd/anything"}, "mode: not given, and 'kd/anything' does not say whether lower or higher is better"),
    ({"metric": "bench/builtin-ppl/glue_score"}, "never reported"),
    ({"scheduler": {"kind": "asha"}}, None),  # caught by the runner (no intermediate reports): see below
    ({"search": {"algorithm": "optuna"}, "space": {"train.lr": {"grid": [1e-3]}}}, "cannot expand grid"),
    ({"num_samples": 0}, "num_samples"),
    ({"scheduler": {"kind": "hyperband"}}, "scheduler.kind"),
])
def test_bad_sweep_files_fail_before_any_trial(tmp_path, extra, message):
    import ray

    if message is None:
        from raydistill.sweep.runner import check_scheduler

        with pytest.raises(ConfigError, match="set train.eval_every"):
            check_scheduler(load(tmp_path, **extra))
        return
    with pytest.raises(ConfigError) as err:
        load(tmp_path, **extra)
    assert message in str(err.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps").exists()  # nothing written


def test_metrics_of_possible_objectives_and_benchmarks_are_accepted(tmp_path):
    load(tmp_path, metric="val/kd")
    load(tmp_path, metric="bench/builtin-qa/f1", mode="max")
    load(tmp_path, metric="val/iia", space={"objectives.iit.weight": {"choice": [0.0, 1.0]}})
    load(tmp_path, metric="bench/glue/glue_average", mode="max", eval={"tasks": ["sst2", "cola"]})


def test_modes_follow_their_metrics_and_a_scheduler_on_another_metric_never_borrows_the_sweeps(tmp_path):
    from raydistill.sweep.runner import _scheduler

    assert load(tmp_path).spec.mode == "min"  # val/loss
    assert load(tmp_path, metric="val/iia", space={"objectives.iit.weight": {"choice": [0.0, 1.0]}}).spec.mode == "max"
    assert load(tmp_path, metric="kd/anything", mode="max").spec.mode == "max"  # no direction known: as given
    # Ranked by a benchmark score (higher is better), stopped early on the validation loss (lower is better).
    sweep = load(tmp_path, metric="bench/builtin-qa/f1", set={"train.eval_every": 5},
                 scheduler={"kind": "asha", "metric": "val/loss"})
    assert (sweep.spec.mode, sweep.spec.scheduler.mode) == ("max", "min")
    asha = _scheduler(sweep)
    assert (asha._metric, asha._mode) == ("val/loss", "min")  # what Tune stores
    same = _scheduler(load(tmp_path, metric="val/ppl", scheduler={"kind": "median"}, set={"train.eval_every": 5}))
    assert (same._metric, same._mode) == ("val/ppl", "min")


@pytest.mark.parametrize("task, reported", [("sst2", False), ("cola", False), ("mrpc", True), ("stsb", True)])
def test_glue_score_is_a_metric_only_of_glue_tasks_with_several_metrics(tmp_path, task, reported):
    """It is the mean of a task's metrics, written to the summary for those tasks alone."""
    from raydistill.eval.tasks import check_metric

    metric = f"bench/{task}/glue_score"
    if reported:
        check_metric(task, "glue_score")
        load(tmp_path, metric=metric, eval={"tasks": [task]})
    else:
        with pytest.raises(ConfigError, match="no metric 'glue_score'"):
            check_metric(task, "glue_score")
        with pytest.raises(ConfigError, match="never reported"):
            load(tmp_path, metric=metric, eval={"tasks": [task]})


def test_asha_on_a_benchmark_metric_is_refused(tmp_path):
    from raydistill.sweep.runner import check_scheduler

    sweep = load(tmp_path, metric="bench/builtin-ppl/perplexity", scheduler={"kind": "asha"},
                 set={"train.eval_every": 5})
    with pytest.raises(ConfigError, match="scheduler.metric"):
        check_scheduler(sweep)


def test_cli_reports_a_bad_sweep_file_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(sweep_data(storage_path=str(tmp_path / "out"),
                                             space={"train.lrr": {"choice": [1]}})))
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", "sweep", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "'train.lrr' is not a config field" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_results_table_leaderboard_and_best(tmp_path):
    rows = [
        {"trial": "a", "status": "finished", "step": 10, "config/train.lr": 1e-3, "val/loss": 2.0, "runtime_s": 5.0},
        {"trial": "b", "status": "failed", "step": 3, "config/train.lr": -1.0, "val/loss": None, "runtime_s": 1.0},
        {"trial": "c", "status": "stopped", "step": 5, "config/train.lr": 1e-5, "val/loss": 3.0, "runtime_s": 2.0},
        {"trial": "d", "status": "finished", "step": 10, "config/train.lr": 2e-3, "val/loss": 1.5, "runtime_s": 6.0},
    ]
    R.write_table(tmp_path, rows)
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "results.parquet").is_file()
    frame = R.read_table(tmp_path)
    assert list(R.leaderboard(frame, "val/loss", "min")["trial"]) == ["d", "a", "c", "b"]
    assert list(R.leaderboard(frame, "val/loss", "max")["trial"]) == ["c", "a", "d", "b"]
    assert R.best_row(rows, "val/loss", "min")["trial"] == "d"
    assert R.best_row(rows[1:2], "val/loss", "min") is None
    sweep = load(tmp_path, space={"train.lr": {"uniform": [1e-5, 1e-2]}})
    text = R.format_leaderboard(frame, sweep)
    lines = text.splitlines()
    assert lines[0].startswith("sweep t: val/loss (min)") and "train.lr" in lines[1]
    assert lines[3].split()[:3] == ["1", "d", "finished"] and lines[-1].split()[:3] == ["-", "b", "failed"]
    with pytest.raises(ConfigError, match="no results.csv"):
        R.read_table(tmp_path / "missing")


def test_only_finished_trials_rank_and_the_table_shows_each_column_once_with_whole_steps(tmp_path):
    # A failed and an interrupted trial keep an intermediate val/loss better than any finished trial's.
    rows = [
        {"trial": "a", "status": "finished", "step": 12345, "config/train.lr": 1e-3, "val/loss": 2.0,
         "runtime_s": 50.0},
        {"trial": "f", "status": "failed", "step": 40, "config/train.lr": 5e-2, "val/loss": 1.2, "runtime_s": 20.0},
        {"trial": "r", "status": "interrupted", "step": 20, "config/train.lr": 2e-2, "val/loss": 1.5,
         "runtime_s": 9.0},
        {"trial": "d", "status": "finished", "step": 12345, "config/train.lr": 2e-3, "val/loss": 1.8,
         "runtime_s": 12345.67},
        {"trial": "p", "status": "pending", "step": None, "config/train.lr": 3e-3, "val/loss": None, "runtime_s": None},
    ]
    R.write_table(tmp_path, rows)
    frame = R.read_table(tmp_path)
    assert list(R.leaderboard(frame, "val/loss", "min")["trial"]) == ["d", "a", "f", "r", "p"]
    assert list(R.leaderboard(frame, "val/loss", "max")["trial"]) == ["a", "d", "f", "r", "p"]
    assert R.best_row(rows, "val/loss", "min")["trial"] == "d"
    sweep = load(tmp_path, space={"train.lr": {"uniform": [1e-5, 1e-1]}}, metric="val/loss", mode="min")
    lines = R.format_leaderboard(frame, sweep).splitlines()
    assert lines[1].split().count("val/loss") == 1  # the metric is also one of the usual columns
    cells = [ln.split() for ln in lines[3:]]
    assert [c[:3] for c in cells] == [["1", "d", "finished"], ["2", "a", "finished"], ["-", "f", "failed"],
                                      ["-", "r", "interrupted"], ["-", "p", "pending"]]
    assert cells[0][3] == "12345" and cells[0][-1] == "12346"  # step (a float column: p has none) and runtime whole
    assert cells[-1][3] == "-" and cells[-1][-1] == "-"  # a pending trial has no step and no runtime yet


def test_a_trial_that_ended_before_tune_heard_reports_its_saved_final_result(tmp_path):
    import json
    from types import SimpleNamespace

    sweep = load(tmp_path, space={"train.lr": {"loguniform": [1e-4, 1e-2]}}, metric="bench/builtin-qa/f1")
    tdir = Path(sweep.dir) / "trial_A"
    tdir.mkdir(parents=True)
    (tdir / "final_result.json").write_text(json.dumps({"val/loss": 1.5, "bench/builtin-qa/f1": 0.9, "step": 10,
                                                        "export_dir": str(tdir / "student"), "finished": 1,
                                                        "runtime_s": 300.0}))
    (tdir / "trial.jsonl").write_text('{"event": "start"}\n{"event": "end", "bench/builtin-qa/f1": 0.9}\n')
    # Tune's last result is the last training report: interrupted right after the driver's end event.
    a = SimpleNamespace(trial_id="A", status="RUNNING", config={"train.lr": 1e-3}, path=str(tdir), error_file=None,
                        last_result={"step": 10, "val/loss": 1.5, "time_total_s": 290.0})
    b = SimpleNamespace(trial_id="B", status="TERMINATED", config={"train.lr": 5e-3}, path="", error_file=None,
                        last_result={"step": 10, "val/loss": 2.0, "bench/builtin-qa/f1": 0.6, "finished": 1,
                                     "export_dir": "/x", "time_total_s": 310.0})
    pending = SimpleNamespace(trial_id="C", status="PENDING", config={"train.lr": 2e-3}, path="", error_file=None,
                              last_result={})
    # Finished in an earlier session, reported again by a resume: Tune timed only the few seconds of that.
    restored = SimpleNamespace(trial_id="D", status="TERMINATED", config={"train.lr": 3e-3}, path="", error_file=None,
                               last_result={"step": 10, "bench/builtin-qa/f1": 0.5, "finished": 1, "runtime_s": 27.1,
                                            "time_total_s": 3.4})
    rows = [R.trial_row(sweep, t) for t in (a, b, pending, restored)]
    assert rows[3]["runtime_s"] == 27.1 and rows[1]["runtime_s"] == 310.0  # the trial's own time, else Tune's
    assert rows[0]["status"] == "finished" and rows[0]["bench/builtin-qa/f1"] == 0.9
    assert rows[0]["checkpoint_path"] == str(tdir / "student") and rows[0]["runtime_s"] == 300.0
    assert R.best_row(rows, sweep.spec.metric, sweep.spec.mode)["trial"] == "A"
    assert rows[2]["status"] == "pending" and rows[2]["runtime_s"] is None  # no runtime yet, not 0


def test_the_best_so_far_gauge_takes_finished_and_stopped_trials_only(monkeypatch):
    import raydistill.monitoring.metrics as M

    seen = {}

    class Gauge:
        def __init__(self, name):
            self.name = name

        def set(self, value, tags):
            seen[self.name] = value

    monkeypatch.setattr(M, "_metric", Gauge)
    rows = [{"trial": "a", "status": "finished", "val/loss": 2.0}, {"trial": "f", "status": "failed", "val/loss": 1.2},
            {"trial": "r", "status": "running", "val/loss": 1.1}, {"trial": "s", "status": "stopped", "val/loss": 1.9}]
    M.SweepMetrics("t", "val/loss", "min").update(rows)
    assert seen["raydistill_sweep_best"] == 1.9


SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_files_are_valid(path, tmp_path, monkeypatch):
    # Paper-scale files name local data the user downloads (see their comments): stand-ins here.
    for rel in ("data/dolly/train.jsonl", "data/openwebtext/a.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text('{"instruction": "Say hi", "context": "", "response": "hi"}\n'
                                    if rel.endswith("jsonl") else "some text\n")
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(path, [f"storage_path={tmp_path / 'out'}"])
    from raydistill.sweep.runner import check_scheduler

    check_scheduler(sweep)
    # Every categorical value yields a valid trial config (numeric ones are checked when sampled).
    for dim in sweep.dims:
        for name in dim.names:
            sweep.trial_config(trial_values([dim], {dim.path: name}), str(tmp_path / "t"), "t")


def test_optuna_search_samples_named_choices_as_scalars(tmp_path):
    pytest.importorskip("optuna", reason="optuna is an optional extra: pip install 'raydistill[optuna]'")
    from raydistill.sweep.runner import _search_alg

    sweep = load(tmp_path, search={"algorithm": "optuna", "seed": 3}, metric="val/loss",
                 space={"train.lr": {"loguniform": [1e-4, 1e-2]},
                        "objectives": {"choice": {"kd": {"task": {"weight": 1}, "kd": {"weight": 1}},
                                                  "task": {"task": {"weight": 1}}}}})
    searcher = _search_alg(sweep, concurrency=1)
    assert searcher.set_search_properties("val/loss", "min", param_space(sweep.dims))
    point = searcher.suggest("trial-1")
    assert 1e-4 <= point["train.lr"] <= 1e-2 and point["objectives"] in ("kd", "task")
    cfg = sweep.trial_config(trial_values(sweep.dims, point), str(tmp_path / "t"), "t")
    assert "task" in cfg.active_objectives()


def test_yaml_12_numbers_in_sweep_files(tmp_path):
    """loguniform: [1e-4, 3e-3] as users write it (YAML 1.1 would give strings), and in eval.settings."""
    (tmp_path / "s.yaml").write_text(
        "name: s\nbase: {teacher: {name: tiny-gpt2}, train: {lr: 1e-3}}\n"
        f"storage_path: {tmp_path / 'out'}\n"
        "set: {train.weight_decay: 1e-2}\n"
        "space:\n  train.lr: {loguniform: [1e-4, 3e-3]}\n  train.eps: {choice: [1e-8, 1.0e-6]}\n"
        "eval: {tasks: builtin, settings: {learning_rate: 1e-3}}\n")
    sweep = load_sweep(tmp_path / "s.yaml")
    assert sweep.dims[0].args == (1e-4, 3e-3) and sweep.dims[1].values == (1e-8, 1e-6)
    assert sweep.base["train"]["weight_decay"] == 1e-2 and sweep.spec.eval.settings["learning_rate"] == 1e-3
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "sweep.yaml").write_text(sweep.to_yaml())  # what --resume reads
    again = load_sweep(saved / "sweep.yaml")
    assert again.dims == sweep.dims and again.base == sweep.base


def test_space_overrides_add_replace_and_remove_dimensions(tmp_path):
    space = {"train.lr": {"choice": [1e-3, 2e-3]}, "objectives.kd.weight": {"uniform": [0, 1]}}
    sweep = load(tmp_path, ["space.train.lr={loguniform: [1e-4, 1e-2]}", "space.train.warmup_ratio={grid: [0, 0.1]}",
                            "space.objectives.kd.weight=null"], space=space)
    assert {d.path: (d.kind, d.args or d.names) for d in sweep.dims} == {
        "train.lr": ("loguniform", (1e-4, 1e-2)), "train.warmup_ratio": ("grid", (0, 0.1))}
    assert load(tmp_path, ["space.train.lr={choice: [1e-3]}"]).dims[0].names == (1e-3,)  # no space in the file
    with pytest.raises(ConfigError, match=r"space\.train\.lrr: 'train\.lrr' is not a config field"):
        load(tmp_path, ["space.train.lrr={choice: [1]}"])
    with pytest.raises(ConfigError, match=r"space\.train\.lr: loguniform takes \[low, high\] numbers"):
        load(tmp_path, ["space.train.lr={loguniform: [a, b]}"])


@pytest.mark.parametrize("override, message", [
    ("nm_samples=3", r"'nm_samples' is not a sweep file key; allowed: base, .*num_samples.*storage_path"),
    ("train.lr=1e-4", r"'train' is not a sweep file key; allowed: base, .*; 'train' is an experiment config key: "
                      r"set it for every trial with set\.train\.lr=1e-4 or search it with space\.train\.lr="),
    ("scheduler.kindd=asha", r"invalid sweep file:\n  scheduler\.kindd: unknown key; allowed: grace_period, kind"),
])
def test_sweep_override_errors_name_the_sweep_files_keys(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load(tmp_path, [override])
    assert "teacher" not in str(err.value).split("allowed:")[1].split(";")[0]  # not the experiment's keys


def test_eval_teacher_setting_defaults_on_is_typed_and_survives_the_saved_sweep(tmp_path):
    from types import SimpleNamespace

    from raydistill.sweep.teacher import existing_scores, teacher_model

    assert load(tmp_path).spec.eval.teacher is True  # default: the teacher is scored
    off = load(tmp_path, ["eval.teacher=false"])
    assert off.spec.eval.teacher is False
    assert yaml.safe_load(off.to_yaml())["eval"]["teacher"] is False  # what --resume reads
    with pytest.raises(ConfigError, match="eval.teacher"):
        load(tmp_path, eval={"teacher": "sometimes"})
    with pytest.raises(ConfigError, match="eval"):
        load(tmp_path, eval={"teachers": True})
    # What is scored: a pretrained or named teacher; a random preset (teacher_source None) is not.
    cfg = SimpleNamespace(teacher=SimpleNamespace(name="tiny-gpt2", revision=None))
    assert teacher_model(cfg, SimpleNamespace(teacher_source=None))[0] is None
    assert teacher_model(cfg, SimpleNamespace(teacher_source="/cache/teacher")) == ("/cache/teacher", "")
    hub = SimpleNamespace(teacher=SimpleNamespace(name="org/model", revision="v1"))
    assert teacher_model(hub, SimpleNamespace(teacher_source="org/model"))[0] is None
    # --resume reuses a readable teacher/bench.json only.
    sweep = load(tmp_path)
    assert existing_scores(sweep) is None
    (Path(sweep.dir) / "teacher").mkdir(parents=True)
    (Path(sweep.dir) / "teacher" / "bench.json").write_text("{cut")
    assert existing_scores(sweep) is None
    (Path(sweep.dir) / "teacher" / "bench.json").write_text('{"summary": [{"task": "t", "metric": "m", "mean": 1}]}')
    assert existing_scores(sweep)["summary"][0]["mean"] == 1
