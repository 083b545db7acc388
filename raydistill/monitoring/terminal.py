"""The driver's progress display for ``raydistill train`` and ``raydistill sweep``.

In a terminal it is a live rich display that updates in place: one line per run (or the sweep's shared
teacher) with its phase, a bar where the phase has a step count, the latest numbers, elapsed time and ETA;
in a sweep the trial table above it, with a phase column. When the output is not a terminal (CI, a log
file) it appends plain lines instead: one per run and phase it enters, never a redraw.

What it shows comes from the progress board (``board.py``), polled about once a second from a thread, and
from the driver's own phases before Ray starts (``phase``)."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

from raydistill.monitoring import board as B

POLL_S = 1.0
# Pauses of a training run for validation or a checkpoint, and the phases with a step count they interrupt.
_PAUSES = (B.VALIDATION, B.CHECKPOINT)
_COUNTED = (B.TRAINING, B.PRETRAINING, B.TEACHER_CACHE)


def is_live(mode: Literal["auto", "live", "plain"]) -> bool:
    if mode != "auto":
        return mode == "live"
    from rich.console import Console

    return Console(file=sys.stdout).is_terminal


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def describe(entry: dict[str, Any], now: float | None = None) -> str:
    """A phase in a few words: 'training 40/60', 'benchmarks 1:05' (time in the phase when it has no count)."""
    phase = entry.get("phase") or ""
    done, total = entry.get("done"), entry.get("total")
    if total:
        return f"{phase} {done or 0}/{total}"
    if phase and phase != B.DONE and entry.get("since"):
        return f"{phase} {_clock((now or time.time()) - entry['since'])}"
    return phase


def who(key: str) -> str:
    return "" if key == "" else ("teacher: " if key == "teacher" else f"trial {key}: ")


class Display:
    """Use as a context manager around everything the command does; ``attach`` the board once Ray is up."""

    def __init__(self, mode: Literal["auto", "live", "plain"] = "auto"):
        self.live_mode = is_live(mode)
        self._local: dict[str, dict[str, Any]] = {}
        self._remote: dict[str, dict[str, Any]] = {}
        self._board = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._ui_lock = threading.Lock()
        self._announced: set[tuple[str, str]] = set()
        self._events: list[tuple[str, str, int | None]] = []  # phase changes not yet announced (plain output)
        self._next_event = 0
        self.table: Callable[[dict[str, dict[str, Any]]], str] | None = None  # the sweep's trial table
        self.table_keys: Callable[[], set[str]] = set  # keys the table shows (not given a line of their own)
        self._live = None
        self._progress = None
        self._tasks: dict[str, Any] = {}
        self._descriptions: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Display":
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live
            from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            console = Console(file=sys.stdout)
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                      TextColumn("{task.fields[detail]}"), console=console)
            # Anything printed meanwhile (Ray's worker lines, notes) goes above the display.
            self._live = Live(get_renderable=self._render, console=console, refresh_per_second=2,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.__enter__()
        self._thread = threading.Thread(target=self._poll, name="raydistill-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop polling and leave the display's last state on screen (the caller prints what follows)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._live is not None:
            self._tick()
            self._live.__exit__(None, None, None)
            self._live = None

    def attach(self, board) -> None:
        self._board = board

    # ------------------------------------------------------------------------------------------- updates
    @contextmanager
    def phase(self, name: str, key: str = "") -> Iterator[None]:
        """A phase the driver itself runs (before Ray starts, or while it waits)."""
        self.set_phase(name, key)
        try:
            yield
        finally:
            with self._lock:
                self._local.pop(key, None)
            self._tick()

    def set_phase(self, name: str, key: str = "") -> None:
        now = time.time()
        with self._lock:
            self._local[key] = {"phase": name, "since": now, "updated": now}
            self._events.append((key, name, None))
        self._tick()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every key's latest entry, the driver's own or the board's, whichever was updated last."""
        with self._lock:
            out = dict(self._remote)
            for key, entry in self._local.items():
                if key not in out or entry["updated"] >= out[key].get("updated", 0):
                    out[key] = entry
        return out

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            board = self._board
            if board is not None:
                try:
                    import ray

                    remote, events, self._next_event = ray.get(board.read.remote(self._next_event), timeout=5)
                    with self._lock:
                        self._remote = remote
                        self._events += events
                except Exception:  # noqa: BLE001 - a slow or gone board: the display just does not move
                    pass
            self._tick()

    def _tick(self) -> None:
        with self._ui_lock:  # the poll thread and the driver's own phases both update the display
            if self.live_mode:
                with self._lock:
                    self._events = []  # the live display shows states, not the changes between them
                self._update_tasks()
            else:
                self._announce()

    # ------------------------------------------------------------------------------------------- plain lines
    def _announce(self) -> None:
        """One line per key and phase, the first time it is entered (not each validation of a long run)."""
        with self._lock:
            events, self._events = self._events, []
        for key, phase, total in events:
            if phase == B.DONE or (key, phase) in self._announced:
                continue
            self._announced.add((key, phase))
            print(f"[raydistill] {who(key)}{phase}{f' ({total} steps)' if total else ''}", flush=True)

    # ------------------------------------------------------------------------------------------- live display
    def _update_tasks(self) -> None:
        progress = self._progress
        if progress is None:
            return
        snapshot = self.snapshot()
        in_table = self.table_keys() if self.table is not None else set()
        for key, entry in snapshot.items():
            phase = entry.get("phase")
            if key in in_table or not phase:
                continue
            description = f"{who(key)}{phase}"
            task = self._tasks.get(key)
            if phase in _PAUSES and task is not None and self._descriptions.get(key, "").endswith(_COUNTED):
                # A validation or checkpoint inside training: the bar (and its ETA) stays, the pause is named.
                progress.update(task, detail=f"{phase}...")
                continue
            if task is not None and self._descriptions.get(key) != description:
                progress.remove_task(task)  # a new phase: its own clock, and a bar only if it counts steps
                task = None
            if task is None:
                task = self._tasks[key] = progress.add_task(description, total=entry.get("total"), detail="")
            self._descriptions[key] = description
            progress.update(task, total=entry.get("total"), completed=entry.get("done") or 0,
                            detail=entry.get("detail") or "")
            if phase == B.DONE:
                progress.update(task, visible=False)
        for key in list(self._tasks):  # a driver phase that ended, or a key the table now shows
            if key not in snapshot or key in in_table:
                progress.remove_task(self._tasks.pop(key))
                self._descriptions.pop(key, None)

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = []
        if self._progress is not None:
            parts.append(self._progress.get_renderable())
        if self.table is not None:
            try:
                parts.append(Text(self.table(self.snapshot()), no_wrap=True, overflow="crop"))
            except Exception as e:  # noqa: BLE001 - a table that cannot render must not end the sweep
                parts.append(Text(f"(trial table unavailable: {e})"))
        return Group(*parts)
