"""The teacher cache: its key, its files and manifest, the filled signals against the online teacher on the
batches the workers build, training from it against training online, damaged and partial caches, refusals."""

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from raydistill.config import load_config
from raydistill.data.blocks import BatchSampler
from raydistill.errors import ConfigError
from raydistill.models.loading import build_model
from raydistill.objectives import build_objectives
from raydistill.objectives.teacher_signals import teacher_topk
from raydistill.train import teacher_cache as TC
from raydistill.train.faults import RunFailure
from raydistill.train.plan import prepare
from raydistill.train.step import MODEL_INPUTS, DistillModule


def _cfg(tmp_path, cache_dir, *extra, preset="tiny-gpt2"):
    return load_config(None, [
        f"teacher.name={preset}", "student.num_layers=1", f"output_dir={tmp_path}/run", f"cache_dir={cache_dir}",
        "data.builtin.num_documents=200", "data.block_size=32", "train.batch_size=2", "train.grad_accum=2",
        "train.max_steps=3", "train.eval_batches=2", "scaling.num_workers=2", "objectives.task.weight=0",
        "objectives.kd.weight=1", "objectives.kd.top_k=8", "teacher_cache.top_k=16", "teacher_cache.dtype=float32",
        f"teacher_cache.uri={tmp_path}/tc", *extra])


def _key(cfg, plan=None):
    return TC.cache_key(TC.ingredients(cfg, plan or prepare(cfg)))


def _teacher(cfg, plan):
    torch.manual_seed(cfg.train.seed)  # the workers' random-init teacher
    return build_model(plan.teacher_config, plan.teacher_source).eval()


def test_key_changes_with_each_ingredient_and_nothing_else(tmp_path, cache_dir):
    base = _cfg(tmp_path, cache_dir)
    plan = prepare(base)
    k0 = _key(base, plan)
    same = ["train.lr=0.1", "train.max_steps=7", "train.eval_batches=5", "objectives.kd.weight=0.5",
            "objectives.task.weight=0.5", "student.num_layers=2", "teacher_cache.max_gb=1", "train.log_every=1",
            f"teacher_cache.uri={tmp_path}/elsewhere", "data.mlm_probability=0.3", f"output_dir={tmp_path}/other"]
    for item in same:
        assert _key(_cfg(tmp_path, cache_dir, item)) == k0, item
    differ = ["teacher.config_overrides.n_layer=2", "train.precision=bf16", "tokenizer.vocab_size=300",
              "data.builtin.seed=1", "data.block_size=16", "train.seed=1", "train.batch_size=4", "train.grad_accum=1",
              "scaling.num_workers=1", "teacher_cache.top_k=32", "teacher_cache.dtype=float16",
              "teacher.torch_dtype=bfloat16", "teacher.attn_implementation=eager"]
    keys = {item: _key(_cfg(tmp_path, cache_dir, item)) for item in differ}
    assert k0 not in keys.values() and len(set(keys.values())) == len(differ), keys
    # A teacher directory: its weight files' size and mtime identify it.
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    (teacher_dir / "model.safetensors").write_bytes(b"x" * 10)
    local = copy.copy(plan)
    local.teacher_source = str(teacher_dir)
    k1 = _key(base, local)
    (teacher_dir / "model.safetensors").write_bytes(b"y" * 11)
    assert k1 != k0 and _key(base, local) != k1
    # Encoders: the masking probability shapes the batches.
    bert = _cfg(tmp_path, cache_dir, "objectives.kd.top_k=null", preset="tiny-bert")
    assert _key(bert) != _key(_cfg(tmp_path, cache_dir, "objectives.kd.top_k=null", "data.mlm_probability=0.3",
                                   preset="tiny-bert"))


def test_filled_signals_equal_online_topk_on_the_workers_batches(tmp_path, cache_dir):
    """tiny-bert: MLM masking is part of the batch; every (step, micro-batch, rank) and the validation batches."""
    cfg = _cfg(tmp_path, cache_dir, "objectives.kd.top_k=null", "objectives.task.weight=1", preset="tiny-bert")
    plan = prepare(cfg)
    # kd without top_k reads the full logits: nothing to cache, the teacher runs as before.
    assert TC.attach(cfg, plan).teacher_cache is None
    cfg = _cfg(tmp_path, cache_dir, preset="tiny-bert")
    plan = TC.attach(cfg, prepare(cfg))
    half_cfg = _cfg(tmp_path, cache_dir, "teacher_cache.dtype=float16", preset="tiny-bert")
    half = TC.attach(half_cfg, prepare(half_cfg)).teacher_cache
    assert plan.teacher_cache.online == [] and plan.teacher_cache.stats["computed_files"] == 8
    teacher, t = _teacher(cfg, plan), cfg.train
    for rank in range(2):
        # The samplers as Worker.build makes them.
        common = dict(batch_size=t.batch_size, rank=rank, world_size=2, seed=t.seed,
                      mlm_probability=cfg.data.mlm_probability)
        train = BatchSampler(plan.blocks[0], plan.token_info, grad_accum=t.grad_accum, **common)
        val = BatchSampler(plan.blocks[1], plan.token_info, grad_accum=1, **common)
        reader, half_reader = TC.Reader(plan.teacher_cache, rank), TC.Reader(half, rank)
        items = [(step, micro, train.batch(step, micro)) for step in (1, 2, 3) for micro in (0, 1)]
        items += [(0, n, b) for n, b in enumerate(val.eval_batches(t.eval_batches, seed=t.seed))]
        for step, micro, batch in items:
            with torch.no_grad():
                online = teacher_topk(teacher(**{k: batch[k] for k in MODEL_INPUTS}).logits, 8)
            cached = reader.signals(batch, step, micro)
            assert cached[TC.IDS].dtype == torch.int32
            assert torch.equal(cached[TC.IDS].long(), online.ids), (step, micro, rank)
            assert torch.equal(cached[TC.LOGPROBS], online.logprobs), (step, micro, rank)
            stored = half_reader.signals(batch, step, micro)
            assert torch.equal(stored[TC.LOGPROBS], online.logprobs.half())
    assert (batch["input_ids"] == plan.token_info.mask_id).any()  # the batches were masked


def _train(cfg, plan, teacher, reader, student):
    """The workers' loop for rank 0 of one worker: micro-batches, per-micro seeds, one optimiser step each."""
    t = cfg.train
    module = DistillModule(student, build_objectives(plan.objectives, plan.info), plan.info)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    data = BatchSampler(plan.blocks[0], plan.token_info, batch_size=t.batch_size, grad_accum=t.grad_accum, rank=0,
                        world_size=1, seed=t.seed)
    losses = []
    for step in range(1, t.max_steps + 1):
        for micro in range(t.grad_accum):
            batch = data.batch(step, micro)
            if reader is not None:
                batch = reader.signals(batch, step, micro)
            torch.manual_seed(step * 10 + micro)  # dropout: the same on both sides
            loss, _ = module(batch, teacher)
            (loss / t.grad_accum).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


TD = ["objectives.kd.weight=0", "objectives.td.weight=1", "objectives.td.action_space={kind: top_k, k: 12}"]


@pytest.mark.parametrize("dtype,objective", [("float32", []), ("float16", []), ("float32", TD)])
def test_training_from_the_cache_gives_the_online_losses(tmp_path, cache_dir, dtype, objective):
    cfg = _cfg(tmp_path, cache_dir, "scaling.num_workers=1", f"teacher_cache.dtype={dtype}", *objective)
    plan = TC.attach(cfg, prepare(cfg))
    teacher = _teacher(cfg, plan)
    torch.manual_seed(1)
    student = build_model(plan.student_config, None)
    online = _train(cfg, plan, teacher, None, copy.deepcopy(student))
    cached = _train(cfg, plan, None, TC.Reader(plan.teacher_cache, 0), copy.deepcopy(student))
    if dtype == "float32":
        assert cached == online  # exact: the same signals by the same function
    else:  # each log-probability rounded to float16 (relative error <= 2^-11, ~0.004 at log p = -8): the KL of
        # a near-uniform random student moves by a few 1e-6
        assert cached != online and cached == pytest.approx(online, rel=2e-3, abs=1e-5)


def test_mixed_objectives_keep_the_teacher_online_for_the_rest(tmp_path, cache_dir):
    cfg = _cfg(tmp_path, cache_dir, "scaling.num_workers=1", "objectives.cosine.weight=1")
    plan = TC.attach(cfg, prepare(cfg))
    assert plan.teacher_cache.online and "hidden states" in plan.teacher_cache.online[0]
    teacher = _teacher(cfg, plan)
    module = DistillModule(build_model(plan.student_config, None), build_objectives(plan.objectives, plan.info),
                           plan.info, plan.block_paths).eval()
    batch = BatchSampler(plan.blocks[0], plan.token_info, batch_size=2, grad_accum=2, rank=0, world_size=1,
                         seed=cfg.train.seed).batch(1, 0)
    with torch.no_grad():
        online = module(batch, teacher)[1]
        cached = module(TC.Reader(plan.teacher_cache, 0).signals(batch, 1, 0), teacher)[1]
    assert cached["kd"] == online["kd"] and cached["cosine"] == online["cosine"]


def test_damaged_missing_and_unlisted_files_are_computed_again(tmp_path, cache_dir):
    cfg = _cfg(tmp_path, cache_dir)
    plan = TC.attach(cfg, prepare(cfg))
    root = Path(plan.teacher_cache.root)
    manifest = json.loads((root / TC.MANIFEST).read_text())
    original = {name: (root / name).read_bytes() for name in manifest["entries"]}
    assert len(original) == 8 and all(hashlib.sha256(b).hexdigest() == manifest["entries"][n]["sha256"]
                                      for n, b in original.items())
    truncated, flipped, unlisted, deleted = "train/0000001/r000.npz", "train/0000002/r001.npz", \
        "train/0000003/r000.npz", "val/0000000/r001.npz"
    (root / truncated).write_bytes(original[truncated][:100])
    data = bytearray(original[flipped])
    data[len(data) // 2] ^= 0xFF
    (root / flipped).write_bytes(bytes(data))
    (root / deleted).unlink()
    # A fill that crashed after writing a file but before listing it.
    del manifest["entries"][unlisted]
    (root / TC.MANIFEST).write_text(json.dumps(manifest))
    # A worker reading a damaged file stops, naming it.
    batch = {"input_ids": torch.zeros(2, 32, dtype=torch.long)}
    with pytest.raises(RunFailure, match=r"0000002/r001\.npz is damaged"):
        TC.Reader(plan.teacher_cache, 1).signals(batch, 2, 0)
    with pytest.raises(RunFailure, match=r"0000003/r000\.npz is not listed"):
        TC.Reader(plan.teacher_cache, 0).signals(batch, 3, 0)
    again = TC.attach(cfg, prepare(cfg)).teacher_cache.stats
    assert (again["computed_files"], again["reused_files"]) == (4, 4)
    assert {n: (root / n).read_bytes() for n in original} == original  # recomputed identically


def test_refusals_name_the_fields(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"holds the top 4 tokens per position, but objectives.kd \(8\) need the "
                                          r"top 8 \(objectives.kd.top_k.*raise teacher_cache.top_k to at least 8"):
        prepare(_cfg(tmp_path, cache_dir, "teacher_cache.top_k=4"))
    # (3 steps x 2 micro-batches + 2 validation batches) x 2 rows x 2 workers x 32 positions x 16 x (4 + 4) bytes
    with pytest.raises(ConfigError, match=r"teacher_cache.max_gb 1e-06: the cache would hold 0.000131 GB \(1,024 "
                                          r"positions x 128 bytes"):
        _cfg(tmp_path, cache_dir, "teacher_cache.max_gb=0.000001")
    with pytest.raises(ConfigError, match="teacher_cache: .*prompts is set"):
        _cfg(tmp_path, cache_dir, "prompts.builtin.num_examples=20")
    cfg = _cfg(tmp_path, cache_dir, "train.max_steps=1")
    plan = TC.attach(cfg, prepare(cfg))
    manifest = Path(plan.teacher_cache.root) / TC.MANIFEST
    data = json.loads(manifest.read_text())
    data["ingredients"]["seed"] = 7
    manifest.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="other ingredients"):
        TC.attach(cfg, prepare(cfg))


def test_cache_on_s3(tmp_path, cache_dir, s3_server):
    cfg = _cfg(tmp_path, cache_dir, "train.max_steps=1", "scaling.num_workers=1",
               f"teacher_cache.uri=s3://bucket/sweep/teacher_cache?{s3_server}")
    plan = TC.attach(cfg, prepare(cfg))
    assert plan.teacher_cache.root.startswith("s3://bucket/sweep/teacher_cache/")
    assert TC.attach(cfg, prepare(cfg)).teacher_cache.stats["reused_files"] == 2
    local_cfg = _cfg(tmp_path, cache_dir, "train.max_steps=1", "scaling.num_workers=1")
    local = TC.attach(local_cfg, prepare(local_cfg)).teacher_cache
    batch = {"input_ids": torch.zeros(2, 32, dtype=torch.long)}
    remote_sig = TC.Reader(plan.teacher_cache, 0).signals(batch, 1, 1)
    local_sig = TC.Reader(local, 0).signals(batch, 1, 1)
    assert all(torch.equal(remote_sig[k], local_sig[k]) for k in (TC.LOGPROBS, TC.IDS))


def test_a_sweep_keeps_its_cache_in_its_storage_and_sums_what_trials_read(tmp_path, capsys):
    from raydistill.sweep.spec import load_sweep

    base = {"teacher": {"name": "tiny-gpt2"}, "objectives": {"kd": {"weight": 1.0, "top_k": 8}},
            "train": {"max_steps": 10, "batch_size": 2, "grad_accum": 3}, "data": {"block_size": 16},
            "scaling": {"num_workers": 2}, "teacher_cache": {"top_k": 8}}
    for storage, expected in [(str(tmp_path / "sweeps"), f"{tmp_path}/sweeps/s/teacher_cache"),
                              ("s3://bucket/sw?region=x", "s3://bucket/sw/s/teacher_cache?region=x")]:
        sweep = load_sweep(None, [], data={"name": "s", "base": base, "storage_path": storage,
                                           "space": {"train.lr": {"choice": [1e-3, 2e-3]}}})
        assert sweep.base_config().teacher_cache.uri == expected
        assert sweep.trial_config({"train.lr": 1e-3}, output_dir="x", name="t1").teacher_cache.uri == expected
    cfg = sweep.base_config()
    use = TC.CacheUse(root="r", key="k", top_k=8, dtype="float16",
                      stats={"computed_files": 22, "reused_files": 0, "teacher_forwards": 64, "fill_s": 1.5})
    rows = [{"step": 10, "teacher_cache/computed_files": 0}, {"step": 4}]  # the second one stopped early
    out = TC.sweep_reuse(cfg, use, rows)
    # 14 steps x 3 micro-batches x 2 rows x 16 positions x 2 workers
    assert out["steps_read"] == 14 and out["tokens_read"] == 14 * 3 * 2 * 16 * 2 and out["files_computed"] == 22
    assert "trials read 14 steps (2,688 tokens)" in capsys.readouterr().out


TAIL = ["objectives.kd.top_k=8", "objectives.kd.tail_samples=4", "teacher_cache.top_k=8",
        "teacher_cache.tail_samples=4", "teacher_cache.tail_temperature=2"]  # kd's temperature (2 by default)


def test_tail_samples_filled_equal_the_steps_online_draw_and_train_alike(tmp_path, cache_dir):
    """kd with tail samples: the fill stores the samples the training step draws (seeded by the step's seed,
    ``step_seed(train.seed, step)``; validation: step 0) on every worker's batches, and training from the cache
    gives the online losses bit for bit."""
    from raydistill.data.blocks import step_seed
    from raydistill.objectives.teacher_signals import teacher_tail

    cfg = _cfg(tmp_path, cache_dir, *TAIL)
    plan = TC.attach(cfg, prepare(cfg))
    assert plan.teacher_cache.tail_samples == 4 and plan.teacher_cache.online == []
    teacher, t = _teacher(cfg, plan), cfg.train
    for rank in range(2):
        common = dict(batch_size=t.batch_size, rank=rank, world_size=2, seed=t.seed)
        train = BatchSampler(plan.blocks[0], plan.token_info, grad_accum=t.grad_accum, **common)
        val = BatchSampler(plan.blocks[1], plan.token_info, grad_accum=1, **common)
        reader = TC.Reader(plan.teacher_cache, rank)
        items = [(step, micro, train.batch(step, micro)) for step in (1, 3) for micro in (0, 1)]
        items += [(0, n, b) for n, b in enumerate(val.eval_batches(t.eval_batches, seed=t.seed))]
        for step, micro, batch in items:
            with torch.no_grad():
                logits = teacher(**{k: batch[k] for k in MODEL_INPUTS}).logits
            online = teacher_tail(logits, teacher_topk(logits, 8).ids, 4, batch["input_ids"], step_seed(t.seed, step),
                                  2.0)
            cached = reader.signals(batch, step, micro)
            assert torch.equal(cached[TC.TAIL_IDS].long(), online.ids), (step, micro, rank)
            assert torch.equal(cached[TC.TAIL_LOGPROBS], online.logprobs), (step, micro, rank)
            assert torch.equal(cached[TC.TAIL_LOG_MASS], online.log_mass), (step, micro, rank)
    # Training: the workers' per-step seed reaches the step as extras["step_seed"].
    cfg = _cfg(tmp_path, cache_dir, *TAIL, "scaling.num_workers=1")
    plan = TC.attach(cfg, prepare(cfg))
    teacher = _teacher(cfg, plan)
    torch.manual_seed(1)
    student = build_model(plan.student_config, None)
    module = DistillModule(student, build_objectives(plan.objectives, plan.info), plan.info).eval()  # no dropout
    data = BatchSampler(plan.blocks[0], plan.token_info, batch_size=2, grad_accum=2, rank=0, world_size=1,
                        seed=cfg.train.seed)
    reader = TC.Reader(plan.teacher_cache, 0)
    for step, micro in ((1, 0), (2, 1), (3, 0)):
        batch, extras = data.batch(step, micro), {"step_seed": step_seed(cfg.train.seed, step)}
        with torch.no_grad():
            online = module(batch, teacher, extras)[0]
            cached = module(reader.signals(batch, step, micro), None, extras)[0]
        assert torch.equal(online, cached), step


def test_tail_samples_key_bytes_and_refusals(tmp_path, cache_dir):
    base = _cfg(tmp_path, cache_dir)
    plan = prepare(base)
    assert "tail_samples" not in TC.ingredients(base, plan)  # caches without samples keep their keys
    with_samples = _cfg(tmp_path, cache_dir, *TAIL)
    stored_only = _cfg(tmp_path, cache_dir, "objectives.kd.top_k=8", "teacher_cache.top_k=8",
                       "teacher_cache.tail_samples=8")  # stored, not read: allowed
    at_two = _cfg(tmp_path, cache_dir, "objectives.kd.top_k=8", "teacher_cache.top_k=8",
                  "teacher_cache.tail_samples=8", "teacher_cache.tail_temperature=2")
    assert len({_key(with_samples), _key(base, plan), _key(stored_only), _key(at_two)}) == 4
    # (8 + 4) x (float32 + int32) bytes per position, and the tail's float32 log-mass.
    assert with_samples.teacher_cache.bytes_per_token() == 100
    with pytest.raises(ConfigError, match=r"would hold 0.000102 GB \(1,024 positions x 100 bytes: \(top_k 8 \+ "
                                          r"tail_samples 4\) x \(float32 value \+ int32 id\) \+ the tail mass\)"
                                          r".*teacher_cache.tail_samples"):
        _cfg(tmp_path, cache_dir, *TAIL, "teacher_cache.max_gb=0.0001")
    few = _cfg(tmp_path, cache_dir, *TAIL[:-1], "teacher_cache.tail_samples=2")
    with pytest.raises(ConfigError, match=r"holds 2 tail samples per position, but objectives.kd read 4 "
                                          r"\(objectives.kd.tail_samples\): set teacher_cache.tail_samples to 4, "
                                          r"teacher_cache.top_k to 8 and teacher_cache.tail_temperature to 2"):
        prepare(few)  # refused where the plan is made, before any fill
    for other in ("teacher_cache.tail_samples=8", "teacher_cache.top_k=16", "teacher_cache.tail_temperature=1"):
        cfg = _cfg(tmp_path, cache_dir, *TAIL, other)
        with pytest.raises(ConfigError, match=r"drawn outside its top (8|16) at temperature (1|2), but objectives.kd "
                                              r"read 4 drawn outside the top 8 at temperature 2 .*set "
                                              r"teacher_cache.tail_samples to 4, teacher_cache.top_k to 8 and "
                                              r"teacher_cache.tail_temperature to 2"):
            prepare(cfg)
    # A cache without samples serves kd without them; its stored samples are not read by top-K-only kd.
    cfg = _cfg(tmp_path, cache_dir, "objectives.kd.top_k=8", "teacher_cache.top_k=8", "teacher_cache.tail_samples=4",
               "train.max_steps=1")
    use = TC.attach(cfg, prepare(cfg)).teacher_cache
    assert use.tail_samples == 0
    assert TC.TAIL_IDS not in TC.Reader(use, 0).signals({"input_ids": torch.zeros(2, 32, dtype=torch.long)}, 1, 0)
