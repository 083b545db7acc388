"""The report's figures, drawn with matplotlib (Agg, no display) and pandas' plotting; each returns a
``Figure`` holding its PNG bytes, which the HTML embeds (base64) and the Markdown links to."""

from __future__ import annotations

import io
from dataclasses import dataclass

FAMILY_COLORS = {"standard": "tab:blue", "iit": "tab:orange", "td": "tab:green", "baseline": "tab:gray",
                 "unknown": "tab:purple"}
DPI = 90


@dataclass
class Figure:
    name: str       # file stem under figures/
    caption: str
    png: bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig, layout: bool = True) -> bytes:
    """PNG bytes of the figure, closed afterwards. One tight_layout pass instead of savefig's
    bbox_inches="tight" (which draws the whole figure an extra time)."""
    plt = _plt()
    if layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def family_color(family: str) -> str:
    return FAMILY_COLORS.get(family, "tab:purple")


def short(column: str) -> str:
    return column.removeprefix("config/")


def _family_legend(ax, families) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=family_color(f), label=f) for f in families]
    handles += [h for h, label in zip(*ax.get_legend_handles_labels()) if label == "teacher"]
    if handles:
        ax.legend(handles=handles, title="objective family", fontsize=8, title_fontsize=8, loc="best")


def _teacher_line(ax, teacher: dict | None, metric: str, horizontal: bool = True) -> None:
    if teacher and metric in teacher:
        (ax.axhline if horizontal else ax.axvline)(teacher[metric], color="black", linestyle="--", linewidth=1,
                                                   label="teacher")


def metric_vs_param(frame, param: str, metric: str, mode: str, log: bool = False,
                    teacher: dict | None = None) -> bytes:
    """A numeric parameter: scatter; a categorical one: a box per value with the trials on top. Colour: family."""
    import numpy as np
    import pandas as pd

    plt = _plt()
    done = frame.dropna(subset=[metric])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    numeric = pd.to_numeric(done[param], errors="coerce")
    if numeric.notna().all() and done[param].nunique() > 0 and not done[param].map(type).eq(str).any():
        for fam, part in done.groupby("family"):
            ax.scatter(numeric[part.index], part[metric], color=family_color(fam), label=fam, alpha=0.85)
        if log:
            ax.set_xscale("log")
    else:
        values = done[param].astype(str)
        cats = list(dict.fromkeys(values))
        groups = [done.loc[values == c, metric].astype(float).to_numpy() for c in cats]
        ax.boxplot(groups, positions=range(len(cats)), widths=0.5, showfliers=False)
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(done))
        pos = values.map({c: i for i, c in enumerate(cats)}).to_numpy() + jitter
        ax.scatter(pos, done[metric], c=[family_color(f) for f in done["family"]], alpha=0.85, zorder=3)
        ax.set_xticks(range(len(cats)), cats, rotation=30 if max(map(len, cats), default=0) > 8 else 0,
                      ha="right" if max(map(len, cats), default=0) > 8 else "center")
    _teacher_line(ax, teacher, metric)
    ax.set_xlabel(short(param))
    ax.set_ylabel(metric, fontsize=8)
    ax.set_title(f"{'lower' if mode == 'min' else 'higher'} is better", fontsize=8)
    ax.grid(alpha=0.3)
    _family_legend(ax, sorted(done["family"].unique()))
    return _png(fig)


def parallel_coordinates(frame, params: list[str], metric: str, log: set[str] = frozenset()) -> bytes:
    """pandas' parallel coordinates over the swept parameters and the metric, one line per trial coloured by
    family. Each axis is scaled to its own range (log-uniform parameters on a log scale): numbers are annotated
    with their extremes, categories with their names at their positions."""
    import numpy as np
    import pandas as pd
    from pandas.plotting import parallel_coordinates as draw

    plt = _plt()
    done = frame.dropna(subset=[metric])
    cols = params + [metric]
    scaled = pd.DataFrame(index=done.index)
    ticks: list[list[tuple[float, str]]] = []
    for c in cols:
        values = pd.to_numeric(done[c], errors="coerce")
        if values.notna().all() and not done[c].map(type).eq(str).any():
            lo, hi = float(values.min()), float(values.max())
            marks = [(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")] if hi > lo else [(0.5, f"{lo:.3g}")]
            if c in log and lo > 0:  # sampled log-uniformly: a log axis
                values, lo, hi = np.log10(values), np.log10(lo), np.log10(hi)
        else:
            cats = list(dict.fromkeys(done[c].astype(str)))
            values = done[c].astype(str).map({k: i for i, k in enumerate(cats)}).astype(float)
            lo, hi = 0.0, float(max(len(cats) - 1, 1))
            marks = [((i - lo) / (hi - lo) if len(cats) > 1 else 0.5, k[:18]) for i, k in enumerate(cats)]
        scaled[short(c)] = (values - lo) / (hi - lo) if hi > lo else 0.5
        ticks.append(marks)
    scaled["family"] = done["family"].to_numpy()
    fams = list(dict.fromkeys(scaled["family"]))  # pandas colours the classes in order of appearance
    fig, ax = plt.subplots(figsize=(max(6.4, 1.9 * len(cols)), 4.2))
    draw(scaled, "family", ax=ax, color=[family_color(f) for f in fams], alpha=0.8)
    for i, marks in enumerate(ticks):
        for y, text in marks:
            ax.annotate(text, (i, y), xytext=(3, 0), textcoords="offset points", fontsize=7, va="center",
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "alpha": 0.7, "lw": 0})
    ax.set_yticks([])
    ax.set_ylim(-0.06, 1.06)
    ax.legend(title="objective family", fontsize=8, title_fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1),
              ncol=len(fams))
    return _png(fig)


def importance_bars(table) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.45 * len(table)))
    ordered = table.iloc[::-1]
    ax.barh(ordered["parameter"], ordered["importance"], xerr=ordered["std"], color="tab:blue", alpha=0.8)
    ax.set_xlabel("permutation importance (drop in R²)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def curves(trials: list[tuple[str, str, object]], keys: list[str], ncols: int = 3) -> bytes:
    """One panel per key (a loss term or validation metric), one line per trial against the step.
    ``trials``: (label, family, curves DataFrame)."""
    plt = _plt()
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    colors = plt.get_cmap("tab10" if len(trials) <= 10 else "tab20")
    for ax, key in zip(axes.flat, keys):
        for i, (label, _family, frame) in enumerate(trials):
            if frame is None or key not in frame.columns:
                continue
            part = frame[["step", key]].dropna()
            if not part.empty:
                ax.plot(part["step"], part[key], marker="." if len(part) < 30 else None, color=colors(i % colors.N),
                        label=label, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    bottom = 0.0
    if handles:
        shown = min(len(handles), 20)
        legend_h = 0.45 + 0.2 * ((shown + 2) // 3)  # inches: title and one row per 3 trials
        fig.set_figheight(fig.get_figheight() + legend_h)
        bottom = legend_h / fig.get_figheight()
        fig.legend(handles[:shown], labels[:shown], loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, shown),
                   fontsize=8, title="trial" + (" (first 20)" if len(handles) > 20 else ""), title_fontsize=8)
    # Fixed margins (inches) instead of tight_layout: every panel has the same size, and a layout pass
    # over dozens of panels costs as much as drawing them.
    width, height = fig.get_figwidth(), fig.get_figheight()
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.2 / width, top=1 - 0.35 / height,
                        bottom=bottom + 0.5 / height, wspace=0.32, hspace=0.6)
    return _png(fig, layout=False)


def scatter_panels(frame, x: str, ys: list[str], titles: list[str], xlabel: str, teacher: dict | None = None) -> bytes:
    """One panel per y column: ``x`` against it, coloured by family (IIA against each downstream score)."""
    plt = _plt()
    ncols = min(3, len(ys))
    nrows = (len(ys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
    for ax, y, title in zip(axes.flat, ys, titles):
        part = frame.dropna(subset=[x, y])
        ax.scatter(part[x], part[y], c=[family_color(f) for f in part["family"]], alpha=0.85)
        _teacher_line(ax, teacher, y)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(y, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ys):]:
        ax.axis("off")
    _family_legend(axes.flat[0], sorted(frame.dropna(subset=[x])["family"].unique()))
    return _png(fig)


def cost_quality(frame, costs: list[tuple[str, str]], metric: str, mode: str, fronts: dict) -> bytes:
    """Each cost (column, label) against the metric; the Pareto front as a step line through its trials."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(costs), figsize=(5.2 * len(costs), 3.8), squeeze=False)
    for ax, (col, label) in zip(axes.flat, costs):
        part = frame.dropna(subset=[col, metric])
        ax.scatter(part[col], part[metric], c=[family_color(f) for f in part["family"]], alpha=0.85, zorder=3)
        front = fronts.get(col)
        if front is not None and not front.empty:
            ax.step(front[col], front[metric], where="post", color="black", linewidth=1, label="Pareto front")
            ax.scatter(front[col], front[metric], facecolors="none", edgecolors="black", s=90, zorder=4)
            for _, r in front.iterrows():
                ax.annotate(str(r["trial"])[-5:], (r[col], r[metric]), xytext=(4, 4), textcoords="offset points",
                            fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel(metric, fontsize=8)
        ax.set_title(f"{'lower' if mode == 'min' else 'higher'} is better", fontsize=8)
        ax.grid(alpha=0.3)
    _family_legend(axes.flat[0], sorted(frame.dropna(subset=[metric])["family"].unique()))
    return _png(fig)


def intervals(table, frame, metric: str, group: str = "configuration") -> bytes:
    """Mean and 95% confidence interval per configuration, with each trial as a dot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.55 * len(table)))
    for i, r in enumerate(table.itertuples(index=False)):
        row = r._asdict()
        color = family_color(row["family"])
        ax.errorbar(row["mean"], i, xerr=[[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]], fmt="o",
                    color=color, capsize=4)
        points = frame.loc[frame[group] == row[group], metric].dropna()
        ax.scatter(points, [i] * len(points), color=color, alpha=0.35, s=14)
    ax.set_yticks(range(len(table)), [str(v)[:50] for v in table[group]], fontsize=8)
    ax.set_ylim(-0.6, len(table) - 0.4)
    ax.set_xlabel(f"{metric}: mean and 95% CI")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def paired_slopes(by_seed, metric: str) -> bytes:
    """Each seed's metric for each family, joined by a line: the paired comparison at a glance."""
    plt = _plt()
    fams = list(by_seed.columns)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(fams)), 3.8))
    for seed, row in by_seed.iterrows():
        ax.plot(range(len(fams)), row.to_numpy(dtype=float), marker="o", color="tab:gray", alpha=0.6)
        last = row.dropna()
        if not last.empty:
            ax.annotate(f"seed {seed}", (fams.index(last.index[-1]), last.iloc[-1]), xytext=(4, 0),
                        textcoords="offset points", fontsize=7)
    for i, fam in enumerate(fams):
        ax.scatter([i] * len(by_seed), by_seed[fam], color=family_color(fam), zorder=3)
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return _png(fig)
