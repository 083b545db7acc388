"""Learning-rate schedules as multipliers of the peak lr (for LambdaLR), with linear warm-up."""

from __future__ import annotations

import math
from typing import Callable


def lr_lambda(kind: str, max_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = int(max_steps * warmup_ratio)

    def factor(step: int) -> float:
        # LambdaLR passes the number of optimizer steps taken so far (0 before the first).
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
