"""Result rows, their aggregates over seeds (mean and standard deviation, the GLUE average) and writing
them out as CSV, JSON and a printed table."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from raydistill.eval.tasks import GLUE_TASKS, TASKS


@dataclass(frozen=True)
class ResultRow:
    model: str
    task: str
    metric: str
    value: float
    seed: int
    n_train: int
    n_eval: int
    note: str = ""
    method: str = ""  # perplexity: its windows, e.g. "sliding_window(context=1024,stride=512)"


@dataclass(frozen=True)
class SummaryRow:
    model: str
    task: str
    metric: str
    mean: float
    std: float  # sample standard deviation over seeds; 0 for one seed
    n_seeds: int
    note: str = ""
    method: str = ""


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(rows: list[ResultRow]) -> list[SummaryRow]:
    """Mean/std per (model, task, metric), plus per model the GLUE score of each GLUE task (the mean of its
    official metrics, as the GLUE leaderboard does for MRPC, QQP and STS-B) and the GLUE average over the
    GLUE tasks that were run (the note says when that is not all eight)."""
    groups: dict[tuple[str, str, str], dict[int, float]] = {}
    notes: dict[tuple[str, str], str] = {}
    methods: dict[tuple[str, str, str], str] = {}
    for r in rows:
        groups.setdefault((r.model, r.task, r.metric), {})[r.seed] = r.value
        if r.note:
            notes[(r.model, r.task)] = r.note
        if r.method:
            methods[(r.model, r.task, r.metric)] = r.method
    out = []
    for (model, task, metric), by_seed in groups.items():
        mean, std = _mean_std(list(by_seed.values()))
        out.append(SummaryRow(model, task, metric, mean, std, len(by_seed), notes.get((model, task), ""),
                              methods.get((model, task, metric), "")))
    for model in dict.fromkeys(r.model for r in rows):
        out.extend(_glue_rows(model, groups))
    return out


def _glue_rows(model: str, groups: dict[tuple[str, str, str], dict[int, float]]) -> list[SummaryRow]:
    per_task: dict[str, dict[int, float]] = {}
    for task in GLUE_TASKS:
        metric_maps = [groups.get((model, task, m)) for m in TASKS[task].metrics]
        if not all(metric_maps):
            continue
        seeds = set.intersection(*(set(m) for m in metric_maps))
        per_task[task] = {s: sum(m[s] for m in metric_maps) / len(metric_maps) for s in seeds}
    rows = []
    for task, by_seed in per_task.items():
        if "glue_score" in TASKS[task].reported:
            mean, std = _mean_std(list(by_seed.values()))
            rows.append(SummaryRow(model, task, "glue_score", mean, std, len(by_seed),
                                   f"mean of {', '.join(TASKS[task].metrics)}"))
    if per_task:
        # The average per seed, over the seeds every task has, so its std is a spread over seeds.
        seeds = set.intersection(*(set(v) for v in per_task.values()))
        if seeds:
            averages = [sum(v[s] for v in per_task.values()) / len(per_task) for s in sorted(seeds)]
        else:
            averages = [sum(sum(v.values()) / len(v) for v in per_task.values()) / len(per_task)]
        mean, std = _mean_std(averages)
        partial = "" if len(per_task) == len(GLUE_TASKS) else f"partial: {len(per_task)}/{len(GLUE_TASKS)} tasks; "
        rows.append(SummaryRow(model, "glue", "glue_average", mean, std, len(averages),
                               f"{partial}over {', '.join(per_task)}"))
    return rows


def write_results(out_dir: str | Path, rows: list[ResultRow], summary: list[SummaryRow], meta: dict) -> dict[str, Path]:
    """results.csv (one row per task, metric and seed), summary.csv (aggregates) and results.json (both,
    with the settings and timings in ``meta``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results_csv": out / "results.csv", "summary_csv": out / "summary.csv", "json": out / "results.json"}
    for path, items, cls in ((paths["results_csv"], rows, ResultRow), (paths["summary_csv"], summary, SummaryRow)):
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(cls)])
            writer.writeheader()
            writer.writerows(asdict(i) for i in items)
    paths["json"].write_text(json.dumps({"rows": [asdict(r) for r in rows], "summary": [asdict(s) for s in summary],
                                         **meta}, indent=2), encoding="utf-8")
    return paths


def summary_table(summary: list[SummaryRow], title: str = "raydistill eval"):
    """A rich Table of the aggregates (mean ± std over seeds); the notes are printed apart, they are long."""
    from rich.table import Table

    table = Table(title=title)
    for name in ("model", "task", "metric", "mean", "± std", "seeds"):
        table.add_column(name, justify="right" if name in ("mean", "± std", "seeds") else "left",
                         no_wrap=name != "model")
    for s in summary:
        table.add_row(s.model, s.task, s.metric, f"{s.mean:.4f}", f"{s.std:.4f}", str(s.n_seeds))
    return table
