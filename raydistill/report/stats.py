"""The report's statistics, each from the field's libraries: parameter importance (scikit-learn random
forest + permutation importance), Pareto fronts (pandas), confidence intervals and paired tests (scipy),
rank correlation (scipy). Inputs are the report's trial table; every result says how many trials it
rests on."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

MIN_IMPORTANCE_TRIALS = 4


@dataclass
class Importance:
    table: Any = None          # DataFrame: parameter, importance, std (sorted, largest first)
    n_trials: int = 0
    r2: float | None = None    # the forest's in-sample fit
    note: str = ""


def parameter_importance(frame, params: list[str], metric: str, seed: int = 0) -> Importance:
    """Permutation importance of each swept parameter for a random forest fitted on the trials: how much
    the forest's R² drops when that parameter's values are shuffled (scikit-learn, mean ± std over
    repeats). Categorical values are ordinal-encoded inside the pipeline, so whole parameters are permuted."""
    import numpy as np
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OrdinalEncoder

    done = frame.dropna(subset=[metric]) if metric in frame.columns else frame.iloc[0:0]
    varying = [p for p in params if p in done.columns and done[p].astype(str).nunique() > 1]
    n = len(done)
    if not varying:
        return Importance(n_trials=n, note="no swept parameter takes more than one value among the trials "
                                            "with the metric")
    if n < MIN_IMPORTANCE_TRIALS:
        return Importance(n_trials=n, note=f"{n} trial(s) with the metric: importance needs at least "
                                           f"{MIN_IMPORTANCE_TRIALS}")
    X = pd.DataFrame(index=done.index)
    numeric, categorical = [], []
    for p in varying:
        values = pd.to_numeric(done[p], errors="coerce")
        if values.notna().all():
            X[p] = values.astype(float)
            numeric.append(p)
        else:
            X[p] = done[p].astype(str)
            categorical.append(p)
    y = done[metric].astype(float).to_numpy()
    encode = ColumnTransformer([("cat", OrdinalEncoder(), categorical), ("num", "passthrough", numeric)])
    model = Pipeline([("encode", encode),
                      ("forest", RandomForestRegressor(n_estimators=100, min_samples_leaf=1, random_state=seed))])
    model.fit(X, y)
    r2 = float(model.score(X, y)) if np.ptp(y) > 0 else None
    result = permutation_importance(model, X, y, n_repeats=10, random_state=seed, n_jobs=1)
    table = pd.DataFrame({"parameter": [p.removeprefix("config/") for p in X.columns],
                          "importance": result.importances_mean, "std": result.importances_std})
    table = table.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)
    note = (f"random forest (100 trees) on {n} trials; permutation importance = drop in R² when a parameter is "
            "shuffled (10 repeats), measured on the trials the forest was fitted on")
    if n < 20:
        note += f"; with {n} trials it is a rough indication, not an estimate"
    return Importance(table=table, n_trials=n, r2=r2, note=note)


def pareto_front(frame, cost: str, metric: str, mode: str):
    """The trials no other trial beats on both cost (lower is better) and the metric: sorted by cost, a
    trial is on the front when its metric is strictly better than every cheaper trial's."""
    done = frame.dropna(subset=[cost, metric])
    if done.empty:
        return done
    better_first = mode == "max"
    ordered = done.sort_values([cost, metric], ascending=[True, not better_first], kind="stable")
    values = ordered[metric] if mode == "min" else -ordered[metric]
    best_before = values.cummin().shift(1)
    return ordered[best_before.isna() | (values < best_before)]


def replicate_intervals(frame, metric: str, group: str = "configuration", confidence: float = 0.95):
    """Per configuration with at least two trials: n, mean, standard deviation and the t-based confidence
    interval of the mean (scipy.stats.t)."""
    import pandas as pd
    from scipy import stats

    done = frame.dropna(subset=[metric])
    rows = []
    for key, part in done.groupby(group, sort=False):
        values = part[metric].astype(float)
        if len(values) < 2:
            continue
        mean, sem = values.mean(), stats.sem(values)
        low, high = (stats.t.interval(confidence, len(values) - 1, loc=mean, scale=sem) if sem > 0
                     else (mean, mean))
        rows.append({group: key, "family": part["family"].iloc[0] if "family" in part else "", "n": len(values),
                     "mean": mean, "std": values.std(ddof=1), "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=[group, "family", "n", "mean", "std", "ci_low", "ci_high"])


@dataclass
class PairedComparison:
    table: Any = None                  # DataFrame: one row per pair of families
    by_seed: Any = None                # DataFrame: seed x family, the family's mean metric at that seed
    note: str = ""
    notes: list[str] = field(default_factory=list)


def paired_families(frame, metric: str, seed: str = "seed", family: str = "family",
                    confidence: float = 0.95) -> PairedComparison:
    """Objective families compared on the seeds both ran: per seed, each family's mean metric (over its
    configurations); for each pair of families, the mean difference with its confidence interval and the
    paired t-test's p-value (scipy.stats.ttest_rel), plus the Wilcoxon signed-rank p-value."""
    import pandas as pd
    from scipy import stats

    done = frame.dropna(subset=[metric, seed]) if {metric, seed} <= set(frame.columns) else frame.iloc[0:0]
    if done.empty or done[family].nunique() < 2:
        return PairedComparison(note="needs trials of at least two objective families with a seed and the metric")
    by_seed = done.pivot_table(index=seed, columns=family, values=metric, aggfunc="mean")
    rows = []
    for a, b in combinations(by_seed.columns, 2):
        pair = by_seed[[a, b]].dropna()
        n = len(pair)
        row: dict[str, Any] = {"family_a": a, "family_b": b, "n_seeds": n}
        if n >= 2:
            diff = pair[a] - pair[b]
            row["mean_diff"] = float(diff.mean())
            if diff.std(ddof=1) > 0:
                test = stats.ttest_rel(pair[a], pair[b])
                ci = test.confidence_interval(confidence)
                row.update(t=float(test.statistic), p_value=float(test.pvalue), ci_low=float(ci.low),
                           ci_high=float(ci.high))
                row["wilcoxon_p"] = float(stats.wilcoxon(pair[a], pair[b]).pvalue) if (diff != 0).any() else None
            else:
                row.update(t=None, p_value=None, ci_low=row["mean_diff"], ci_high=row["mean_diff"], wilcoxon_p=None)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["family_a", "family_b", "n_seeds", "mean_diff", "ci_low", "ci_high", "t",
                                        "p_value", "wilcoxon_p"])
    testable = table[table["n_seeds"] >= 2]
    note = ("" if not testable.empty else
            "no two families share two or more seeds: sweep the seed (space: {train.seed: {grid: [0, 1, 2]}}) "
            "to compare them")
    return PairedComparison(table=table, by_seed=by_seed, note=note)


def correlation(x, y) -> dict[str, Any]:
    """Spearman's rank correlation (scipy) with its p-value and n; None values when n < 3 or constant."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    out: dict[str, Any] = {"n": int(len(x)), "rho": None, "p_value": None}
    if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        res = stats.spearmanr(x, y)
        out.update(rho=float(res.statistic), p_value=float(res.pvalue))
    return out
