"""Progress you can watch (one line per log interval on the terminal) and results you can plot
(``metrics.jsonl``, one JSON object per logged step; after a resume, the last row of a step wins)."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

HEADLINE = ("loss", "task", "kd", "cosine", "iit", "td", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def _headline(key: str) -> bool:
    """Main loss terms, also those of a second data stream (``lm/task``), not objectives' sub-logs."""
    head, _, tail = key.partition("/")
    return key in HEADLINE or (tail in HEADLINE and head not in HEADLINE and not key.startswith("val/"))


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"


class ProgressPrinter:
    def __init__(self, path: Path, max_steps: int, start_step: int, enabled: bool):
        self.enabled, self.max_steps = enabled, max_steps
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.file = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        step = metrics["step"]
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = timedelta(seconds=int(elapsed / max(done, 1) * (self.max_steps - step)))
        terms = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if _headline(k))
        extra = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k.startswith("val/") and k.count("/") == 1
                         and k[4:] in ("loss", "ppl", "rougeL"))
        print(f"[raydistill] step {step}/{self.max_steps} | {terms} | lr {metrics['lr']:.2e} | "
              f"{metrics['tokens_per_s']:.0f} tok/s | {elapsed / max(done, 1):.2f} s/step | ETA {eta}"
              + (f" | {extra}" if extra else ""), flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
