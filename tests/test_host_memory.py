"""Keeping freed host memory: a step that allocates and frees big tensors stops page-faulting them in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raydistill.config import load_config
from raydistill.train.host_memory import _libc
from raydistill.train.launcher import ARENA_MAX, worker_env

# A step-like pattern (64 MiB tensors made, combined and freed, then a 128 MiB one), repeated; prints
# the minor page faults of each repetition.
_PROBE = """
import json, resource, sys, threading, torch
from raydistill.train.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
n = 16 << 20
counts = []
def steps():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(n); b = a * 2; c = a + b
        del a
        d = torch.ones(2 * n)
        del b, c, d
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[2] == "thread":  # as Ray Train runs the training loop: in a thread of the worker process
    t = threading.Thread(target=steps); t.start(); t.join()
else:
    steps()
print(json.dumps(counts))
"""
PAGES_PER_STEP = 3 * (64 << 20) // 4096  # a, b, c: the least the default re-faults per repetition


def _faults(mode: str, where: str = "main", env: dict | None = None) -> list[int]:
    # A fresh process: mallopt settings last for the process, and pytest's heap would blur the count.
    environ = {k: v for k, v in os.environ.items() if k != ARENA_MAX}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, where], capture_output=True, text=True, check=True,
                         timeout=120, env={**environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(_libc() is None, reason="keeping freed memory needs glibc's mallopt")
def test_kept_memory_is_reused_without_page_faults():
    kept = _faults("keep")
    # The heap settles within a few repetitions (glibc places aligned blocks first-fit); then no faults.
    assert max(kept[-3:]) < PAGES_PER_STEP // 100, f"page faults per repetition with memory kept: {kept}"
    if not _thp_always():  # with 2 MiB pages the default faults 512x less often: no contrast to check
        default = _faults("default")
        assert min(default[-3:]) >= PAGES_PER_STEP, f"page faults per repetition with glibc's default: {default}"


@pytest.mark.skipif(_libc() is None, reason="keeping freed memory needs glibc's mallopt")
def test_a_training_thread_keeps_its_memory_only_with_one_malloc_arena():
    """Ray Train's training loop runs in a thread; glibc's thread arenas map big blocks whatever mallopt says."""
    kept = _faults("keep", "thread", {ARENA_MAX: "1"})  # what the workers' environment sets
    # The shared heap settles less tidily than the main thread's (an occasional 64 MiB block is faulted in
    # again as the layout shifts), so the check is on the faults of the last six repetitions together.
    assert sum(kept[-6:]) <= 2 * PAGES_PER_STEP, f"page faults per repetition in a thread, one arena: {kept}"
    if not _thp_always():
        own_arena = _faults("keep", "thread")
        assert min(own_arena[-6:]) >= PAGES_PER_STEP, f"page faults per repetition in a thread's arena: {own_arena}"
        assert sum(kept[-6:]) * 3 < sum(own_arena[-6:])


def test_workers_start_with_one_malloc_arena_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv(ARENA_MAX, raising=False)
    assert worker_env(load_config(None, ["teacher.name=tiny-gpt2"]))[ARENA_MAX] == "1"
    assert ARENA_MAX not in worker_env(load_config(None, ["teacher.name=tiny-gpt2",
                                                          "scaling.keep_freed_host_memory=false"]))
    monkeypatch.setenv(ARENA_MAX, "4")  # the user's own setting reaches a local cluster's workers unchanged
    assert ARENA_MAX not in worker_env(load_config(None, ["teacher.name=tiny-gpt2"]))
