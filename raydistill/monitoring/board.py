"""The progress board: where the phase and progress of every run of one command are posted.

Workers (rank 0) and sweep trial drivers post to a Ray actor the driver started, without waiting for an
answer (``.remote()`` and nothing else: no step waits for the board), at phase changes and logging steps.
The driver's terminal display reads it about once a second. Worker logs are hidden in sweeps, so this is
how the terminal learns that a trial is pretraining, training at step 40 of 60, or scoring its student.

``Monitor`` is what a fit carries to its workers: the run's tags for the metrics, the board, the settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

# Phases, in the order a run meets them. "training" and "teacher pretraining" carry step counts.
PREPARING = "preparing data"
STARTING = "starting workers"
PRETRAINING = "teacher pretraining"
GENERATION = "teacher generation"
TEACHER_CACHE = "teacher cache"
TRAINING = "training"
VALIDATION = "validation"
CHECKPOINT = "checkpoint"
EXPORT = "export"
STOPPING = "stopping workers"
BENCHMARKS = "benchmarks"
DONE = "done"


class ProgressBoard:
    """The actor: the latest phase and progress per key (a trial id, "teacher", or "" for a single run)."""

    def __init__(self, metrics: bool = True):
        self.entries: dict[str, dict[str, Any]] = {}
        # (key, phase, step count) at each phase change: the display misses none between two reads.
        self.events: list[tuple[str, str, int | None]] = []
        self.metrics = metrics

    def post(self, key: str, fields: dict[str, Any]) -> None:
        entry = self.entries.setdefault(key, {})
        phase = fields.get("phase")
        if phase is not None and phase != entry.get("phase"):
            self._phase_series(fields.get("run", entry.get("run", "")), fields.get("trial", entry.get("trial", "")),
                               entry.get("phase"), phase)
            entry.update(done=None, total=None, detail="", since=time.time())
            self.events.append((key, phase, fields.get("total")))
        entry.update(fields)
        entry["updated"] = time.time()

    def _phase_series(self, run: str, trial: str, old: str | None, new: str) -> None:
        if not self.metrics:
            return
        from raydistill.monitoring.metrics import _metric

        try:
            gauge = _metric("raydistill_phase")
            if old is not None:
                gauge.set(0.0, tags={"run": run, "trial": trial, "phase": old})
            gauge.set(1.0, tags={"run": run, "trial": trial, "phase": new})
        except Exception:  # noqa: BLE001 - the board keeps serving the terminal without its series
            self.metrics = False

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.entries

    def read(self, since: int = 0) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str, int | None]], int]:
        """The latest entries, the phase changes from event ``since`` on, and where the next read starts."""
        return self.entries, self.events[since:], len(self.events)


def start_board(metrics: bool = True):
    """A board for this driver (no CPU reserved; it goes away with the driver)."""
    import ray

    return ray.remote(num_cpus=0, max_concurrency=1)(ProgressBoard).remote(metrics)


@dataclass(frozen=True)
class Monitor:
    """What a fit carries to its workers. ``key`` is the board entry; ``run``/``trial`` tag the series."""

    run: str
    trial: str = ""
    key: str = ""
    board: Any = None  # the ProgressBoard actor handle, or None (nothing posted)
    metrics: bool = True
    peak_flops: float | None = None

    def for_teacher(self) -> "Monitor":
        """The teacher's pretraining: a run of its own (``NAME-teacher``, as Ray Train names it) in `train`; in a
        sweep the caller's trial tag ("teacher" for the sweep's shared teacher) already says what it is."""
        return self if self.trial else replace(self, run=f"{self.run}-teacher")

    def post(self, **fields: Any) -> None:
        """Fire and forget: nothing waits for the board."""
        if self.board is not None:
            self.board.post.remote(self.key, {"run": self.run, "trial": self.trial, **fields})
