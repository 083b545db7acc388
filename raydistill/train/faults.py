"""Faults a run can meet and how they end: one message, a meaningful exit status, nothing corrupt left behind.

- ``RunFailure``: a run failed for a reason its message states (a non-finite loss, a weight file that does not
  load). Raised on a worker, it reaches the driver inside Ray Train's ``WorkerGroupError``;
  ``failure_message`` digs it out so the command prints that one line, not a worker traceback.
- ``Interrupted``: the user stopped a command (SIGINT); exit status 130, the message says how to resume.
- ``NonFiniteGuard``: the per-step check of the loss terms (on values the loop has already reduced, so it
  adds no synchronisation), and of DeepSpeed's own skipped (overflowed) steps.
- ``DivergenceWatch``: a finite loss that explodes gets a warning (or stops the run)."""

from __future__ import annotations

import math
from typing import Any

from raydistill.errors import RaydistillError

# DeepSpeed skips a step whose gradients overflow (fp16 loss scaling, non-finite gradient norms). A few in a
# row are normal while the fp16 loss scale settles (it halves on each); this many in a row are not.
MAX_CONSECUTIVE_SKIPPED = 50


class RunFailure(RaydistillError):
    """A run stopped for a reason its message states (raised on workers or the driver)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # survives Ray's pickling of worker errors as the same class and message
        return (self.__class__, (self.message,))


class NonFiniteLoss(RunFailure):
    pass


class Interrupted(RaydistillError):
    """The user interrupted the command (SIGINT)."""

    exit_code = 130


def _fmt(v: float) -> str:
    return repr(v) if not math.isfinite(v) else f"{v:.4g}"


def nonfinite(values: dict[str, Any]) -> dict[str, float]:
    """The entries of ``values`` that are numbers and not finite."""
    out = {}
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
            out[k] = float(v)
    return out


class NonFiniteGuard:
    """Decides, after each optimiser step, whether the run may go on.

    ``policy`` ``stop`` (default): a non-finite loss or term stops the run at that step. ``skip``: a step with
    a non-finite loss is tolerated when DeepSpeed did not apply it (its overflow check skipped the update);
    such steps are counted. In both, ``MAX_CONSECUTIVE_SKIPPED`` steps in a row that DeepSpeed skipped, or a
    run in which every step was skipped, stop the run: the student would be the untrained start."""

    def __init__(self, policy: str = "stop", hint: str = ""):
        self.policy, self.hint = policy, hint
        self.skipped = 0  # steps with a non-finite loss that were skipped (policy skip)
        self.consecutive_overflow = 0
        self.applied = 0  # optimiser updates DeepSpeed applied in this session
        self.steps = 0

    def check(self, step: int, logs: dict[str, float], applied: bool, checkpoint_step: int | None = None) -> str | None:
        """Raise ``NonFiniteLoss`` when the run must stop; return a note when a step was skipped."""
        self.steps += 1
        bad = nonfinite(logs)
        self.applied += int(applied)
        self.consecutive_overflow = 0 if applied else self.consecutive_overflow + 1
        where = (f"the latest checkpoint (step {checkpoint_step}) is intact" if checkpoint_step
                 else "no checkpoint was written before it")
        if bad:
            terms = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(bad.items()))
            if self.policy == "skip" and not applied:
                self.skipped += 1
                return f"step {step}: non-finite {terms}; update skipped ({self.skipped} skipped so far)"
            cause = ("DeepSpeed applied the update, so it cannot be skipped (no overflow check in this "
                     "precision/ZeRO stage)" if self.policy == "skip" else
                     "set train.nonfinite=skip to skip such steps instead")
            raise NonFiniteLoss(
                f"non-finite loss at step {step}: {terms}. The run stopped there and nothing was exported; "
                f"{where}. {cause}{self.hint}")
        if self.consecutive_overflow >= MAX_CONSECUTIVE_SKIPPED:
            raise NonFiniteLoss(
                f"DeepSpeed skipped the last {self.consecutive_overflow} updates (gradient overflow) up to step "
                f"{step}: the model is not training. The run stopped and nothing was exported; {where}.{self.hint}")
        return None

    def check_trained(self, step: int, updates: int | None = None, skipped: int | None = None) -> None:
        """Before the last checkpoint and the export: refuse a student that no update ever reached. ``updates`` and
        ``skipped`` are DeepSpeed's counts over the whole run (they survive resumes); default: this session's."""
        if updates is None or skipped is None:
            updates, skipped = self.steps, self.steps - self.applied
        if updates and skipped >= updates:
            raise NonFiniteLoss(
                f"DeepSpeed skipped every one of the {updates} updates up to step {step} (gradient overflow): "
                f"the student is still its starting point, so nothing was exported.{self.hint}")


class LossDiverged(RunFailure):
    pass


class DivergenceWatch:
    """Notices a finite loss that explodes (``train.lr=10 train.grad_clip=0``: 3.3 -> 9,284 with no word).

    The rule is scale-free and ignores noise near zero: the total loss, smoothed (EMA, ``SMOOTHING`` per step),
    has risen above its smoothed starting value *and* to ``factor`` times its lowest smoothed value. Normal
    training never climbs back above where it started; a run that does has diverged. ``policy`` ``warn``
    returns one note the first time (then again each time the loss grows another ``factor``); ``stop`` raises
    ``LossDiverged``; ``off`` does nothing."""

    SMOOTHING = 0.1
    WARMUP = 5  # steps before the start value is fixed (the first steps' losses jump about)

    def __init__(self, policy: str = "warn", factor: float = 4.0):
        self.policy, self.factor = policy, factor
        self.ema: float | None = None
        self.start: float | None = None
        self.lowest = math.inf
        self.steps = 0
        self.warned_at: float | None = None  # the smoothed loss at the last warning
        self.diverged_at: int | None = None  # the first step the rule held

    def check(self, step: int, loss: float | None) -> str | None:
        if self.policy == "off" or loss is None or not math.isfinite(loss):
            return None  # non-finite losses are NonFiniteGuard's
        self.steps += 1
        self.ema = loss if self.ema is None else (1 - self.SMOOTHING) * self.ema + self.SMOOTHING * loss
        if self.steps == self.WARMUP:
            self.start = self.ema
        self.lowest = min(self.lowest, self.ema)
        if self.start is None or not (self.ema > self.start and self.ema >= self.factor * self.lowest):
            return None
        if self.warned_at is not None and self.ema < self.factor * self.warned_at:
            return None
        self.warned_at = self.ema
        self.diverged_at = self.diverged_at or step
        what = (f"the loss is diverging at step {step}: smoothed {self.ema:.4g}, above its start ({self.start:.4g}) "
                f"and {self.ema / self.lowest:.3g}x its lowest ({self.lowest:.4g})")
        if self.policy == "stop":
            raise LossDiverged(f"{what}. The run stopped there and nothing was exported (train.divergence=stop); "
                               "lower train.lr or set train.grad_clip")
        return f"warning: {what}; lower train.lr or set train.grad_clip (train.divergence=stop ends such runs)"


def failure_message(error: BaseException) -> str | None:
    """The message of the ``RunFailure`` behind a Ray Train error (or the error itself), if there is one."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RunFailure):
            return e.message
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures[k] for k in sorted(failures))
        for attr in ("controller_failure", "cause", "__cause__", "__context__"):
            nested = getattr(e, attr, None)
            if isinstance(nested, BaseException):
                todo.append(nested)
        # Ray wraps a task's exception in RayTaskError subclasses that also derive from the original class.
        as_instance = getattr(e, "as_instanceof_cause", None)
        if callable(as_instance):
            try:
                inner = as_instance()
            except Exception:  # noqa: BLE001 - best effort
                inner = None
            if isinstance(inner, RunFailure):
                return getattr(inner, "message", str(inner))
    return None


FAILURE_FILE = ".raydistill_failure.json"  # in the output directory: why the workers stopped


def write_failure(output_dir, attempt: str | None, message: str) -> None:
    """Rank 0 leaves the reason a run stopped for the driver (which knows the ``attempt`` token it handed out)."""
    import json
    from pathlib import Path

    from raydistill.fsutil import write_text_atomic

    write_text_atomic(Path(output_dir) / FAILURE_FILE, json.dumps({"attempt": attempt, "message": message}))


def read_failure(output_dir, attempt: str | None) -> str | None:
    """The reason the workers of this ``attempt`` left, if any."""
    import json
    from pathlib import Path

    path = Path(output_dir) / FAILURE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("message") if data.get("attempt") == attempt else None


def clear_failure(output_dir) -> None:
    from pathlib import Path

    try:
        (Path(output_dir) / FAILURE_FILE).unlink()
    except FileNotFoundError:
        pass


def skip_unsupported(cfg) -> str | None:
    """Why ``train.nonfinite=skip`` cannot work with this config (it relies on DeepSpeed's overflow check, which
    skips an update with non-finite gradients), or None."""
    if cfg.train.nonfinite != "skip":
        return None
    if cfg.deepspeed.zero_stage == 0:
        return ("train.nonfinite=skip needs DeepSpeed's overflow check, which ZeRO stage 0 does not run "
                "(got deepspeed.zero_stage=0); allowed: deepspeed.zero_stage 1-3, or train.nonfinite=stop")
    from raydistill.train.ds_config import deepspeed_config

    # What the workers' DeepSpeed config asks for ('skip' turns bf16's check on, deepspeed.extra may turn it off).
    bf16_check = deepspeed_config(cfg, 1)["bf16"].get("check_grad_overflow")
    if cfg.train.precision == "bf16" and not bf16_check:
        return (f"train.nonfinite=skip needs DeepSpeed's overflow check, which deepspeed.extra.bf16."
                f"check_grad_overflow={bf16_check!r} turns off for bf16; allowed: leave that setting out, or "
                "train.nonfinite=stop")
    return None
