"""The report's content: a list of sections, each a title, a note on how to read it and blocks (text,
tables, figures), built from a ``SweepData``. The HTML and Markdown writers only lay these out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from raydistill.report import figures as F
from raydistill.report import stats as S
from raydistill.ranking import leaderboard_value, rank_order
from raydistill.report.sweepdata import BOOKKEEPING, SweepData

# Section ids, in order: the tests check that every one is present.
SECTION_IDS = ("overview", "leaderboard", "parameters", "importance", "curves", "iia", "cost", "seeds")


@dataclass
class Block:
    kind: str                  # "text" | "table" | "figure"
    text: str = ""
    table: Any = None          # DataFrame (already formatted for display)
    figure: F.Figure | None = None


@dataclass
class Section:
    id: str
    title: str
    how_to_read: str
    blocks: list[Block] = field(default_factory=list)

    def text(self, text: str) -> None:
        self.blocks.append(Block("text", text=text))

    def add_table(self, table) -> None:
        self.blocks.append(Block("table", table=display(table)))

    def figure(self, name: str, caption: str, png: bytes) -> None:
        self.blocks.append(Block("figure", figure=F.Figure(name, caption, png)))


def display(frame):
    """Numbers to 4 significant digits (whole numbers and those from 10^4 up to the unit: a step or a runtime),
    missing values as '–', 'config/' dropped from column names."""
    out = frame.copy()
    out.columns = [F.short(str(c)) for c in out.columns]
    return out.apply(lambda col: col.map(lambda v: leaderboard_value(v, "–"))) if len(out) else out


def _finished(d: SweepData) -> SweepData:
    """``d`` with its finished and stopped trials only: the statistics never mix a running, failed or interrupted
    trial's intermediate metric with final ones."""
    return replace(d, table=d.done)


def _trial_label(row: dict) -> str:
    config = str(row.get("configuration", ""))
    config = config if len(config) <= 40 else config[:37] + "..."
    return f"{row['trial']} [{row['family']}] {config}"


def overview(d: SweepData) -> Section:
    s = Section("overview", "Sweep overview",
                "What was swept, what ranks the trials, and how many trials each status has. Notes list what the "
                "sweep's files do not contain, so the sections below that need it are empty.")
    t = d.table
    counts = t["status"].value_counts().to_dict() if "status" in t else {}
    s.text(f"Sweep {d.name} at {d.location}: {len(t)} trials ("
           + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f"). Ranked by {d.metric or '(no metric)'} "
           f"({'lower' if d.mode == 'min' else 'higher'} is better).")
    swept = [F.short(p) for p in d.params] + [F.short(p) + " (seed)" for p in d.seed_params]
    s.text("Swept: " + (", ".join(swept) if swept else "nothing (a single configuration)") + ". Objective families: "
           + ", ".join(f"{k} {v}" for k, v in t["family"].value_counts().sort_index().items()) + ".")
    active = sum(counts.get(k, 0) for k in ("running", "pending", "paused"))
    if active:
        s.text(f"The sweep is still running ({active} trials running or pending): every section shows what the "
               "trials have written so far.")
    if d.has_metric() and len(d.done) < len(t):
        s.text(f"Parameters, importance, IIA, cost and seeds use the {len(d.done)} finished or stopped trials only: "
               f"the other trials' {d.metric} is an intermediate value (or none).")
    for note in d.notes:
        s.text("Note: " + note)
    return s


def leaderboard(d: SweepData) -> Section:
    s = Section("leaderboard", "Leaderboard",
                "Finished and stopped trials sorted by the ranking metric, best first; the others (running, "
                "failed, interrupted: their metric is an intermediate value) and trials without it follow, "
                "unranked ('–'). Every "
                "benchmark score the trials reported is a column (bench/<task>/<metric>, means over evaluation "
                "seeds). A teacher row and the fraction of the teacher–baseline gap each student closes "
                "((student − baseline) / (teacher − baseline): 1 matches the teacher, 0 is no better than the "
                "baseline) appear when the sweep has the teacher's scores and a baseline trial.")
    import pandas as pd

    t, ranked = rank_order(d.table, d.metric, d.mode) if d.has_metric() else (d.table, 0)
    cols = ["trial", "status", "family"] + d.params + d.seed_params + [d.metric] + d.bench_columns
    cols += ["val/loss", "val/ppl", "val/iia/mean", "step", "runtime_s", "tokens"]
    cols = [c for c in dict.fromkeys(cols) if c and c in t.columns]
    board = t[cols].copy()
    board.insert(0, "rank", [str(i + 1) if i < ranked else "–" for i in range(len(board))])
    if d.teacher:
        teacher_row = {c: d.teacher.get(c) for c in cols}
        teacher_row.update(rank="", trial="teacher", status="", family="teacher")
        board = pd.concat([pd.DataFrame([teacher_row]), board], ignore_index=True)
    s.add_table(board)
    done = d.done
    baseline = done[done["family"] == "baseline"]
    missing = []
    if not d.teacher:
        missing.append("the teacher's own benchmark scores (no teacher/bench.json: the sweep ran with "
                       "eval.teacher false, a random preset teacher, no eval.tasks, or the teacher's scoring failed "
                       "or has not finished)")
    if baseline.empty:
        missing.append("a baseline trial (a student trained with the task loss alone: objective family 'baseline')")
    if missing:
        s.text("Teacher–baseline gap closed: not shown; the sweep lacks " + " and ".join(missing) + ".")
        return s
    rows = []
    for _, r in t.iterrows():
        row = {"trial": r["trial"], "family": r["family"]}
        for c in d.bench_columns:
            b, te = baseline[c].mean(), d.teacher.get(c)
            gap = None if te is None or b != b or te == b else (r[c] - b) / (te - b)
            row[f"gap closed {c.removeprefix('bench/')}"] = gap
        rows.append(row)
    s.text(f"Fraction of the teacher–baseline gap closed (baseline: mean of {len(baseline)} baseline trial(s)):")
    s.add_table(pd.DataFrame(rows))
    return s


def parameters(d: SweepData) -> Section:
    s = Section("parameters", "Metric against each swept parameter",
                "One plot per swept parameter: each dot is a trial, coloured by objective family (numeric values as a "
                "scatter, log-scaled when sampled log-uniformly; categorical values as a box per value). A clear "
                "trend or a box far from the others marks a parameter that matters; overlapping clouds mean it "
                "does not, at this number of trials. The parallel-coordinates view draws each trial as a line "
                "across every parameter (each axis scaled to its range, extremes printed) and the metric.")
    d = _finished(d)
    if not d.has_metric():
        s.text(f"No finished or stopped trial has reported {d.metric} yet.")
        return s
    if not d.params:
        s.text("The sweep varies no parameter other than seeds.")
        return s
    for p in d.params:
        png = F.metric_vs_param(d.table, p, d.metric, d.mode, log=p in d.log_params, teacher=d.teacher)
        s.figure(f"param_{_slug(p)}", f"{d.metric} against {F.short(p)}", png)
    s.figure("parallel_coordinates", "parallel coordinates: every swept parameter and the metric",
             F.parallel_coordinates(d.table, d.params, d.metric, d.log_params))
    return s


def importance(d: SweepData) -> Section:
    s = Section("importance", "Parameter importance",
                "How much each swept parameter explains the metric: a random forest (scikit-learn) is fitted to "
                "the trials' parameters and metric, and a parameter's importance is the drop in the forest's R² "
                "when its values are shuffled (mean ± std over 10 shuffles). Near zero: the metric does not depend "
                "on it within the swept range. With few trials this is a rough indication; the note gives the "
                "number it rests on.")
    d = _finished(d)
    if not d.has_metric():
        s.text(f"No finished or stopped trial has reported {d.metric} yet.")
        return s
    imp = S.parameter_importance(d.table, d.params, d.metric)
    s.text(f"Based on {imp.n_trials} trials with {d.metric}. " + imp.note
           + (f"; the forest's in-sample R² is {imp.r2:.3f}." if imp.r2 is not None else "."))
    if imp.table is not None:
        s.add_table(imp.table)
        s.figure("importance", "permutation importance of each swept parameter", F.importance_bars(imp.table))
    return s


def curves(d: SweepData) -> Section:
    s = Section("curves", "Learning curves",
                "Every loss term the trials logged (training, per logged step), every validation metric (val/*, "
                "at evaluations) and, where IIT's interchange-intervention accuracy was measured, IIA for each "
                "aligned pair (val/iia/t<teacher layer>-s<student layer>), one line per trial against the step. "
                "Diverging or flat curves show a term that did not train; a gap between training and validation "
                "loss shows over-fitting.")
    trials, keys = [], {"train": [], "val": [], "iia": []}
    for row in d.table.to_dict("records"):
        frame = d.trials[row["trial"]].curves
        if frame is None:
            continue
        trials.append((_trial_label(row), row["family"], frame))
        for k in frame.columns:
            if k in BOOKKEEPING or not _numeric(frame[k]):
                continue
            group = "iia" if k.startswith("val/iia/") else "val" if k.startswith("val/") else "train"
            if k not in keys[group]:
                keys[group].append(k)
    if not trials:
        s.text("No trial has written metrics.jsonl yet.")
        return s
    from_tune = sum(f.attrs.get("source") == "tune" for _, _, f in trials)
    s.text(f"{len(trials)} of {len(d.table)} trials have curves"
           + (f"; for {from_tune} of them no metrics.jsonl is in the storage, so their curves are the results "
              "reported to Tune (Tune's result.json: evaluations only)." if from_tune else " (metrics.jsonl)."))
    names = {"train": ("loss_terms", "training loss terms (and their diagnostics) per logged step"),
             "val": ("validation", "validation metrics per evaluation"),
             "iia": ("iia_pairs", "IIA per aligned pair (and their mean) per evaluation")}
    for group, (name, caption) in names.items():
        ks = sorted(keys[group], key=lambda k: (k.count("/"), k != "loss", k != "val/loss", k))
        if ks:
            s.figure(f"curves_{name}", caption, F.curves(trials, ks))
        elif group == "iia":
            s.text("No trial measured IIA (configure objectives.iit, weight 0 included, to measure it).")
    return s


def iia(d: SweepData) -> Section:
    s = Section("iia", "IIA against downstream scores",
                "Does causal agreement with the teacher predict quality? Each dot is a trial's final mean IIA "
                "(val/iia/mean) against a downstream score; the title gives Spearman's rank correlation ρ, its "
                "p-value and the number of trials. A consistent sign across scores, with a small p-value, "
                "suggests IIA tracks quality; mind the direction of each score (perplexity: lower is better).")
    d = _finished(d)
    x = "val/iia/mean"
    if x not in d.table.columns or d.table[x].notna().sum() == 0:
        s.text("No trial measured IIA (val/iia/mean): configure objectives.iit (weight 0 included) in the sweep.")
        return s
    ys = [c for c in dict.fromkeys(([d.metric] if d.metric else []) + d.bench_columns) if c in d.table.columns
          and d.table[c].notna().any()][:9]
    if not ys:
        s.text("No trial has a downstream score yet.")
        return s
    import pandas as pd

    rows, titles = [], []
    for y in ys:
        c = S.correlation(d.table[x], d.table[y])
        rows.append({"score": y, "n": c["n"], "spearman_rho": c["rho"], "p_value": c["p_value"]})
        titles.append(f"{y.removeprefix('bench/')}\nρ={_f(c['rho'])}, p={_f(c['p_value'])}, n={c['n']}")
    s.add_table(pd.DataFrame(rows))
    per_pair = []  # the last evaluation's IIA of each aligned pair, from each trial's metrics.jsonl
    for row in d.table.to_dict("records"):
        curves = d.trials[row["trial"]].curves
        cols = [] if curves is None else [c for c in curves.columns if c.startswith("val/iia/") and c != x]
        last = {c: curves[c].dropna().iloc[-1] for c in cols if curves[c].notna().any()}
        if last:
            per_pair.append({"trial": row["trial"], "family": row["family"], **{p: row[p] for p in d.params},
                             **dict(sorted(last.items()))})
    if per_pair:
        s.text("Final IIA per aligned pair (val/iia/t<teacher layer>-s<student layer>, last evaluation):")
        s.add_table(pd.DataFrame(per_pair))
    s.figure("iia_vs_scores", "final mean IIA against each downstream score",
             F.scatter_panels(d.table, x, ys, titles, "val/iia/mean (final)", teacher=d.teacher))
    return s


def cost(d: SweepData) -> Section:
    s = Section("cost", "Cost against quality",
                "Each trial's cost, wall-clock runtime (training and benchmark scoring, from Tune) and training "
                "tokens (non-padding tokens over all workers, from metrics.jsonl), against the metric. The Pareto "
                "front joins the trials that no other trial beats on both cost and metric: the ones worth "
                "choosing between; a trial far from the front pays more for the same quality.")
    if not d.has_metric():
        s.text(f"No trial has reported {d.metric} yet.")
        return s
    import pandas as pd

    costs = [(c, label) for c, label in (("runtime_s", "runtime per trial (s)"), ("tokens", "training tokens"))
             if c in d.table.columns and d.table[c].notna().any()]
    if not costs:
        s.text("No trial recorded its runtime or tokens.")
        return s
    if "status" in d.table.columns:  # a running trial's runtime is not its cost yet
        done = d.table[d.table["status"].isin(["finished", "stopped"])]
        if len(done) < len(d.table):
            s.text(f"{len(done)} finished or stopped trials (running, pending and failed ones have no final cost).")
    else:
        done = d.table
    fronts = {c: S.pareto_front(done, c, d.metric, d.mode) for c, _ in costs}
    for c, label in costs:
        front = fronts[c]
        s.text(f"Pareto front for {label}: {len(front)} of {done[[c, d.metric]].dropna().shape[0]} trials.")
        cols = ["trial", "family"] + d.params + [c, d.metric]
        s.add_table(pd.DataFrame(front[[k for k in dict.fromkeys(cols) if k in front.columns]]))
    s.figure("cost_quality", "cost against quality with the Pareto front",
             F.cost_quality(done, costs, d.metric, d.mode, fronts))
    return s


def seeds(d: SweepData) -> Section:
    s = Section("seeds", "Repeated seeds: confidence intervals and paired comparison",
                "When a configuration was run more than once (different seeds, or repeated samples), its mean "
                "metric with a 95% confidence interval (Student t) shows how much of a difference between "
                "configurations is noise: overlapping intervals are not a difference. Objective families are then "
                "compared on the seeds both ran (each family's mean at a seed; paired t-test and Wilcoxon "
                "signed-rank test, scipy): a small p-value with a confidence interval of the difference that "
                "excludes 0 means the families differ beyond seed noise.")
    d = _finished(d)
    if not d.has_metric():
        s.text(f"No finished or stopped trial has reported {d.metric} yet.")
        return s
    table = S.replicate_intervals(d.table, d.metric)
    repeated = d.table["configuration"].duplicated(keep=False).any()
    if table.empty and repeated:
        s.text(f"Configurations repeat, but none has two trials with {d.metric} yet.")
    elif table.empty:
        s.text("No configuration was run more than once: sweep the seed (space: {train.seed: {grid: [0, 1, 2]}}) "
               "or set num_samples > 1 to get confidence intervals.")
    else:
        s.add_table(table)
        s.figure("seed_intervals", "mean and 95% confidence interval per configuration",
                 F.intervals(table, d.table, d.metric))
    paired = S.paired_families(d.table, d.metric)
    note = paired.note
    if note and d.seed_params and d.table["family"].nunique() > 1:
        note = f"no two families share two or more seeds with {d.metric} yet"
    if paired.table is None:
        s.text("Paired comparison: " + note + ".")
        return s
    if note:
        s.text("Paired comparison: " + note + ".")
    testable = paired.table[paired.table["n_seeds"] >= 2]
    if not testable.empty:
        s.text(f"Paired comparison of objective families on {d.metric} (mean_diff = family_a − family_b; "
               f"{'negative' if d.mode == 'min' else 'positive'} favours family_a):")
        s.add_table(testable)
        s.figure("paired_families", "each seed's metric per objective family",
                 F.paired_slopes(paired.by_seed, d.metric))
    return s


def _numeric(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _f(v) -> str:
    return "–" if v is None else f"{v:.2g}"


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", F.short(text)).strip("_") or "param"


BUILDERS = (overview, leaderboard, parameters, importance, curves, iia, cost, seeds)


def build_sections(d: SweepData) -> list[Section]:
    return [b(d) for b in BUILDERS]
