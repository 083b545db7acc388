"""Background samplers for benchmarks: a daemon thread calls ``sample()`` every ``every_s`` seconds while the
``with`` block runs (psutil readings of the machine or of Ray's worker processes)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod


class Sampler(ABC):
    def __init__(self, every_s: float):
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Called once in the sampling thread before the first ``sample``."""

    @abstractmethod
    def sample(self) -> None:
        """One reading, in the sampling thread."""

    def _run(self) -> None:
        self.start()
        while not self._stop.wait(self._every_s):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
