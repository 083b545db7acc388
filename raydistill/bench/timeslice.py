"""Time-slicing a run against a reference loop: the run's windows and the reference's, back to back.

A benchmark that compares a framework run with a bare loop on a machine whose speed drifts (a shared VM
can run 15% slower for minutes) cannot compare runs made one after another. The DeepSpeed side of ``bench
throughput`` takes turns with the bare loop window by window in one process; a Ray Train run cannot, since
it runs in other processes. This module slices it instead: the run is a subprocess (``raydistill train``
with its own local Ray cluster) that logs a ``metrics.jsonl`` row per window; as soon as a row appears, the
whole process tree (the driver, Ray's daemons, the training worker) is frozen with SIGSTOP, a reference
window runs alone on the machine, and the tree is resumed with SIGCONT. The frozen time falls inside the
run's next window, which the worker times with a monotonic clock, so ``frozen_s`` is subtracted from it:
that window and the reference window inside it ran within seconds of each other on the same machine.

The training worker is stopped first and resumed last, and ``frozen_s`` is timed around those two signals,
so it is the worker's own frozen time. Hand-written because no benchmarking library pairs windows across
processes this way; psutil gives the process tree.

Only CPU runs are sliced: a stopped process's queued CUDA kernels keep running on the GPU, so a reference
window started then would share the device."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raydistill.errors import RaydistillError

# Ray names an actor's process after its class (``ray::<Class>``); Ray Train's training worker actor.
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"
# How often the rows file is checked. A window is seconds long, and the polling runs beside the run being measured,
# so it counts against it: every 5 ms (re-reading the file) took ~2% of a core, every 20 ms (its size) ~0.3%.
POLL_S = 0.02


@dataclass
class Slice:
    """What ran while the run was frozen right after the row for ``after_step``."""
    after_step: int
    frozen_s: float  # the training worker's frozen time, inside the window of the row after ``after_step``
    result: Any  # what the reference returned


def _title(process) -> str:
    import psutil

    try:
        return (process.cmdline() or [""])[0]
    except psutil.Error:
        return ""


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # it ended meanwhile
            pass


class SlicedRun:
    """``cmd`` as a subprocess that appends JSON rows to ``rows``; ``reference(row)`` runs while the process
    tree is frozen, after each row for which ``slice_after(row)`` is true (never with ``reference=None``).
    The subprocess's output goes to ``log``."""

    def __init__(self, cmd: list[str], rows: Path, log: Path, reference: Callable[[dict], Any] | None = None,
                 slice_after: Callable[[dict], bool] = lambda row: True, worker_title: str = TRAIN_WORKER_TITLE,
                 env: dict[str, str] | None = None, name: str = "the run"):
        self.cmd, self.rows_path, self.log, self.name = cmd, Path(rows), Path(log), name
        self.reference, self.slice_after, self.worker_title, self.env = reference, slice_after, worker_title, env
        self.slices: list[Slice] = []
        self.rows: list[dict] = []
        self._read = 0  # bytes of the rows file read so far (whole rows)

    def run(self) -> list[dict]:
        """Runs the command to its end; returns its rows (``self.slices``: what ran between them). A failing
        command raises with the end of its output."""
        with open(self.log, "wb") as log:
            process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
            try:
                while process.poll() is None:
                    new = self._new_rows()
                    # Frozen after the newest row only: after an older one the frozen time would not fall in
                    # the window that follows it.
                    if new and self.reference is not None and self.slice_after(new[-1]):
                        self.slices.append(self._frozen(process.pid, new[-1]))
                    time.sleep(POLL_S)
                self._new_rows()
            finally:
                if process.poll() is None:  # interrupted: resume the tree, let the run shut Ray down, end the rest
                    tree = self._descendants(process.pid)
                    _signal([process.pid] + [p.pid for p in tree], signal.SIGCONT)
                    process.send_signal(signal.SIGINT)
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        process.kill()
                    for p in tree:
                        with contextlib.suppress(Exception):
                            p.kill()
        if process.returncode != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-15:]
            raise RaydistillError(f"{self.name} exited with status {process.returncode}; the end of its output:\n"
                                  + "\n".join(tail))
        return self.rows

    def _new_rows(self) -> list[dict]:
        """Complete rows appended since the last call (a line still being written waits for the next)."""
        try:
            if self.rows_path.stat().st_size <= self._read:
                return []
            with open(self.rows_path, "rb") as f:
                f.seek(self._read)
                appended = f.read()
        except FileNotFoundError:
            return []
        whole = appended[:appended.rfind(b"\n") + 1]  # the part after the last newline is not a whole row yet
        self._read += len(whole)
        new = [json.loads(line) for line in whole.split(b"\n") if line.strip()]
        self.rows.extend(new)
        return new

    def _tree(self, pid: int) -> tuple[int, list[int]]:
        """(the training worker's pid, every other pid of the tree: the command's and its descendants')."""
        children = self._descendants(pid)
        workers = [c.pid for c in children if _title(c).startswith(self.worker_title)]
        if len(workers) != 1:
            raise RaydistillError(f"bench: expected one {self.worker_title} process under {self.name}, found "
                                  f"{len(workers)}; it cannot be time-sliced")
        return workers[0], [pid] + [c.pid for c in children if c.pid != workers[0]]

    def _frozen(self, pid: int, row: dict) -> Slice:
        worker, others = self._tree(pid)
        begun = time.perf_counter()
        _signal([worker], signal.SIGSTOP)
        _signal(others, signal.SIGSTOP)
        try:
            result = self.reference(row)
        finally:
            _signal(others, signal.SIGCONT)
            _signal([worker], signal.SIGCONT)
            frozen = time.perf_counter() - begun
        return Slice(int(row["step"]), frozen, result)

    @staticmethod
    def _descendants(pid: int) -> list:
        import psutil

        try:
            return psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []
