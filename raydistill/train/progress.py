"""Progress you can watch (one line per log interval on the terminal), results you can plot
(``metrics.jsonl``, one JSON object per logged step; after a resume, the last row of a step wins) and
TensorBoard event files (``tensorboard/`` beside it: every number of every logged row as a scalar at its
step; a resume drops the events of the steps it replays). All of it from rank 0, from values the step loop
already holds on the host: nothing here waits for the device."""

from __future__ import annotations

import fcntl
import json
import time
from datetime import timedelta
from pathlib import Path

# The loss and every objective's term (tests check it against the objectives' registry).
HEADLINE = ("loss", "task", "kd", "cosine", "iit", "iit_cosine", "td", "reverse_kl", "jsd", "skew_kl",
            "skew_reverse_kl", "tvd")


def _headline(key: str) -> bool:
    """Main loss terms, also those of a second data stream (``lm/task``), not objectives' sub-logs."""
    head, _, tail = key.partition("/")
    return key in HEADLINE or (tail in HEADLINE and head not in HEADLINE and not key.startswith("val/"))


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"


TENSORBOARD_DIR = "tensorboard"


def open_tensorboard(logdir: Path, start_step: int):
    """A tensorboardX writer (Ray Tune's own TensorBoard dependency; torch's writer would need the tensorboard
    package). ``purge_step``: a resumed run replaces the events of the steps after its checkpoint; the file name
    carries the start step and pid, so a quick restart never reuses (and truncates) its predecessor's file."""
    import os

    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir), purge_step=start_step + 1 if start_step > 0 else None, flush_secs=10,
                         filename_suffix=f".{start_step}.{os.getpid()}")


def _lock(file, how: int) -> bool:
    try:
        fcntl.flock(file.fileno(), how)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks: the writers cannot be waited for
        return True


def wait_for_writers(path: Path, timeout_s: float) -> bool:
    """Wait until no process holds ``path`` open as a ``ProgressPrinter`` (rank 0 of a run, once its workers
    were killed); False if one still does after ``timeout_s``. A missing file has no writer."""
    try:
        file = open(path, "rb")
    except OSError:
        return True
    with file:
        deadline = time.monotonic() + timeout_s
        while not _lock(file, fcntl.LOCK_EX | fcntl.LOCK_NB):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


class ProgressPrinter:
    def __init__(self, path: Path, max_steps: int, start_step: int, enabled: bool, tensorboard: bool = True):
        self.enabled, self.max_steps = enabled, max_steps
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.file = None
        self.writer = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)
            # Held while this process may still write rows; the kernel drops it when the process dies, which is
            # how the driver knows a stopped worker has written its last row (wait_for_writers).
            _lock(self.file, fcntl.LOCK_SH)
            if tensorboard:
                self.writer = open_tensorboard(path.parent / TENSORBOARD_DIR, start_step)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        step = metrics["step"]
        if self.writer is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()  # as metrics.jsonl's lines: what was logged survives a crashed worker
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        # The ETA from the mean since the start (evaluations and checkpoints included, as the rest will have them);
        # s/step is the row's, as tok/s: the current speed.
        eta = timedelta(seconds=int(elapsed / max(done, 1) * (self.max_steps - step)))
        terms = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if _headline(k))
        extra = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k.startswith("val/") and k.count("/") == 1
                         and k[4:] in ("loss", "ppl", "rougeL"))
        print(f"[raydistill] step {step}/{self.max_steps} | {terms} | lr {metrics['lr']:.2e} | "
              f"{metrics['tokens_per_s']:.0f} tok/s | {metrics['step_time_s']:.2f} s/step | ETA {eta}"
              + (f" | {extra}" if extra else ""), flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
