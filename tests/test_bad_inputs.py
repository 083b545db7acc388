"""The bad-input table: configs, sweep files and command lines a user can get wrong. Every one is refused
with exit status 2 and one message naming the field (or file), the value and what is allowed, without a
Python traceback, before Ray starts (``ray.init`` is patched to fail the test if reached) and without
writing anything to the output or storage path.

Experiment-config cases run through both ``raydistill train`` and ``raydistill config`` (the dry run must
refuse whatever train refuses before Ray starts). The CLI runs in-process (``raydistill.cli.main``); two
cases run it as a subprocess to check the real exit path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BASE = """\
name: bad-inputs
output_dir: {out}
cache_dir: {cache}
teacher: {{name: tiny-gpt2}}
student: {{num_layers: 2, init: teacher}}
tokenizer: {{vocab_size: 256}}
data: {{builtin: {{num_documents: 60}}, block_size: 32}}
objectives: {{task: {{weight: 1.0}}, kd: {{weight: 1.0}}}}
train: {{max_steps: 2, batch_size: 2}}
scaling: {{num_workers: 1}}
"""

SWEEP = """\
name: bad-sweep
base: base.yaml
storage_path: {storage}
set: {{train.max_steps: 2}}
space:
  train.lr: {{loguniform: [1e-4, 3e-3]}}
num_samples: 1
eval: {{tasks: null}}
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files the cases point at: a base config and sweep, broken corpora, broken model folders."""
    root = tmp_path_factory.mktemp("inputs")
    cache = tmp_path_factory.getbasetemp() / "raydistill-cache"
    out = root / "out"
    (root / "base.yaml").write_text(BASE.format(out=out, cache=cache))
    (root / "sweep.yaml").write_text(SWEEP.format(storage=root / "sweeps"))
    binary = bytes(range(256)) * 8
    (root / "binary.txt").write_bytes(binary)
    (root / "binary").write_bytes(binary)
    (root / "nul.txt").write_bytes(b"text\x00more text\n")
    (root / "corpus_dir").mkdir()
    (root / "corpus_dir" / "a.txt").write_text("a line of text\n")
    (root / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(64))
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (root / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (root / "rows.csv").write_text("body\nsome text\n")
    (root / "doc.docx").write_bytes(b"PK\x03\x04 not really")
    (root / "good.txt").write_text("one line of text\nanother line of text\n")
    (root / "a_file").write_text("not a directory\n")
    (root / "prompts_binary.jsonl").write_bytes(binary)
    (root / "prompts.json").write_text('{"not": "a list"}')
    # Model folders: truncated safetensors, none at all, a missing shard, a truncated .bin.
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=256))
    model.save_pretrained(root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for name in ("no_weights", "missing_shard", "truncated_bin"):
        (root / name).mkdir()
        (root / name / "config.json").write_text((root / "truncated" / "config.json").read_text())
    (root / "missing_shard" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    (root / "truncated_bin" / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    return root


# ------------------------------------------------------------------------------------------- the table
# (id, overrides of the base config, substrings the message must contain: field or file, value, allowed).
# "{root}" in an override is the inputs folder.
CONFIG_CASES = [
    # types, ranges, choices
    ("lr-negative", ["train.lr=-1"], ["train.lr", "got -1", "greater than 0"]),
    ("lr-not-a-number", ["train.lr=fast"], ["train.lr", "'fast'", "valid number"]),
    ("lr-too-large", ["train.lr=1e3"], ["train.lr", "1000", "less than or equal to 10"]),
    ("max-steps-zero", ["train.max_steps=0"], ["train.max_steps", "got 0", "greater than or equal to 1"]),
    ("max-steps-fraction", ["train.max_steps=1.5"], ["train.max_steps", "1.5", "valid integer"]),
    ("precision", ["train.precision=fp8"], ["train.precision", "'fp8'", "'fp32', 'bf16' or 'fp16'"]),
    ("lr-schedule", ["train.lr_schedule=exp"], ["train.lr_schedule", "'exp'", "'constant', 'linear' or 'cosine'"]),
    ("warmup-ratio", ["train.warmup_ratio=1.5"], ["train.warmup_ratio", "1.5", "less than 1"]),
    ("betas", ["train.betas=[0.9, 1.5]"], ["train.betas", "1.5", "[0, 1)"]),
    ("batch-size-zero", ["train.batch_size=0"], ["train.batch_size", "got 0", "greater than or equal to 1"]),
    ("zero-stage", ["deepspeed.zero_stage=7"], ["deepspeed.zero_stage", "got 7", "less than or equal to 3"]),
    ("offload-params-stage2", ["deepspeed.offload_params=true"], ["offload_params", "got 2", "zero_stage 3"]),
    ("num-workers-zero", ["scaling.num_workers=0"], ["scaling.num_workers", "got 0", "greater than or equal to 1"]),
    ("cpus-per-worker-zero", ["scaling.cpus_per_worker=0"], ["scaling.cpus_per_worker", "got 0", "greater than 0"]),
    ("use-gpu-not-bool", ["scaling.use_gpu=maybe"], ["scaling.use_gpu", "'maybe'", "valid boolean"]),
    ("unknown-key", ["train.lrr=1"], ["train.lrr", "got 1", "allowed:", "lr_schedule"]),
    ("unknown-section", ["trian.lr=1"], ["trian", "unknown key", "allowed:", "train"]),
    ("unknown-objective", ["objectives.mystery.weight=1"], ["objectives.mystery", "allowed:", "kd"]),
    ("kd-temperature-zero", ["objectives.kd.temperature=0"], ["objectives.kd.temperature", "got 0", "greater than 0"]),
    ("kd-weight-negative", ["objectives.kd.weight=-1"], ["objectives.kd.weight", "got -1", "greater than or equal"]),
    ("no-positive-weight", ["objectives.kd.weight=0", "objectives.task.weight=0"],
     ["no objective has a positive weight", "objectives"]),
    ("iit-batch-of-one", ["objectives.iit.weight=1", "train.batch_size=1"], ["train.batch_size 1", "2 or more"]),
    ("init-layers-order", ["student.init_layers=[3, 1]"], ["student.init_layers", "[3, 1]", "distinct, increasing"]),
    ("init-kind", ["student.init=copy"], ["student.init", "'copy'", "'teacher' or 'random'"]),
    ("student-layers-zero", ["student.num_layers=0"], ["student.num_layers", "got 0", "greater than or equal to 1"]),
    ("tokenizer-kind", ["tokenizer.kind=sentencepiece"], ["tokenizer.kind", "'sentencepiece'", "'wordpiece'"]),
    ("tokenizer-vocab", ["tokenizer.vocab_size=10"], ["tokenizer.vocab_size", "got 10", "greater than or equal to 64"]),
    ("block-size-tiny", ["data.block_size=4"], ["data.block_size", "got 4", "greater than or equal to 8"]),
    ("mlm-probability", ["data.mlm_probability=1.5"], ["data.mlm_probability", "1.5", "less than 1"]),
    ("validation-fraction", ["data.validation_fraction=0"], ["data.validation_fraction", "got 0", "greater than 0"]),
    ("data-glob-no-match", ["data.path=/nonexistent/*.txt"], ["data.path", "/nonexistent/*.txt", "no file matches"]),
    ("data-source-files-no-path", ["data.source=files"], ["data", "source 'files' needs data.path"]),
    ("teacher-dir-missing", ["teacher.name=./no/such/dir"], ["teacher.name", "./no/such/dir", "a preset"]),
    ("teacher-dir-no-config", ["teacher.name={root}/corpus_dir"], ["teacher.name", "corpus_dir", "no config.json"]),
    ("name-space", ["name=has space"], ["name", "'has space'", "allowed: 1-128 letters"]),
    ("name-dotdot", ["name=.."], ["name", "'..'", "not '.' or '..'"]),
    ("name-dot", ["name=."], ["name", "'.'", "not '.' or '..'"]),
    ("name-separator", ["name=a/b"], ["name", "'a/b'", "no path separators"]),
    ("name-too-long", ["name=" + "n" * 200], ["name", "n" * 50, "1-128"]),
    ("value-not-section", ["train.lr.x=1"], ["train.lr", "{'x': 1}", "valid number"]),
    ("override-into-a-value", ["train.max_steps=3", "train.max_steps.x=1"],
     ["'train.max_steps.x=1'", "'max_steps' is a value, not a section"]),
    ("override-without-equals", ["train.lr"], ["'train.lr'", "expected key.sub=value"]),
    ("override-empty-key", ["train..lr=1"], ["'train..lr=1'", "empty key component"]),
    ("bad-stream-name", ["streams.val.objectives.task.weight=1"], ["streams.val", "lowercase identifier"]),
    ("prompt-template", ["prompts.template=no fields"], ["prompts.template", "'no fields'", "names no field"]),
    ("rouge-prompts-zero", ["rouge.num_prompts=0"], ["rouge.num_prompts", "got 0", "greater than or equal to 1"]),
    ("cosine-pair-out-of-range", ["objectives.cosine.pairs=[{teacher: 9, student: 0}]"],
     ["objectives.cosine.pairs.teacher", "9"]),
    # model shapes, before Ray
    ("block-size-beyond-positions", ["data.block_size=1024"], ["data.block_size", "1024", "at most 512"]),
    ("stream-block-size-beyond-positions", ["streams.lm.data.block_size=1024", "streams.lm.objectives.task.weight=1"],
     ["streams.lm.data.block_size", "1024", "at most 512"]),
    ("student-wider", ["student.config_overrides.n_embd=128"],
     ["student.config_overrides.n_embd", "128", "teacher's width 64", "student.init=random"]),
    ("student-hidden-size", ["student.config_overrides.hidden_size=128"], ["hidden_size", "student.init=random"]),
    ("teacher-heads", ["teacher.config_overrides.n_head=5"],
     ["teacher.config_overrides.n_head", "5 attention heads", "hidden size 64", "allowed head counts: 1, 2, 4"]),
    ("student-heads", ["student.init=random", "student.config_overrides.n_head=3"],
     ["student.config_overrides.n_head", "3 attention heads", "allowed head counts"]),
    ("llama-kv-heads", ["teacher.name=tiny-llama", "teacher.config_overrides.num_key_value_heads=3"],
     ["teacher.config_overrides.num_key_value_heads", "3 key/value heads", "4 attention heads", "allowed: 1, 2, 4"]),
    ("student-deeper", ["student.num_layers=6"], ["student.num_layers", "6-block student", "allowed: 1..4"]),
    ("student-deeper-overrides", ["student.num_layers=null", "student.config_overrides.n_layer=8"],
     ["student.num_layers", "8-block student", "allowed: 1..4"]),
    ("init-layers-distilbert", ["student.init_layers=distilbert"],
     ["student.init_layers 'distilbert'", "2-block student", "allowed pairs"]),
    ("init-layers-out-of-range", ["student.init_layers=[0, 7]"], ["student.init_layers", "[0, 7]", "0..3"]),
    ("student-ffn-differs", ["student.config_overrides.n_inner=128"],
     ["student.config_overrides", "'n_inner': 128", "(64, 128)", "(64, 256)", "student.init=random"]),
    ("model-cannot-be-built", ["student.init=random", "student.config_overrides.n_inner=-5"],
     ["student.config_overrides", "'n_inner': -5", "cannot be built"]),
    # deepspeed.extra, merged then validated
    ("ds-extra-stage-9", ["deepspeed.extra={zero_optimization: {stage: 9}}"],
     ["deepspeed.extra.zero_optimization.stage", "9", "allowed: 0, 1, 2, 3"]),
    ("ds-extra-stage-conflict", ["deepspeed.extra={zero_optimization: {stage: 3}}"],
     ["deepspeed.extra.zero_optimization.stage", "3", "deepspeed.zero_stage 2"]),
    ("ds-extra-batch-conflict", ["deepspeed.extra.train_batch_size=999"],
     ["deepspeed.extra.train_batch_size", "999", "allowed: 2"]),
    ("ds-extra-precision-conflict", ["deepspeed.extra={bf16: {enabled: true}}"],
     ["deepspeed.extra.bf16.enabled", "True", "train.precision 'fp32'"]),
    ("ds-extra-deepspeed-refuses", ["deepspeed.extra={zero_optimization: {reduce_bucket_size: -5}}"],
     ["deepspeed.extra.zero_optimization.reduce_bucket_size", "-5", "greater than 0"]),
    ("ds-extra-removed-feature", ["deepspeed.extra={nebula: {enabled: true}}"],
     ["deepspeed.extra", "nebula", "DeepSpeed refuses"]),
    # directories
    ("output-dir-is-a-file", ["output_dir={root}/a_file"], ["output_dir", "a_file", "not a directory"]),
    ("output-dir-under-a-file", ["output_dir={root}/a_file/run"], ["output_dir", "a_file", "is a file"]),
    ("cache-dir-is-a-file", ["cache_dir={root}/a_file"], ["cache_dir", "a_file", "not a directory"]),
    ("output-dir-unwritable", ["output_dir=/proc/sys/raydistill-run"],
     ["output_dir", "/proc/sys", "not writable", "allowed:"]),
    # corpus files
    ("corpus-binary-txt", ["data.path={root}/binary.txt"], ["data.path", "binary.txt", "not UTF-8", "allowed:"]),
    ("corpus-binary-no-suffix", ["data.path={root}/binary"], ["data.path", "binary'", "not UTF-8", "allowed:"]),
    ("corpus-nul-bytes", ["data.path={root}/nul.txt"], ["data.path", "nul.txt", "NUL bytes", "allowed:"]),
    ("corpus-directory", ["data.path={root}/corpus_dir"], ["data.path", "corpus_dir", "is a directory", "*.txt"]),
    ("corpus-corrupt-parquet", ["data.path={root}/corrupt.parquet"],
     ["data.path", "corrupt.parquet", "not a readable .parquet", "allowed:"]),
    ("corpus-bad-jsonl", ["data.path={root}/bad.jsonl"], ["data.path", "bad.jsonl:2", "not valid JSON", "allowed:"]),
    ("corpus-jsonl-no-text-field", ["data.path={root}/notext.jsonl"],
     ["data.text_field", "notext.jsonl:1", "'text'", "['body']"]),
    ("corpus-csv-no-column", ["data.path={root}/rows.csv"], ["data.text_field", "rows.csv", "'text'", "['body']"]),
    ("corpus-unsupported-type", ["data.path={root}/doc.docx"], ["data.path", "doc.docx", "'.docx'", "allowed:"]),
    ("validation-binary", ["data.path={root}/good.txt", "data.validation_path={root}/binary.txt"],
     ["data.validation_path", "binary.txt", "not UTF-8"]),
    ("prompts-binary", ["prompts.path={root}/prompts_binary.jsonl"],
     ["prompts.path", "prompts_binary.jsonl", "not UTF-8"]),
    ("prompts-json-not-list", ["prompts.path={root}/prompts.json"],
     ["prompts.path", "prompts.json", "list of objects"]),
    ("prompts-with-encoder", ["teacher.name=tiny-bert", "prompts.responses=dataset"],
     ["prompts", "need decoders", "encoder"]),
    # model folders
    ("teacher-truncated-safetensors", ["teacher.name={root}/truncated"],
     ["teacher.name", "model.safetensors is truncated", "header promises"]),
    ("teacher-no-weights", ["teacher.name={root}/no_weights"], ["teacher.name", "no weights", "allowed:"]),
    ("teacher-missing-shard", ["teacher.name={root}/missing_shard"],
     ["teacher.name", "model-00001-of-00002.safetensors", "missing"]),
    ("teacher-truncated-bin", ["teacher.name={root}/truncated_bin"],
     ["teacher.name", "pytorch_model.bin is truncated"]),
]

# Whole config files (not overrides): (id, file text, substrings).
FILE_CASES = [
    ("yaml-syntax", "teacher: [unclosed\n", ["not valid YAML"]),
    ("yaml-top-level-list", "- a\n- b\n", ["top level must be a mapping", "list"]),
    ("no-teacher", "name: x\n", ["teacher", "Field required"]),
    ("teacher-not-a-mapping", "teacher: tiny-gpt2\n", ["teacher", "'tiny-gpt2'", "valid dictionary"]),
    ("config-file-binary", b"\xff\xfe\x00binary", ["config file", "not UTF-8", "allowed: a YAML file"]),
]

# Sweep command lines: (id, extra arguments, substrings). The sweep file and its base are in the inputs folder.
SWEEP_CASES = [
    ("space-loguniform-zero", ["space.train.lr={loguniform: [0, 1]}"], ["space.train.lr", "loguniform needs low > 0",
                                                                         "got 0"]),
    ("space-unknown-path", ["space.train.lrr={choice: [1]}"], ["space.train.lrr", "not a config field", "lr_schedule"]),
    ("space-constant", ["space.train.lr=1e-3"], ["space.train.lr", "0.001", "constants belong under 'set'"]),
    ("space-primitive", ["space.train.lr={normal: [0, 1]}"], ["space.train.lr", "normal", "expected one of"]),
    ("space-low-high", ["space.train.lr={uniform: [1e-2, 1e-3]}"], ["space.train.lr", "needs low < high"]),
    ("space-overlap", ["space.train={choice: [{}]}"], ["space", "'train'", "'train.lr'", "overlap"]),
    ("sweep-unknown-key", ["nm_samples=2"], ["'nm_samples'", "not a sweep file key", "num_samples"]),
    ("sweep-config-key", ["train.lr=1e-4"], ["'train'", "not a sweep file key", "set.train.lr=1e-4"]),
    ("sweep-nested-unknown", ["scheduler.kindd=asha"], ["scheduler.kindd", "allowed: grace_period, kind"]),
    ("sweep-scheduler-kind", ["scheduler.kind=hyperband"], ["scheduler.kind", "'hyperband'", "'fifo', 'asha'"]),
    ("sweep-num-samples", ["num_samples=0"], ["num_samples", "got 0", "greater than or equal to 1"]),
    ("sweep-metric", ["metric=val/accuracy"], ["metric 'val/accuracy'", "never reported", "val/loss"]),
    ("sweep-eval-tasks", ["eval.tasks=nonsense"], ["eval.tasks 'nonsense'", "suites: builtin"]),
    ("sweep-eval-settings", ["eval.settings={epochs: 0}"], ["eval.settings", "epochs must be >= 1", "got 0"]),
    ("sweep-eval-settings-unknown", ["eval.settings={epoch: 2}"], ["eval.settings", "'epoch'"]),
    ("sweep-optuna-grid", ["search.algorithm=optuna", "space.train.lr={grid: [1e-3]}"], ["cannot expand grid"]),
    ("sweep-name", ["name=.."], ["name", "'..'", "not '.' or '..'"]),
    ("sweep-base-bad-value", ["set.train.lr=-1"], ["sweep base config", "train.lr", "got -1", "greater than 0"]),
    ("sweep-base-positions", ["set.data.block_size=1024"], ["sweep base config", "data.block_size", "at most 512"]),
    ("sweep-base-missing", ["base=nowhere.yaml"], ["base 'nowhere.yaml'", "not found"]),
    ("sweep-storage-is-a-file", ["storage_path={root}/a_file"], ["storage_path", "a_file", "not a directory"]),
]

# Other command lines: (id, argv builder, substrings).
CLI_CASES = [
    ("train-missing-file", lambda r: ["train", str(r / "missing.yaml")], ["config file", "missing.yaml", "not found"]),
    ("train-config-is-dir", lambda r: ["train", str(r)], ["config file", "is a directory"]),
    ("teacher-positions", lambda r: ["teacher", str(r / "base.yaml"), "data.block_size=1024"],
     ["data.block_size", "1024", "at most 512"]),
    ("sweep-no-file", lambda r: ["sweep"], ["give a sweep file, or --resume"]),
    ("sweep-file-and-resume", lambda r: ["sweep", str(r / "sweep.yaml"), "--resume", str(r)],
     ["either SWEEP_FILE or --resume"]),
    ("sweep-resume-not-a-sweep", lambda r: ["sweep", "--resume", str(r / "corpus_dir")],
     ["corpus_dir", "no sweep.yaml", "STORAGE_PATH/NAME"]),
    ("results-not-a-sweep", lambda r: ["results", str(r / "corpus_dir")], ["corpus_dir", "no sweep.yaml"]),
]


# ------------------------------------------------------------------------------------------- machinery
class RayStarted(AssertionError):
    pass


@pytest.fixture
def cli(monkeypatch, capsys, inputs):
    """Run ``raydistill ARGS`` in-process; return (exit status, stdout + stderr). Reaching ray.init fails."""
    import ray

    from raydistill import cli as cli_module
    from raydistill.train import launcher

    def no_ray(*a, **k):
        raise RayStarted("ray.init was reached: the input was not refused before Ray starts")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(launcher, "init_ray", no_ray)

    def run(args: list[str]) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["raydistill", *args])
        capsys.readouterr()
        code = 0
        try:
            cli_module.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        assert not ray.is_initialized()
        return code, captured.out + captured.err

    return run


def assert_refused(code: int, text: str, expected: list[str], inputs: Path) -> None:
    assert code == 2, f"exit status {code}, output:\n{text}"
    assert "Traceback" not in text, text
    assert text.lower().count("error") >= 1 and text.count("error:") <= 1, f"not one message:\n{text}"
    for part in expected:
        assert part in text, f"{part!r} not in the message:\n{text}"
    assert not (inputs / "out").exists(), "something was written to the output directory"
    assert not (inputs / "sweeps").exists(), "something was written to the storage path"


def _fill(items: list[str], root: Path) -> list[str]:
    return [s.replace("{root}", str(root)) for s in items]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
@pytest.mark.parametrize("command", ["train", "config"])
def test_bad_config(cli, inputs, case, command):
    _, overrides, expected = case
    code, text = cli([command, str(inputs / "base.yaml"), *_fill(overrides, inputs)])
    assert_refused(code, text, _fill(expected, inputs), inputs)


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
@pytest.mark.parametrize("command", ["train", "config"])
def test_bad_config_file(cli, inputs, tmp_path, case, command):
    _, body, expected = case
    path = tmp_path / "c.yaml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    code, text = cli([command, str(path)])
    assert_refused(code, text, expected, inputs)


@pytest.mark.parametrize("case", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_bad_sweep(cli, inputs, case):
    _, overrides, expected = case
    code, text = cli(["sweep", str(inputs / "sweep.yaml"), *_fill(overrides, inputs)])
    assert_refused(code, text, _fill(expected, inputs), inputs)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line(cli, inputs, case):
    _, argv, expected = case
    code, text = cli(argv(inputs))
    assert_refused(code, text, _fill(expected, inputs), inputs)


def test_the_table_is_large_and_distinct():
    ids = [c[0] for table in (CONFIG_CASES, FILE_CASES, SWEEP_CASES, CLI_CASES) for c in table]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


def test_good_inputs_pass_the_same_checks(cli, inputs):
    """The base config and sweep are fine: the cases fail for their own reason (train reaches ray.init)."""
    code, text = cli(["config", str(inputs / "base.yaml")])
    assert code == 0 and "# checked:" in text, text
    with pytest.raises(RayStarted):
        cli(["train", str(inputs / "base.yaml")])
    with pytest.raises(RayStarted):
        cli(["sweep", str(inputs / "sweep.yaml")])
    assert not (inputs / "out").exists() and not (inputs / "sweeps").exists()


def test_refused_in_a_subprocess_before_ray(inputs):
    """The real exit path: status 2, one line, no traceback, no Ray instance, nothing written."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "raydistill.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for args in (["train", str(inputs / "base.yaml"), "data.block_size=1024"],
                          ["sweep", str(inputs / "sweep.yaml"), f"set.data.path={inputs / 'binary.txt'}"])]
    for proc, expected in zip(procs, (["data.block_size", "1024", "at most 512"],
                                      ["sweep base config", "data.path", "binary.txt", "not UTF-8"])):
        out, err = proc.communicate(timeout=120)
        text = out + err
        assert proc.returncode == 2, text
        assert "Traceback" not in text and "Started a local Ray instance" not in text and "ray.init" not in text
        assert [line for line in err.splitlines() if line.startswith("error:")] and all(e in text for e in expected)
    assert not (inputs / "out").exists() and not (inputs / "sweeps").exists()
