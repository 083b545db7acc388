"""Keeping freed host memory: a step that allocates and frees big tensors stops page-faulting them in."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raydistill.train.host_memory import _libc

# A step-like pattern (64 MiB tensors made, combined and freed, then a 128 MiB one), repeated; prints
# the minor page faults of each repetition.
_PROBE = """
import json, resource, sys, torch
from raydistill.train.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
n = 16 << 20
counts = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(n); b = a * 2; c = a + b
    del a
    d = torch.ones(2 * n)
    del b, c, d
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(counts))
"""
PAGES_PER_STEP = 3 * (64 << 20) // 4096  # a, b, c: the least the default re-faults per repetition


def _faults(mode: str) -> list[int]:
    # A fresh process: mallopt settings last for the process, and pytest's heap would blur the count.
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         timeout=120)
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
