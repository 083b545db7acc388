"""A sweep as the report sees it: one table row per trial plus each trial's own files.

Read from what sweeps write under STORAGE_PATH/NAME (see README, Sweeps): ``results.parquet``/``.csv``
(one row per trial), ``sweep.yaml`` (metric, mode, search space), and per trial ``trial_<id>/``:
``metrics.jsonl`` (learning curves), ``bench.json`` (benchmark scores), ``trial.jsonl`` (driver starts
and ends), ``config.resolved.json`` (the trial's full config: objective family, seed, tokens per step).
Where the results table is missing (not written yet, or an s3/gs sweep from before sweeps wrote it there),
rows are rebuilt from each trial folder: Tune's ``params.json`` and ``result.json``, ``final_result.json`` where the
trial driver saves it, and the files above; Tune's newest ``experiment_state-*.json`` tells a trial a scheduler
stopped from a running one.

Nothing here imports the training code: a report can be built on a machine without torch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from raydistill.report.store import SweepStore, display_location
from raydistill.ranking import done_mask, metric_direction, trial_runtime_s, trial_status

# Objectives that make a trial "IIT" or "TD"; anything else with a teacher is standard distillation.
IIT_OBJECTIVES = ("iit", "iit_cosine")
TD_OBJECTIVES = ("td",)
TASK_ONLY = ("task",)
# Keys of a metrics.jsonl row that are not curves.
BOOKKEEPING = {"step", "time", "lr", "tokens_per_s", "step_time_s", "epoch"}
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "error", "runtime", "time")


@dataclass
class Trial:
    id: str
    folder: str                              # trial_<id>, relative to the sweep directory
    config: dict | None = None               # config.resolved.json
    curves: Any = None                       # metrics.jsonl as a DataFrame (last row of a step wins); attrs["source"]
    bench: dict | None = None                # bench.json
    events: list[dict] = field(default_factory=list)  # trial.jsonl


@dataclass
class SweepData:
    location: str
    name: str
    metric: str | None
    mode: str                                # "min" | "max"
    spec: dict | None                        # sweep.yaml
    table: Any                               # DataFrame, one row per trial, plus family/seed/tokens/configuration
    params: list[str]                        # swept config columns (config/<path>), seeds excluded
    seed_params: list[str]                   # swept seed columns
    trials: dict[str, Trial]
    teacher: dict[str, float] | None         # bench/<task>/<metric> -> the teacher's own score
    notes: list[str] = field(default_factory=list)
    log_params: set[str] = field(default_factory=set)  # params sampled on a log scale

    @property
    def bench_columns(self) -> list[str]:
        return [c for c in self.table.columns if c.startswith("bench/")]

    def has_metric(self) -> bool:
        return bool(self.metric) and self.metric in self.table.columns and self.table[self.metric].notna().any()

    @property
    def done(self):
        """The finished and stopped trials: a running, failed or interrupted trial's metric is an intermediate value."""
        return self.table[done_mask(self.table)]


def guess_mode(metric: str) -> str:
    """The direction a trial metric's name says (``raydistill.ranking``); for any other column, lower is
    better when its name says loss, time or error."""
    return metric_direction(metric) or ("min" if any(w in metric.lower() for w in LOWER_IS_BETTER) else "max")


def objective_family(objectives: dict | None) -> str:
    """'iit', 'td', 'standard' (kd, cosine, divergences), 'baseline' (task loss only) from an objectives section."""
    if not isinstance(objectives, dict):
        return "unknown"
    active = {k for k, v in objectives.items() if isinstance(v, dict) and (v.get("weight") or 0) > 0}
    if active & set(IIT_OBJECTIVES):
        return "iit"
    if active & set(TD_OBJECTIVES):
        return "td"
    if active - set(TASK_ONLY):
        return "standard"
    return "baseline" if active else "unknown"


def tokens_seen(curves) -> float | None:
    """Training tokens (non-padding, all workers) from metrics.jsonl: each logged row's tokens_per_s times
    the window's time (step_time_s x steps since the previous row) is exactly the window's token count."""
    if curves is None or curves.empty or not {"tokens_per_s", "step_time_s", "step"} <= set(curves.columns):
        return None
    rows = curves.dropna(subset=["tokens_per_s", "step_time_s"]).sort_values("step")
    if rows.empty:
        return None
    steps = rows["step"].diff().fillna(rows["step"].iloc[0])
    return float((rows["tokens_per_s"] * rows["step_time_s"] * steps).sum())


def _set_path(tree: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        nxt = tree.get(k)
        if not isinstance(nxt, dict):
            nxt = tree[k] = {}
        tree = nxt
    tree[keys[-1]] = value


def _get_path(tree: Any, path: str) -> Any:
    for k in path.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(k)
    return tree


def _named_value(space: dict, path: str, value: Any) -> Any:
    """A named choice/grid entry's value (Tune samples the name) or the value itself."""
    dim = (space or {}).get(path)
    if isinstance(dim, dict):
        for kind in ("choice", "grid"):
            options = dim.get(kind)
            if isinstance(options, dict) and isinstance(value, str) and value in options:
                return options[value]
    return value


def _spec_config(spec: dict | None, row: dict) -> dict | None:
    """A trial's config approximated from sweep.yaml's base and the row's swept values (no resolved config)."""
    if not spec or not isinstance(spec.get("base"), dict):
        return None
    import copy

    cfg = copy.deepcopy(spec["base"])
    for path, value in (spec.get("set") or {}).items():
        _set_path(cfg, path, value)
    for col, value in row.items():
        if col.startswith("config/") and not _missing(value):
            _set_path(cfg, col[len("config/"):], _named_value(spec.get("space") or {}, col[len("config/"):], value))
    return cfg


def _short_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _configurations(table, params: list[str]) -> list[str]:
    """Each row's configuration label, which groups replicates: the values to 4 significant digits, or in full
    where two different configurations (learning rates sampled 1e-7 apart) would share the rounded label."""
    rows = list(table[params].itertuples(index=False))
    exact = [", ".join(f"{p.removeprefix('config/')}={v}" for p, v in zip(params, r)) for r in rows]
    short = [", ".join(f"{p.removeprefix('config/')}={_short_value(v)}" for p, v in zip(params, r)) for r in rows]
    owners: dict[str, set[str]] = {}
    for label, full in zip(short, exact):
        owners.setdefault(label, set()).add(full)
    return [label if len(owners[label]) == 1 else full for label, full in zip(short, exact)]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _read_spec(store: SweepStore) -> dict | None:
    import yaml

    text = store.read_text("sweep.yaml")
    if text is None:
        return None
    try:
        # The runner writes sweep.yaml with a SafeDumper (floats as 1.0e-06, number-like strings quoted), which
        # safe_load reads back exactly; raydistill.config's reader would import the objectives (torch).
        data = yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - being written, or not YAML: report without it
        return None
    return data if isinstance(data, dict) else None


def _read_curves(store: SweepStore, folder: str):
    """metrics.jsonl (every logged step); where a trial has none in the storage (an s3/gs sweep whose trial
    artifacts Tune did not upload), Tune's result.json: the results reported to Tune, evaluations and the
    end, marked ``source='tune'``."""
    import pandas as pd

    rows = store.read_jsonl(f"{folder}/metrics.jsonl")
    source = "metrics.jsonl"
    if not rows:
        rows = [{k: v for k, v in r.items() if k == "step" or ("/" in k or k in ("loss",)) and not isinstance(v, bool)
                 and isinstance(v, (int, float)) and not k.startswith("bench/")}
                for r in store.read_jsonl(f"{folder}/result.json") if isinstance(r.get("step"), (int, float))]
        rows = [r for r in rows if len(r) > 1]
        source = "tune"
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    frame.attrs["source"] = source
    if "step" in frame.columns:  # after a resume the last row of a step wins
        frame = frame.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
        frame.attrs["source"] = source
    return frame


def _tune_states(store: SweepStore) -> dict[str, tuple[str, dict]]:
    """trial id -> (Tune's status, its last result) from Tune's newest experiment state file: the only record of
    a trial a scheduler stopped (TERMINATED, no end event of its own). Empty when there is none."""
    names = [n for n, kind in store.listdir() if kind == "file" and n.startswith("experiment_state-")
             and n.endswith(".json")]
    state = store.read_json(max(names)) if names else None  # the names end in a sortable timestamp
    out: dict[str, tuple[str, dict]] = {}
    for entry in (state or {}).get("trial_data", []):
        try:
            trial, runtime = (json.loads(x) if isinstance(x, str) else x for x in entry[:2])
            out[str(trial["trial_id"])] = (str(trial["status"]), runtime.get("last_result") or {})
        except (ValueError, TypeError, KeyError, AttributeError):  # another Tune's layout: the folders alone
            continue
    return out


def _rows_from_trial_folders(store: SweepStore, folders: list[str], spec: dict | None) -> list[dict]:
    """Results rows rebuilt from trial folders (Tune's params.json/result.json, trial.jsonl) and Tune's
    experiment state."""
    tune_states = _tune_states(store)
    rows = []
    for folder in folders:
        tid = folder[len("trial_"):]
        row: dict[str, Any] = {"trial": tid}
        params = store.read_json(f"{folder}/params.json") or {}
        for k, v in params.items():
            row[f"config/{k}"] = v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
        results = store.read_jsonl(f"{folder}/result.json")
        last = results[-1] if results else {}
        final = store.read_json(f"{folder}/final_result.json")  # the trial's last report, where the driver saves it
        if isinstance(final, dict):
            last = {**last, **final}
        events = store.read_jsonl(f"{folder}/trial.jsonl")
        ended = any(e.get("event") == "end" for e in events) or bool(last.get("finished"))
        for e in events:
            if e.get("event") == "end":
                last = {**last, **{k: v for k, v in e.items() if k.startswith("bench/")}}
        tune_status, tune_last = tune_states.get(tid, ("", {}))
        # An end event, or Tune's last word on a trial that is over: the rule results.csv uses.
        if ended or tune_status in ("TERMINATED", "ERROR"):
            row["status"] = trial_status(tune_status, tune_last, ended)
        # Tune's error.txt: the trial failed (after an end event it is from an attempt that Tune retried).
        elif store.exists(f"{folder}/error.txt"):
            row["status"] = "failed"
        else:
            row["status"] = "running" if results or events else "pending"
        for k, v in last.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and ("/" in k or k in ("loss", "step")):
                row[k] = v
        runtime = trial_runtime_s(last)  # as results.csv
        if runtime is not None:
            row["runtime_s"] = runtime
        row["trial_dir"] = store.path(folder)
        rows.append(row)
    return rows


def load_sweep(location: str, metric: str | None = None, mode: str | None = None) -> SweepData:
    """Everything the report shows, read from the sweep directory (finished or still running)."""
    import pandas as pd

    store = SweepStore(location)
    notes: list[str] = []
    spec = _read_spec(store)
    if spec is None:
        notes.append("no sweep.yaml: metric, mode and search space are not known from the sweep itself "
                     "(an object-storage sweep from before sweeps wrote it there, or no raydistill sweep)")
    folders = [n for n, kind in store.listdir() if kind == "dir" and n.startswith("trial_")]
    table = store.read_table("results")
    if table is None:
        if not folders:
            from raydistill.errors import ConfigError

            raise ConfigError(f"{location}: no results table and no trial_<id>/ folders: not a raydistill sweep "
                              "directory, or no trial has started yet")
        table = pd.DataFrame(_rows_from_trial_folders(store, folders, spec))
        notes.append("no results.csv/results.parquet (not written yet, or an object-storage sweep from before sweeps "
                     "wrote it there): rows rebuilt from the trial folders (Tune's params.json and result.json, "
                     "final_result.json, trial.jsonl)")
    table = table.copy()
    table["trial"] = table["trial"].astype(str)

    name = (spec or {}).get("name") or display_location(location).rstrip("/").rsplit("/", 1)[-1]
    sweep_metric = (spec or {}).get("metric")
    if metric is None:
        metric = sweep_metric
        if metric is None:
            bench = [c for c in table.columns if c.startswith("bench/")]
            metric = bench[0] if bench else ("val/loss" if "val/loss" in table.columns else None)
            if metric:
                notes.append(f"metric {metric!r} chosen by the report (give --metric to choose)")
    if metric and metric not in table.columns:
        known = [c for c in table.columns if c.startswith(("bench/", "val/")) or c == "loss"]
        notes.append(f"no trial has a column {metric!r} (yet); the table has: {', '.join(known) or 'no metric'}")
    if mode is None:
        if metric is not None and metric == sweep_metric and (spec or {}).get("mode") in ("min", "max"):
            mode = spec["mode"]
        else:
            mode = guess_mode(metric or "")
            if metric:
                notes.append(f"mode for {metric!r} taken as {mode!r} from its name (give --mode to choose)")

    def read_trial(tid: str) -> Trial:
        folder = f"trial_{tid}"
        t = Trial(id=tid, folder=folder)
        if folder in folders:
            t.config = store.read_json(f"{folder}/config.resolved.json")
            t.curves = _read_curves(store, folder)
            t.bench = store.read_json(f"{folder}/bench.json")
            t.events = store.read_jsonl(f"{folder}/trial.jsonl")
        return t

    # Reading is I/O (object stores answer each request in tens of milliseconds): trials in parallel.
    from concurrent.futures import ThreadPoolExecutor

    records = table.to_dict("records")
    with ThreadPoolExecutor(max_workers=1 if store.is_local else 16) as pool:
        trials: dict[str, Trial] = {t.id: t for t in pool.map(read_trial, [r["trial"] for r in records])}
    families, seeds, tokens = [], [], []
    for row in records:
        t = trials[row["trial"]]
        cfg = t.config or _spec_config(spec, row)
        families.append(objective_family(_get_path(cfg, "objectives")))
        seed = _get_path(cfg, "train.seed")
        seeds.append(seed if seed is not None else row.get("config/train.seed"))
        tokens.append(tokens_seen(t.curves))
    table["family"] = families
    table["seed"] = seeds
    table["tokens"] = tokens

    config_cols = [c for c in table.columns if c.startswith("config/")]
    seed_params = [c for c in config_cols if c.rsplit(".", 1)[-1].endswith("seed")]
    params = [c for c in config_cols if c not in seed_params]
    # A configuration: every swept value except seeds; trials sharing one are replicates.
    table["configuration"] = _configurations(table, params) if params else "all"
    space = (spec or {}).get("space") or {}
    log_params = {f"config/{p}" for p, d in space.items() if isinstance(d, dict) and "loguniform" in d}

    teacher = None
    tb = store.read_json("teacher/bench.json")
    if isinstance(tb, dict) and tb.get("summary"):
        teacher = {f"bench/{r['task']}/{r['metric']}": float(r["mean"]) for r in tb["summary"]}
    return SweepData(location=display_location(location), name=name, metric=metric, mode=mode, spec=spec, table=table,
                     params=params, seed_params=seed_params, trials=trials, teacher=teacher, notes=notes,
                     log_params=log_params)
