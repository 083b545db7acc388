"""The numbers the step loop (``Worker._run``) writes into ``metrics.jsonl`` rows: the lr a step applied, terms
averaged over the row's interval, tokens summed over ranks, step times without evaluations or checkpoints, and
the terminal line's terms. The loop runs in-process with its heavy parts stubbed: no Ray cluster is started."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raydistill.monitoring.board import Monitor
from raydistill.train import worker as W
from raydistill.train.progress import HEADLINE, ProgressPrinter
from raydistill.train.worker import TOKENS_KEY, Worker


def _loop_worker(tmp_path: Path, world: int = 1, **train) -> Worker:
    """A Worker whose ``_run`` loop is real and whose build, step, evaluation, checkpoint and export are stubs."""
    w = Worker.__new__(Worker)
    w.cfg = SimpleNamespace(
        train=SimpleNamespace(**{**dict(max_steps=8, log_every=4, eval_every=0, checkpoint_every=0, report_every=0,
                                        nonfinite="stop", divergence="warn", divergence_factor=4.0,
                                        fail_at_step=None, precision="fp32"), **train}),
        scaling=SimpleNamespace(keep_freed_host_memory=False))
    w.plan = SimpleNamespace(mode="student")
    w.monitor = Monitor(run="loop", metrics=False)
    w.flops_per_token, w.rank, w.world, w.is_main = None, 0, world, True
    w.device, w.output_dir, w.attempt = torch.device("cpu"), tmp_path, None
    w.engine = SimpleNamespace(skipped_steps=0, global_steps=train.get("max_steps", 8))
    w.scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])
    w.build = lambda: None
    w.resume = lambda: 0
    w.micro_batches = lambda step: []
    w.evaluate = lambda: {"val/loss": 1.0, "val/ce": 1.0}
    w.checkpoint_and_report = lambda step, metrics: None
    w.export = lambda step: None
    return w


def _values(tokens_all_ranks: float) -> tuple[list[str], torch.Tensor]:
    keys = sorted(["loss", TOKENS_KEY])
    return keys, torch.tensor([1.0 if k == "loss" else tokens_all_ranks for k in keys])


def _rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def no_ray_report(monkeypatch):
    import ray.train

    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reports.append(metrics["step"]), raising=False)
    return reports


def test_each_row_logs_the_lr_its_step_applied_through_deepspeeds_engine(tmp_path, no_ray_report):
    """DeepSpeed's engine.step() runs the optimizer, then advances the schedule: the lr read after the step is
    the next step's. The row must carry the lr the optimizer used (recorded by a step pre-hook)."""
    from raydistill.bench.throughput import one_process_group
    from raydistill.train.ds_config import import_deepspeed
    from raydistill.train.schedule import lr_lambda

    deepspeed = import_deepspeed()
    max_steps = 6
    w = _loop_worker(tmp_path, max_steps=max_steps, log_every=1)
    applied = []
    with one_process_group(torch.device("cpu")):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        opt = W.adamw(W.param_groups(model, 0.01), SimpleNamespace(lr=1e-3, betas=(0.9, 0.98), eps=1e-6), "cpu")
        seen = []
        opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
                  "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
        # Linear decay with 2 warm-up steps: every step's lr differs from the next one's.
        schedule = lr_lambda("linear", max_steps, 2 / max_steps)
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=opt, config=config,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
        w.engine, w.scheduler = engine, scheduler

        def train_step(step, cpu, moved):
            engine.backward(engine(torch.randn(1, 4)).pow(2).mean())
            seen.clear()
            engine.step()
            assert len(set(seen)) == 1, seen  # (the hook may fire more than once: ZeRO's wrapper)
            applied.append(seen[0])
            return (*_values(3.0), 3)

        w.train_step = train_step
        w._run()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))
    assert len(applied) == max_steps
    assert [r["lr"] for r in rows] == pytest.approx(applied, rel=1e-12)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * schedule(k - 1) for k in range(1, max_steps + 1)])
    assert rows[-1]["lr"] > 0  # the last update was made at a non-zero lr


def test_a_relabelled_failing_rows_lr_is_its_own_steps(tmp_path, no_ray_report):
    """A non-finite loss read at the logging step names an earlier step: its row carries that step's lr."""
    from raydistill.train.faults import NonFiniteLoss

    w = _loop_worker(tmp_path, max_steps=8, log_every=4)
    lr = {"now": 1.0}
    w.scheduler = SimpleNamespace(get_last_lr=lambda: [lr["now"]])

    def train_step(step, cpu, moved):
        lr["now"] = float(step + 1)  # the schedule as DeepSpeed leaves it: advanced past this step
        keys, values = _values(3.0)
        if step == 2:
            values[keys.index("loss")] = float("nan")
        return keys, values, 3

    w.train_step = train_step
    with pytest.raises(NonFiniteLoss, match="step 2"):
        w._run()
    (row,) = _rows(tmp_path)
    assert row["step"] == 2 and row["lr"] == 2.0


def test_a_rows_terms_are_the_means_of_its_intervals_steps(tmp_path, no_ray_report):
    """A row summarises the steps since the previous one, as its tokens_per_s does: each term is the mean of
    those steps' values (over the steps that logged it), not the row step's own value."""
    w = _loop_worker(tmp_path, max_steps=10, log_every=4)

    def train_step(step, cpu, moved):
        terms = {"loss": float(step), TOKENS_KEY: 3.0}
        if step % 2 == 0:
            terms["on_policy"] = 1.0 / step  # a term not every step logs
        keys = sorted(terms)
        return keys, torch.tensor([terms[k] for k in keys]), 3

    w.train_step = train_step
    w._run()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [4, 8, 10]
    assert [r["loss"] for r in rows] == pytest.approx([2.5, 6.5, 9.5])  # mean(1..4), mean(5..8), mean(9, 10)
    assert [r["on_policy"] for r in rows] == pytest.approx([(1 / 2 + 1 / 4) / 2, (1 / 6 + 1 / 8) / 2, 1 / 10])


def test_tokens_per_s_sums_every_ranks_tokens_and_the_rank_series_keeps_its_own(tmp_path, monkeypatch,
                                                                               no_ray_report):
    """Ranks of prompt + response runs hold different non-padding counts: the row's rate is from their sum
    (reduced with the logged values), not this rank's count times the world size."""
    logged = []

    class Series:
        def __init__(self, *args, **kwargs):
            pass

        def log(self, metrics, terms, tokens, seconds):
            logged.append((metrics["step_time_s"], tokens, seconds))

        def duration(self, *args):
            pass

    monkeypatch.setattr(W, "RunMetrics", Series)
    monkeypatch.setattr(W.dist, "barrier", lambda: None)  # world 2 without a process group
    w = _loop_worker(tmp_path, world=2, max_steps=8, log_every=4)
    # This rank has 100 tokens a step, the other 40: the all-reduced count is 140.
    w.train_step = lambda step, cpu, moved: (*_values(140.0), 100)
    w._run()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:
        assert TOKENS_KEY not in r
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(140)  # tokens per step, all ranks
    for step_time, tokens, seconds in logged:
        assert tokens == 400  # this rank's 4 steps, in the row's window: its own rate for the rank's series
        assert seconds == pytest.approx(4 * step_time)


def test_step_time_leaves_out_evaluations_checkpoints_and_reports(tmp_path, monkeypatch, no_ray_report):
    """Each step takes 10 ms; an evaluation, a checkpoint and a Ray report 0.3 s each. No row's step time or
    rate may carry the evaluation, checkpoint or report before it."""
    import ray.train

    step_s, pause_s = 0.01, 0.3
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: time.sleep(pause_s), raising=False)
    w = _loop_worker(tmp_path, max_steps=12, log_every=4, eval_every=4, checkpoint_every=8)

    def train_step(step, cpu, moved):
        time.sleep(step_s)
        return (*_values(100.0), 100)

    def evaluate():
        time.sleep(pause_s)
        return {"val/loss": 1.0, "val/ce": 1.0}

    w.train_step, w.evaluate = train_step, evaluate
    w.checkpoint_and_report = lambda step, metrics: time.sleep(pause_s)
    w._run()
    rows = _rows(tmp_path)
    # Step 4: evaluation, then a report; step 8: evaluation and checkpoint. Either adds >= 75 ms to a step.
    assert [r["step"] for r in rows] == [4, 8, 12]
    for r in rows:
        assert step_s <= r["step_time_s"] < step_s + pause_s / 6, rows
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(100)


def test_train_step_reduces_the_steps_tokens_with_the_logged_values(tmp_path):
    """The step's non-padding tokens (main batch and streams, every micro-batch) ride in the values vector."""
    w = Worker.__new__(Worker)
    w.rank, w.world, w.device, w.teacher = 0, 1, torch.device("cpu"), None
    w.cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=2, seed=0, nonfinite="stop"))
    w.plan = SimpleNamespace(prompts=None)

    class Engine:
        module = SimpleNamespace(counts=lambda batch, streams: {})

        def __call__(self, batch, teacher, extras, streams, counts, share, host, host_streams):
            assert host is batch and host_streams is streams  # on a CPU run, the host batches are the step's own
            loss = torch.tensor(2.0, requires_grad=True) * share
            return loss, {"loss": loss.detach()}

        def backward(self, loss):
            pass

        def step(self):
            pass

    w.engine = Engine()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    micro = [({"attention_mask": mask}, {"lm": {"attention_mask": mask[:1]}})] * 2
    keys, values, tokens = w.train_step(1, micro, micro)
    reduced = dict(zip(keys, values.tolist()))
    assert tokens == 2 * (5 + 3)
    assert reduced[TOKENS_KEY] == tokens and reduced["loss"] == pytest.approx(2.0)


def test_the_terminal_line_shows_every_objectives_term_and_its_stream_form(tmp_path, capsys):
    from raydistill.objectives import REGISTRY

    assert set(REGISTRY) <= set(HEADLINE)
    p = ProgressPrinter(tmp_path / "metrics.jsonl", max_steps=4, start_step=0, enabled=True, tensorboard=False)
    p.log({"step": 1, "loss": 1.0, "iit_cosine": 0.5, "lm/iit_cosine": 0.25, "iit_cosine/layer0": 0.125,
           "lr": 1e-3, "tokens_per_s": 10.0, "step_time_s": 0.1})
    p.close()
    line = capsys.readouterr().out
    assert "iit_cosine 0.5 " in line and "lm/iit_cosine 0.25 " in line
    assert "iit_cosine/layer0" not in line  # an objective's sub-log stays in metrics.jsonl
