"""Configuration: round trip, dotted overrides, and specific errors for bad inputs (before Ray starts)."""

import os
import subprocess
import sys

import pytest
import yaml

from raydistill.config import ExperimentConfig, apply_overrides, dump_config, load_config, validate_config
from raydistill.errors import ConfigError

from conftest import ROOT

DEBUG = ROOT / "sweeps" / "configs" / "debug.yaml"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(DEBUG)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_required_dotted_keys_exist():
    cfg = load_config(DEBUG, ["output_dir=/tmp/x", "train.lr=3e-4", "train.max_steps=7", "deepspeed.zero_stage=3",
                              "scaling.num_workers=4", "scaling.use_gpu=true", f"data.path={DEBUG}",
                              "objectives.kd.weight=0.25"])
    assert cfg.output_dir == "/tmp/x" and cfg.train.lr == 3e-4 and cfg.train.max_steps == 7
    assert cfg.deepspeed.zero_stage == 3 and cfg.scaling.num_workers == 4 and cfg.scaling.use_gpu is True
    assert cfg.data.source == "files" and cfg.data.path == [str(DEBUG)]
    assert cfg.objectives.kd.weight == 0.25


def test_overrides_parse_types_and_create_sections():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2.5", "a.c=[1, 2]", "d.e=true", "f=null", "g=text"])
    assert data == {"a": {"b": 2.5, "c": [1, 2]}, "d": {"e": True}, "f": None, "g": "text"}
    cfg = load_config(DEBUG, ["objectives.cosine.pairs=[{teacher: 1, student: 0}]", "objectives.task.weight=0"])
    assert cfg.objectives.cosine.pairs[0].teacher == 1
    assert "task" not in cfg.active_objectives()  # weight 0 disables a term


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=-1"], r"train\.lr: .*greater than 0 \(got -1\)"),
    (["objectives.kd.weight=-0.5"], r"objectives\.kd\.weight: .*greater than or equal to 0 \(got -0\.5\)"),
    (["deepspeed.zero_stage=7"], r"deepspeed\.zero_stage: .*less than or equal to 3 \(got 7\)"),
    (["scaling.num_workers=0"], r"scaling\.num_workers: .*greater than or equal to 1 \(got 0\)"),
    (["train.lrr=1"], r"train\.lrr: unknown key; allowed: .*\blr\b.*"),
    (["objectives.mystery.weight=1"], r"objectives\.mystery: unknown key; allowed: .*cosine.*kd.*task"),
    (["train.max_steps=many"], r"train\.max_steps: .*valid integer.*\(got 'many'\)"),
    (["train.precision=fp8"], r"train\.precision: allowed: 'fp32', 'bf16' or 'fp16' \(got 'fp8'\)"),
    (["data.path=/nonexistent/*.txt"], r"data\.path: no file matches '/nonexistent/\*\.txt'"),
    (["teacher.name=./no/such/dir"], r"teacher\.name: model directory './no/such/dir' does not exist"),
    (["objectives.kd.temperature=0"], r"objectives\.kd\.temperature: .*greater than 0 \(got 0\)"),
    (["student.init_layers=[3, 1]"], r"student\.init_layers: .*distinct, increasing"),
    (["deepspeed.offload_params=true", "deepspeed.zero_stage=2"], r"offload_params needs zero_stage 3 \(got 2\)"),
    (["objectives.task.weight=0", "objectives.kd.weight=0", "objectives.cosine.weight=0"],
     r"no objective has a positive weight"),
    (["train.betas=[0.9, 1.5]"], r"train\.betas: .*\[0, 1\)"),
    (["data.source=files"], r"source 'files' needs data\.path"),
    (["data.source=builtin", "data.path=pyproject.toml"], r"data\.path or data\.hub is set but data\.source is 'builtin'"),
    (["name=has space"], r"name: .has space. is not a safe name .*allowed: .*letters"),
    (["objectives.iit.weight=1", "train.batch_size=1"], r"train\.batch_size 1: .*allowed: 2 or more"),
])
def test_bad_values_name_field_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG, overrides)


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file 'missing.yaml' not found"):
        load_config("missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(DEBUG, ["train.lr"])
    with pytest.raises(ConfigError, match="'lr' is a value, not a section"):
        load_config(DEBUG, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"teacher: Field required"):
        validate_config({})


def test_cli_reports_config_errors_without_traceback_and_before_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", "train", str(DEBUG), "deepspeed.zero_stage=7",
                           f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "deepspeed.zero_stage" in proc.stderr and "got 7" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_defaults_are_complete():
    cfg = ExperimentConfig(teacher={"name": "tiny-gpt2"})
    assert cfg.active_objectives().keys() == {"task"}
    assert yaml.safe_load(dump_config(cfg))["deepspeed"]["zero_stage"] == 2


def test_pretrained_teacher_cache_key_follows_the_masking_rate(tmp_path):
    """A teacher pretrained at one MLM masking rate is not reused at another."""
    from raydistill.data.tokenizer import train_tokenizer
    from raydistill.train.plan import pretrained_teacher_dir

    tok = train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 20, "wordpiece", 120)
    base = ["teacher.name=tiny-bert", f"cache_dir={tmp_path}"]
    same = pretrained_teacher_dir(load_config(None, base), tok)
    assert pretrained_teacher_dir(load_config(None, base), tok) == same
    assert pretrained_teacher_dir(load_config(None, [*base, "data.mlm_probability=0.4"]), tok) != same
    # The dtype the teacher is loaded in to distil does not change how it was pretrained; the attention kernel
    # (its numerics) does.
    assert pretrained_teacher_dir(load_config(None, [*base, "teacher.torch_dtype=bfloat16"]), tok) == same
    assert pretrained_teacher_dir(load_config(None, [*base, "teacher.attn_implementation=eager"]), tok) != same


def test_yaml_numbers_as_users_write_them(tmp_path):
    """1e-4, 3e-3 and 1.0e-4 are floats everywhere (YAML 1.2), not the strings PyYAML's YAML 1.1 rules give."""
    from raydistill.config import yaml_dump, yaml_load

    assert yaml_load("[1e-4, 3e-3, 1.0e-4, 1.0e4, -2E+2, .5, 1., 1_000, 12, .inf]") == \
        [1e-4, 3e-3, 1e-4, 1e4, -200.0, 0.5, 1.0, 1000, 12, float("inf")]
    assert [type(v) for v in yaml_load("[1e-4, 12, '1e-4', 1e, e5, 1.2.3]")] == [float, int, str, str, str, str]
    assert yaml.safe_load("a: 1e-4") == {"a": "1e-4"}  # PyYAML's own rule, untouched by ours
    # Strings that look like numbers stay strings through a dump and load (a run named '1e5').
    data = {"name": "1e5", "lr": 1e-12, "x": ["3e3", 3e3]}
    assert yaml_load(yaml_dump(data)) == data
    path = tmp_path / "c.yaml"
    path.write_text("teacher: {name: tiny-gpt2}\ntrain: {lr: 1e-4, eps: 1e-8}\n"
                    "student: {config_overrides: {layer_norm_epsilon: 1e-12}}\n"
                    "deepspeed: {extra: {optimizer_hint: 3e-3}}\n")
    cfg = load_config(path, ["teacher.config_overrides.layer_norm_epsilon=1e-5", "train.weight_decay=1e-2"])
    assert (cfg.train.lr, cfg.train.eps, cfg.train.weight_decay) == (1e-4, 1e-8, 1e-2)
    assert cfg.student.config_overrides["layer_norm_epsilon"] == 1e-12
    assert cfg.teacher.config_overrides["layer_norm_epsilon"] == 1e-5
    assert cfg.deepspeed.extra["optimizer_hint"] == 3e-3
    # The Hugging Face config gets the number, not the string '1e-12'.
    from raydistill.data.tokenizer import train_tokenizer
    from raydistill.models.loading import model_config, student_config

    tok = train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 20, "bpe", 300)
    student = student_config(cfg, model_config(cfg.teacher, tok), tok)
    assert student.layer_norm_epsilon == 1e-12 and isinstance(student.layer_norm_epsilon, float)
    assert load_config(path) == load_config(path, [])  # and the dumped config reads back the same
    dumped = tmp_path / "d.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_deepspeed_is_imported_without_mlflow_which_imports_normally_afterwards():
    # DeepSpeed's autotuner imports MLflow (and pandas) when DeepSpeed is imported: ~1.1-1.7 s of each worker's start.
    code = """
import sys
from raydistill.train.ds_config import import_deepspeed
deepspeed = import_deepspeed()
assert deepspeed.__name__ == "deepspeed" and callable(deepspeed.initialize)
assert "mlflow" not in sys.modules and "pandas" not in sys.modules, sorted(m for m in sys.modules if "mlflow" in m)
import deepspeed.autotuning.autotuner as tuner
assert tuner.has_mlflow is False
import mlflow
assert callable(mlflow.log_metric)
assert import_deepspeed() is deepspeed
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_cpu_process_group_for_deepspeed_compiles_no_extension_and_zero_loads_no_inductor(tmp_path):
    # DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce op (for tensor-parallel inference only)
    # as its process group starts: ~40 s with g++ on a machine's first run, and no run at all without a compiler.
    # ZeRO's set-up imports DeepSpeed's Muon module, whose torch.compile decorators loaded torch's inductor
    # (~1.1-1.6 s of each worker's deepspeed.initialize); Muon's kernels now compile on their first call.
    code = """
import sys
import torch
from raydistill.bench.throughput import one_process_group
from raydistill.train.ds_config import import_deepspeed
deepspeed = import_deepspeed()
with one_process_group(torch.device("cpu")):
    deepspeed.init_distributed(dist_backend="gloo")
    import deepspeed.comm.comm as comm
    assert comm.cdb.shm_comm_op is None
    x = torch.ones(3)
    deepspeed.comm.all_reduce(x)  # the collectives training uses still work
    assert x.tolist() == [1.0, 1.0, 1.0]
    model = torch.nn.Linear(4, 2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9})
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    assert "deepspeed.runtime.zero.muon.original_muon" in sys.modules  # ZeRO did import Muon
    assert "torch._inductor.compile_fx" not in sys.modules
# Muon's kernels are still torch.compile'd, with the same options, at their first call.
from deepspeed.runtime.zero.muon import original_muon
compiled = []
torch.compile = lambda fn, **options: compiled.append((fn.__name__, options)) or fn
G = torch.randn(4, 3)
assert compiled == []
assert torch.equal(original_muon.zeropower_via_newtonschulz5(G, 2), original_muon.zeropower_via_newtonschulz5(G, 2))
assert compiled == [("zeropower_via_newtonschulz5", {})], compiled
"""
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built successfully" not in proc.stdout, proc.stdout[-2000:]
    assert not extensions.exists() or not any(extensions.rglob("*.so")), sorted(extensions.rglob("*"))
