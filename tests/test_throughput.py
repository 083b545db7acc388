"""The pieces of the fast training loop and of ``bench throughput``: the batch prefetcher, logged values read
once per logging interval, FLOP counting and MFU arithmetic (all in-process, on tiny models)."""

from __future__ import annotations

import itertools
import math
import threading
import time

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from raydistill.bench.throughput import (BareLoop, EngineLoop, _side, bench_config, bench_throughput, interleaved,
                                         median_interval, one_process_group, paired_ratio, round_ratios, steal_share)
from raydistill.errors import ConfigError
from raydistill.data.blocks import BatchSampler, Blocks, TokenInfo
from raydistill.monitoring.metrics import (PEAK_FLOPS, counted_flops, flops_per_token, measured_gemm_flops, mfu,
                                           peak_flops, peak_flops_of, peak_memory_bytes)
from raydistill.train.prefetch import Prefetcher
from raydistill.train.worker import Worker


def _sampler(grad_accum: int = 2) -> BatchSampler:
    # An encoder's batches: MLM masking is random (keyed per row), so equal batches mean the same draws.
    blocks = Blocks(np.arange(40 * 12, dtype=np.int64).reshape(40, 12) % 300 + 10,
                    np.array([12, 9] * 20, dtype=np.int32))
    info = TokenInfo(is_encoder=True, vocab_size=400, pad_id=0, mask_id=3, special_ids=(0, 1, 2))
    return BatchSampler(blocks, info, batch_size=4, grad_accum=grad_accum, rank=0, world_size=1, seed=5)


def test_prefetched_batches_equal_the_ones_built_in_place_in_step_order():
    sampler, direct = _sampler(), _sampler()

    def make(step):
        return [(sampler.batch(step, micro), {"lm": sampler.batch(step + 100, micro)}) for micro in (0, 1)]

    with Prefetcher(make, range(3, 12), depth=2) as prefetch:
        for step in range(3, 12):
            cpu, moved = prefetch.get(step)
            assert moved is cpu  # on CPU the built batches are the device batches
            for micro, (batch, streams) in enumerate(cpu):
                want = direct.batch(step, micro)
                assert batch.keys() == want.keys()
                assert all(torch.equal(batch[k], want[k]) for k in want)
                assert torch.equal(streams["lm"]["labels"], direct.batch(step + 100, micro)["labels"])


def test_asking_out_of_order_or_past_the_end_is_an_error():
    with Prefetcher(lambda k: {"x": torch.tensor([k])}, [1, 2]) as prefetch:
        with pytest.raises(RuntimeError, match="asked for 2, the next built is 1"):
            prefetch.get(2)
        assert prefetch.get(2)[0]["x"].item() == 2
        with pytest.raises(RuntimeError, match="after the last key"):
            prefetch.get(3)


def test_an_error_while_building_reaches_the_consumer_at_its_key():
    def make(key):
        if key == 3:
            raise ValueError("bad shard at 3")
        return {"x": torch.full((2,), key)}

    with Prefetcher(make, range(1, 10)) as prefetch:
        assert prefetch.get(1)[0]["x"].tolist() == [1, 1]
        assert prefetch.get(2)[0]["x"].tolist() == [2, 2]
        with pytest.raises(ValueError, match="bad shard at 3"):
            prefetch.get(3)


def test_close_stops_a_thread_blocked_on_a_full_queue():
    built = []
    prefetch = Prefetcher(lambda k: built.append(k) or {"x": torch.tensor([k])}, itertools.count(1), depth=2)
    prefetch.get(1)
    deadline = time.time() + 2
    while len(built) < 3 and time.time() < deadline:  # it builds ahead: up to depth items wait in the queue
        time.sleep(0.01)
    assert len(built) >= 3
    prefetch.close()
    assert not prefetch._thread.is_alive()
    assert len(built) <= 5  # bounded: it never ran ahead of the queue
    assert not [t for t in threading.enumerate() if t.name == "raydistill-prefetch" and t is prefetch._thread]


def _worker() -> Worker:
    worker = Worker.__new__(Worker)
    worker.world, worker.device = 1, torch.device("cpu")
    return worker


def test_logged_values_read_once_per_interval_equal_the_per_step_reads():
    """The loop keeps each step's reduced values on the device and reads them at the logging interval; the
    values, their keys and non-finite ones (which the guard must see at their own step) come back unchanged."""
    worker = _worker()
    steps = [
        {"loss": torch.tensor(2.5), "kd": torch.tensor(0.125), "task": torch.tensor(3.0)},
        {"loss": torch.tensor(float("nan")), "kd": torch.tensor(float("nan")), "task": torch.tensor(1.5)},
        {"loss": torch.tensor(1.0), "kd": torch.tensor(0.25), "task": torch.tensor(1.75), "lm/kd": torch.tensor(4.0)},
    ]
    pending = []
    for n, logs in enumerate(steps, 7):
        keys, vec = worker._all_reduce_vector(logs)
        pending.append((n, keys, vec, n != 8))
    read = worker._read(pending)
    assert [(s, applied) for s, _, applied in read] == [(7, True), (8, False), (9, True)]
    for (_, values, _), logs in zip(read, steps):
        before = worker._all_reduce_sum(logs)  # the per-step read the loop used to do
        assert values.keys() == before.keys() == logs.keys()
        for k in logs:
            assert values[k] == before[k] or (math.isnan(values[k]) and math.isnan(before[k]))
    assert read[0][1] == {"loss": 2.5, "kd": 0.125, "task": 3.0}
    assert math.isnan(read[1][1]["kd"]) and read[1][1]["task"] == 1.5
    assert worker._read([]) == []


def test_counted_flops_match_the_hand_count_of_a_distillation_step():
    """6N per token for the student's forward and backward, 2N for the teacher's forward, plus attention's
    QK^T and AV (4 T d per block forward, three times that with backward), N the matmul parameters (the tied
    output head included)."""
    torch.manual_seed(0)
    v, t, b = 512, 32, 2

    def gpt2(layers):
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=64, vocab_size=v))

    student, teacher = gpt2(2), gpt2(4).eval()
    ids = torch.randint(0, v, (b, t))

    def step():
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        logits = student(input_ids=ids).logits
        loss = torch.nn.functional.kl_div(logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True)
        loss.backward()

    def matmul_params(layers):  # per block: qkv 3d^2, out d^2, MLP 8d^2 (weights; biases are not multiplies)
        return layers * 12 * 64 * 64 + v * 64

    hand = 6 * matmul_params(2) + 2 * matmul_params(4) + (12 * 2 + 4 * 4) * 64 * t
    counted = counted_flops(step) / (b * t)
    assert counted == pytest.approx(hand, rel=0.01)
    estimate = flops_per_token(student, teacher, (2, 4), (64, 64), t, teacher_runs=True)
    assert estimate == pytest.approx(hand, rel=0.02)  # biases counted as parameters there: within 2%


def test_mfu_and_the_bench_columns_from_timed_windows():
    assert mfu(2e6, 1000.0, 4e9) == pytest.approx(0.5)
    assert mfu(2e6, 1000.0, None) is None
    # Three 5-step windows: step time and tokens/s are medians over windows.
    side = _side([(1.0, 1000), (2.0, 1000), (1.5, 1200)], 5, fpt=1e6, peak=1e10, memory=123)
    assert side["step_time_s"] == pytest.approx(1.5 / 5)
    assert side["tokens_per_s"] == pytest.approx(800.0)
    assert side["flops_per_s"] == pytest.approx(8e8)
    assert side["mfu"] == pytest.approx(0.08)
    assert side["peak_memory_bytes"] == 123 and side["windows"] == 3


def test_steal_is_the_hypervisors_share_of_the_cpu_time_between_two_readings():
    from collections import namedtuple

    # Linux's fields (psutil): guest time is already inside user and nice, so it is not counted twice.
    Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")
    before = Times(100, 0, 20, 500, 1, 0, 1, 10, 5, 0)
    after = Times(160, 0, 30, 520, 1, 0, 1, 20, 35, 0)  # 60 + 10 + 20 + 10 = 100 s elapsed, 10 s of it stolen
    assert steal_share(before, after) == pytest.approx(0.10)
    assert steal_share(before, before) is None  # no time elapsed
    Mac = namedtuple("Mac", "user nice system idle")
    assert steal_share(Mac(1, 0, 1, 1), Mac(2, 0, 2, 2)) is None  # no steal reported


def test_each_round_compares_its_framework_run_with_the_bare_runs_on_either_side():
    # B F B F B: bare windows drift from 1.0 s to 1.2 s; each framework run sits between two bare runs.
    bare = [[1.0, 1.0, 1.0], [1.1, 1.1, 1.1], [1.2, 1.2, 1.3]]
    framework = [[1.10, 1.05, 2.00], [1.20, 1.15, 1.18]]
    assert round_ratios(bare, framework) == pytest.approx([1.10 / 1.05, 1.18 / 1.15])


def test_the_ratio_interval_holds_the_median_and_narrows_with_more_pairs():
    rng = np.random.default_rng(0)
    few, many = list(1.03 + 0.06 * rng.standard_normal(8)), list(1.03 + 0.06 * rng.standard_normal(200))
    for values in (few, many):
        low, high = median_interval(values)
        assert low <= float(np.median(values)) <= high
    assert np.subtract(*median_interval(many)[::-1]) < np.subtract(*median_interval(few)[::-1]) / 2
    assert median_interval(few[:4]) is None  # too few pairs to say


def test_interleaved_windows_take_turns_on_the_same_batches_and_drop_the_warm_up():
    calls = []

    class Recording:
        def __init__(self, name):
            self.name = name

        def window(self, first, window):
            calls.append((self.name, first, window))
            return float(len(calls)), 10 * window

    a, b = interleaved([Recording("a"), Recording("b")], steps=10, window=5)
    assert calls == [("a", 1, 5), ("b", 1, 5), ("a", 6, 5), ("b", 6, 5), ("a", 11, 5), ("b", 11, 5)]
    assert a == [(3.0, 50), (5.0, 50)] and b == [(4.0, 50), (6.0, 50)]
    # Ratios of back-to-back windows, then their median: 6/5, 4/3 and 9/1 -> 4/3.
    assert paired_ratio([(4.0, 0), (6.0, 0), (9.0, 0)], [(3.0, 0), (5.0, 0), (1.0, 0)]) == pytest.approx(4 / 3)


def test_the_bench_deepspeed_side_trains_the_bare_loop_step(tmp_path):
    """EngineLoop is the same step through DeepSpeed's engine (ZeRO-2, clipping): same losses, same weights."""
    cfg = bench_config(str(tmp_path / "run"), str(tmp_path / "cache"), teacher="tiny-gpt2", teacher_overrides={},
                       student_layers=2, batch_size=2, block_size=32, precision="fp32", objectives=("task", "kd"),
                       zero_stage=2, steps=2, window=1, use_gpu=False)
    device = torch.device("cpu")
    with one_process_group(device):
        bare, engine = BareLoop(cfg, device), EngineLoop(cfg, device)
        for n in (1, 2, 3):
            torch.manual_seed(n)  # the same dropout masks on both sides
            tokens = bare.step(n)
            torch.manual_seed(n)
            assert engine.step(n) == tokens
        for (name, p), q in zip(bare.module.named_parameters(), engine.engine.module.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("item, option", [("train.batch_size=4", "--batch-size"), ("deepspeed.zero_stage=0",
                                          "--zero-stage"), ("objectives.kd.weight=0.5", "--objectives"),
                                          ("output_dir=/tmp/x", "any other config key"),
                                          ("ray.address=auto", "any other config key"),
                                          ("train.eval_every=5", "any other config key")])
def test_set_refuses_what_the_bench_sets_itself_before_anything_runs(item, option):
    with pytest.raises(ConfigError, match=rf"--set '{item}'.*allowed: .*{option}"):
        bench_throughput(overrides=(item,))
    with pytest.raises(ConfigError, match="rounds: 0"):
        bench_throughput(rounds=0)


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 67e12), ("NVIDIA H100 PCIe", 756e12, 51e12), ("NVIDIA H100 NVL", 835e12, 60e12),
    ("NVIDIA H200", 989e12, 67e12), ("NVIDIA H200 NVL", 835e12, 60e12), ("NVIDIA GH200 480GB", 989e12, 67e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12), ("NVIDIA A10G", 70e12, 31.2e12), ("NVIDIA A10", 125e12, 31.2e12),
    ("NVIDIA L4", 121e12, 30.3e12), ("NVIDIA L40", 181e12, 90.5e12), ("NVIDIA L40S", 362e12, 91.6e12),
    ("NVIDIA B200", 2250e12, 75e12), ("Tesla T4", 65e12, 8.1e12), ("NVIDIA GeForce RTX 4090", None, None),
])
def test_each_gpu_gets_its_own_row_of_the_peak_table(name, bf16, fp32):
    # Word by word: an L40 is not an L4, an H100 NVL not an SXM H100, an A100 not an A10.
    assert (peak_flops_of(name, "bf16"), peak_flops_of(name, "fp32")) == (bf16, fp32)


def test_peaks_known_gpus_from_the_table_and_cpu_measured():
    names = [name for name, _, _ in PEAK_FLOPS]
    for gpu in ("H100", "H200", "A100", "L4"):
        assert gpu in names
    h200 = next(row for row in PEAK_FLOPS if row[0] == "H200")
    assert h200[1] == 989e12 and h200[2] == 67e12  # dense bf16, fp32 (no TF32)
    gemm = measured_gemm_flops("fp32", n=256, seconds=0.05)
    assert 1e8 < gemm < 1e13
    value, source = peak_flops(torch.device("cpu"), "fp32")
    assert value > 1e8 and "measured" in source
    assert peak_memory_bytes(torch.device("cpu")) > 10 * 2**20  # this process's peak RSS, in bytes
