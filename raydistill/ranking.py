"""How sweep trials are ranked: the direction each metric improves in (what the sweep's ``mode`` and a
scheduler's must be), which trials rank, their order, and how a leaderboard prints their values.

A wrong direction silently makes a sweep keep its worst trials (and a scheduler stop its best), so the
direction is derived from the metric's name wherever the name says it, and a sweep file that contradicts it
is refused. Metric names are those of ``raydistill.sweep.spec.reported_metric_names``: training rows
(``loss``, each objective's term, ``tokens_per_s``, ...), validation (``val/loss``, ``val/ce``, ``val/ppl``,
``val/<objective>``, ``val/iia/...``, ``val/rouge...``) and benchmark scores (``bench/<task>/<metric>``).
Only finished trials and those a scheduler stopped rank: a running, failed or interrupted trial's metric is an
intermediate value, so it follows them unranked. Imports nothing heavy: the report uses it on machines without
torch."""

from __future__ import annotations

import math
from typing import Literal

from raydistill.errors import ConfigError

Mode = Literal["min", "max"]
# Statuses whose metric is a trial's last one: only these rank.
DONE = ("finished", "stopped")
# Tune's trial statuses other than TERMINATED (finished or stopped, told apart by the last result).
TUNE_STATUS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "ERROR": "failed"}

# Benchmark scores (raydistill.eval.tasks) that are better when higher; perplexity is the one that is not.
HIGHER_SCORES = frozenset({"accuracy", "f1", "matthews_corr", "pearson", "spearman", "exact_match", "entity_f1",
                           "entity_precision", "entity_recall", "glue_score", "glue_average"})
# Training-row keys that are neither losses nor scores.
NO_DIRECTION = frozenset({"lr", "step", "epoch"})


def metric_direction(metric: str) -> Mode | None:
    """``"min"`` or ``"max"`` for a metric whose name says which is better, else None (an objective's own
    diagnostics such as ``td/value``, the learning rate, an unknown column)."""
    parts = metric.split("/")
    if parts[0] == "bench":
        if len(parts) != 3:
            return None
        return "min" if parts[2] == "perplexity" else "max" if parts[2] in HIGHER_SCORES else None
    if parts[0] == "val":
        if len(parts) > 1 and (parts[1] == "iia" or parts[1].startswith("rouge")):
            return "max"  # interchange-intervention accuracy, ROUGE of generations
        return "min" if len(parts) == 2 else None  # val/loss, val/ce, val/ppl, val/<objective>: losses
    if metric == "tokens_per_s":
        return "max"
    if len(parts) == 1 and metric not in NO_DIRECTION:
        return "min"  # loss, step_time_s and each objective's training term
    return None


def checked_mode(metric: str, mode: str | None, field: str) -> Mode:
    """``mode`` for ``metric`` as a sweep file gives it (``field`` names it in errors): derived from the metric
    where left out; refused where it contradicts the metric, or where neither says which way is better."""
    known = metric_direction(metric)
    if mode is None:
        if known is None:
            raise ConfigError(f"{field}: not given, and {metric!r} does not say whether lower or higher is better; "
                              f"allowed: min, max")
        return known
    if known is not None and mode != known:
        better = "lower" if known == "min" else "higher"
        raise ConfigError(f"{field} {mode!r} for {metric!r}, which is better when {better}: the sweep would keep "
                          f"its worst trials; allowed: {known} (or leave {field} out)")
    return mode  # type: ignore[return-value]


def trial_status(tune_status: str, last_result: dict, ended: bool = False) -> str:
    """pending, running, finished, stopped (early, by the scheduler) or failed, from Tune's status and the trial's
    last result. ``ended``: the trial's own log says it finished (its end event), whatever Tune last heard (a
    sweep interrupted or killed right after). One rule for ``raydistill results`` and a report rebuilt from
    Tune's files."""
    if ended and tune_status != "ERROR":
        return "finished"
    if tune_status != "TERMINATED":
        return TUNE_STATUS.get(tune_status, tune_status.lower())
    return "finished" if last_result.get("finished") else "stopped"  # stopped early by the scheduler


def trial_runtime_s(last_result: dict) -> float | None:
    """A trial's wall time in seconds (2 decimals): raydistill's own ``runtime_s`` (its Ray Train run and its
    scoring), else Tune's ``time_total_s``; None where neither was reported."""
    runtime = last_result.get("runtime_s", last_result.get("time_total_s"))
    return round(float(runtime), 2) if runtime is not None else None


def done_mask(frame):
    """Which rows of a pandas frame rank (finished or stopped); every row where there is no ``status`` column."""
    import pandas as pd

    return frame["status"].isin(DONE) if "status" in frame.columns else pd.Series(True, index=frame.index)


def rank_order(frame, metric: str, mode: str):
    """(``frame`` ordered for a leaderboard, how many of its first rows rank): finished and stopped trials by the
    metric, best first; then every other trial and those without the metric, in table order. A pandas frame
    with a ``status`` column (without one, every row counts as done)."""
    if metric not in frame.columns:
        return frame, 0
    key = frame[metric].where(done_mask(frame))
    order = key.reset_index(drop=True).sort_values(ascending=mode == "min", na_position="last", kind="stable")
    return frame.iloc[order.index], int(key.notna().sum())


def leaderboard_value(value, missing: str = "-") -> str:
    """A leaderboard cell (``raydistill results`` and the report): ``missing`` for none, floats to 4 significant
    digits, but whole numbers and those from 10^4 up to the unit: .4g would print step 12345 (a float column as
    soon as one trial has no step) as 1.234e+04."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float):
        whole = abs(value) < 1e15 and (value.is_integer() or abs(value) >= 1e4)
        return f"{value:.0f}" if whole else f"{value:.4g}"
    return str(value)
