"""The sweep's results table (one row per trial), the leaderboard, the best config and the best student.

The table is written by the sweep's Tune callback whenever a trial changes state, so ``raydistill
results PATH`` works on a running sweep as well as a finished one."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from raydistill.errors import ConfigError
from raydistill.fsutil import swap_dir, write_atomic, write_text_atomic
from raydistill.ranking import DONE, leaderboard_value, rank_order, trial_runtime_s, trial_status
from raydistill.sweep.spec import Sweep, load_sweep

SWEEP_FILE = "sweep.yaml"
TABLE = "results"
# Tune's bookkeeping keys: not metrics.
_TUNE_KEYS = {"timestamp", "date", "pid", "hostname", "node_ip", "time_this_iter_s", "time_total_s", "done",
              "training_iteration", "trial_id", "experiment_tag", "config", "time_since_restore",
              "iterations_since_restore", "checkpoint_dir_name", "should_checkpoint", "timesteps_total",
              "episodes_total", "timesteps_since_restore", "finished", "export_dir", "checkpoint_path"}


def _ended(sweep: Sweep, trial) -> dict[str, Any] | None:
    """The trial's saved last report when its own log says it finished but Tune never heard it, else None."""
    from raydistill.sweep.trial import finished_result

    last = trial.last_result or {}
    if last.get("finished") or not sweep.is_local or trial.status in ("PENDING", "ERROR"):
        return None
    return finished_result(Path(sweep.dir) / f"trial_{trial.trial_id}")


def trial_row(sweep: Sweep, trial) -> dict[str, Any]:
    last = dict(trial.last_result or {})
    final = _ended(sweep, trial)
    if final is not None:  # Tune's last result is a training report: no bench scores, no export_dir
        last = {**last, **final}
    status = trial_status(trial.status, trial.last_result or {}, ended=final is not None)
    row: dict[str, Any] = {"trial": trial.trial_id, "status": status}
    for d in sweep.dims:
        value = trial.config.get(d.path)
        row[f"config/{d.path}"] = value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
    row["step"] = last.get("step")
    for k, v in sorted(last.items()):
        if k not in _TUNE_KEYS and k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            row[k] = v
    # The trial's own wall time where it reported one (kept by a finished trial a resume reports again), else
    # Tune's; a pending trial has none yet.
    row["runtime_s"] = trial_runtime_s(last)
    row["checkpoint_path"] = last.get("export_dir") or last.get("checkpoint_path")
    row["trial_dir"] = getattr(trial, "path", None) or ""
    error = getattr(trial, "error_file", None) or ""
    row["error"] = _error_summary(error) if trial.status == "ERROR" else ""
    return row


def _error_summary(error_file: str) -> str:
    try:
        lines = [ln for ln in Path(error_file).read_text().splitlines() if ln.strip()]
    except OSError:
        return "failed (no error file)"
    return lines[-1][:300] if lines else "failed"


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def open_storage(location: str | Path):
    """(pyarrow filesystem, path) for a storage URI (s3://, gs://, file://; S3 options may ride on the query
    string, e.g. ``?endpoint_override=localhost:9000&scheme=http``; credentials from the usual variables)."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{location}: cannot open this storage location ({e})") from None
    return fs, root.rstrip("/")


def uri_join(location: str, name: str) -> str:
    """``name`` below a URI, before its query string."""
    base, sep, query = str(location).partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def write_bytes_to(location: str | Path, name: str, data: bytes) -> str:
    """Write ``name`` under a local directory (atomically) or a storage URI (an object store's upload is
    atomic; the local filesystem behind file:// gets a temporary name and a move). Returns where."""
    if not is_uri(location):
        from raydistill.fsutil import write_bytes_atomic

        return str(write_bytes_atomic(Path(location) / name, data))
    import pyarrow.fs as pafs

    fs, root = open_storage(location)
    fs.create_dir(root, recursive=True)
    target = f"{root}/{name}"
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{root}/.{name}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, target)
    else:
        with fs.open_output_stream(target) as f:
            f.write(data)
    return uri_join(str(location), name)


def read_bytes_from(location: str | Path, name: str) -> bytes | None:
    """``name`` under a local directory or a storage URI; None when absent."""
    if not is_uri(location):
        p = Path(location) / name
        return p.read_bytes() if p.is_file() else None
    import pyarrow.fs as pafs

    fs, root = open_storage(location)
    if fs.get_file_info(f"{root}/{name}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/{name}") as f:
        return f.read()


def copy_dir_to(src: str, location: str | Path, name: str) -> str:
    """Copy the folder ``src`` (a local path or a URI) to ``name`` under a storage URI (pyarrow's copy_files:
    multi-threaded, any pair of filesystems). The copy replaces what was there."""
    import pyarrow.fs as pafs

    fs, root = open_storage(location)
    target = f"{root}/{name}"
    if fs.get_file_info(target).type == pafs.FileType.Directory:
        fs.delete_dir(target)
    fs.create_dir(target, recursive=True)
    if is_uri(src):
        src_fs, src_path = open_storage(src)
    else:
        src_fs, src_path = pafs.LocalFileSystem(), str(Path(src).resolve())
    pafs.copy_files(src_path, target, source_filesystem=src_fs, destination_filesystem=fs)
    return uri_join(str(location), name)


def is_dir_at(location: str | None) -> bool:
    """A local folder, or a folder (prefix) at a storage URI."""
    if not location:
        return False
    if not is_uri(location):
        return Path(location).is_dir()
    import pyarrow.fs as pafs

    try:
        fs, root = open_storage(location)
        return fs.get_file_info(root).type == pafs.FileType.Directory
    except (ConfigError, OSError):
        return False


def _table_bytes(rows: list[dict[str, Any]]) -> dict[str, bytes]:
    import io

    import pandas as pd

    frame = pd.DataFrame(rows)
    parquet = io.BytesIO()
    frame.to_parquet(parquet, index=False)
    return {f"{TABLE}.csv": frame.to_csv(index=False).encode(), f"{TABLE}.parquet": parquet.getvalue()}


def write_table(directory: str | Path, rows: list[dict[str, Any]]) -> None:
    """results.csv and results.parquet, each written atomically (to a local folder or a storage URI)."""
    import pandas as pd

    if is_uri(directory):
        for name, data in _table_bytes(rows).items():
            write_bytes_to(directory, name, data)
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    for suffix, writer in ((".csv", lambda p: frame.to_csv(p, index=False)),
                           (".parquet", lambda p: frame.to_parquet(p, index=False))):
        write_atomic(directory / f"{TABLE}{suffix}", writer, fsync=False)


def read_table(directory: str | Path):
    import io

    import pandas as pd

    if is_uri(directory):
        data = read_bytes_from(directory, f"{TABLE}.parquet")
        if data is not None:
            return pd.read_parquet(io.BytesIO(data))
        data = read_bytes_from(directory, f"{TABLE}.csv")
        if data is not None:
            return pd.read_csv(io.BytesIO(data))
        raise ConfigError(f"{directory}: no {TABLE}.csv or {TABLE}.parquet (not a raydistill sweep directory, or "
                          "no trial has started yet)")
    directory = Path(directory)
    if (directory / f"{TABLE}.parquet").is_file():
        return pd.read_parquet(directory / f"{TABLE}.parquet")
    if (directory / f"{TABLE}.csv").is_file():
        return pd.read_csv(directory / f"{TABLE}.csv")
    raise ConfigError(f"{directory}: no {TABLE}.csv or {TABLE}.parquet (not a raydistill sweep directory, or no "
                      "trial has started yet)")


def _sortable(value) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] in DONE and _sortable(r.get(metric))]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r[metric])


def leaderboard(frame, metric: str, mode: str):
    """Finished and stopped trials sorted by the metric (best first, as best_row), then every other trial (running,
    failed, interrupted: their metric is an intermediate value) and those without it, in table order."""
    return rank_order(frame, metric, mode)[0]


def write_best(sweep: Sweep, directory: str | Path, row: dict[str, Any], trial_config: dict) -> dict[str, str]:
    """best_config.yaml (runnable with ``raydistill train``) and, if asked, best_student/ (a copy)."""
    from raydistill.sweep.space import trial_values

    values = trial_values(sweep.dims, trial_config)
    if is_uri(directory):
        return _write_best_uri(sweep, str(directory), row, values)
    directory = Path(directory)
    cfg = sweep.trial_config(values, output_dir=str(directory / "best_run"), name=f"{sweep.spec.name}-best")
    out = {"best_config": str(directory / "best_config.yaml")}
    header = (f"# best trial {row['trial']} of sweep {sweep.spec.name} by {sweep.spec.metric} "
              f"({sweep.spec.mode}) = {row.get(sweep.spec.metric)}\n# rerun: raydistill train {out['best_config']}\n")
    write_text_atomic(directory / "best_config.yaml", header + yaml.safe_dump(cfg.model_dump(mode="json"),
                                                                               sort_keys=False))
    src = row.get("checkpoint_path")
    if sweep.spec.export_best and src and Path(src).is_dir():
        dst = directory / "best_student"
        tmp = directory / ".best_student.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        swap_dir(tmp, dst)
        out["best_student"] = str(dst)
    return out


def _best_header(sweep: Sweep, row: dict[str, Any], where: str) -> str:
    return (f"# best trial {row['trial']} of sweep {sweep.spec.name} by {sweep.spec.metric} "
            f"({sweep.spec.mode}) = {row.get(sweep.spec.metric)}\n# rerun: raydistill train {where}\n")


def _write_best_uri(sweep: Sweep, directory: str, row: dict[str, Any], values: dict) -> dict[str, str]:
    """best_config.yaml and best_student/ on object storage (s3://, gs://, file://). The config's output_dir is
    a local folder (runs/NAME-best): download the file, or give it to ``raydistill train`` from a copy."""
    cfg = sweep.trial_config(values, output_dir=str(Path("runs") / f"{sweep.spec.name}-best"),
                             name=f"{sweep.spec.name}-best")
    text = _best_header(sweep, row, "best_config.yaml (a local copy of this file)") + yaml.safe_dump(
        cfg.model_dump(mode="json"), sort_keys=False)
    out = {"best_config": write_bytes_to(directory, "best_config.yaml", text.encode())}
    src = row.get("checkpoint_path")
    if sweep.spec.export_best and is_dir_at(src):
        out["best_student"] = copy_dir_to(src, directory, "best_student")
    return out


def load_saved_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """The sweep as saved when it started (its base inlined), with optional overrides; ``path`` is a local
    directory or a storage URI (s3://, gs://, file://)."""
    if is_uri(path):
        from raydistill.config import yaml_load

        data = read_bytes_from(path, SWEEP_FILE)
        if data is None:
            raise ConfigError(f"{path}: no {SWEEP_FILE} here; give the sweep directory (STORAGE_PATH/NAME)")
        return load_sweep(None, overrides, data=yaml_load(data.decode("utf-8")) or {})
    p = Path(path)
    if not (p / SWEEP_FILE).is_file():
        raise ConfigError(f"{path}: no {SWEEP_FILE} here; give the sweep directory (STORAGE_PATH/NAME)")
    return load_sweep(p / SWEEP_FILE, overrides)


def format_leaderboard(frame, sweep: Sweep, limit: int | None = None) -> str:
    """A plain-text leaderboard: rank, trial, status, swept values, the metric and the benchmark scores."""
    metric = sweep.spec.metric
    board, ranked = rank_order(frame, metric, sweep.spec.mode)
    if limit:
        board = board.head(limit)
    cols = ["trial", "status", "step"] + [c for c in board.columns if c.startswith("config/")]
    cols += [metric, "val/loss", "val/ppl", "val/iia/mean", "val/rougeL"]
    cols += [c for c in board.columns if _headline(c)]
    cols += ["runtime_s"]
    # dict.fromkeys: the metric is often also one of the usual columns (val/loss), shown once.
    return render(board, [c for c in dict.fromkeys(cols) if c in board.columns], ranked=ranked,
                  title=f"sweep {sweep.spec.name}: {metric} ({sweep.spec.mode})")


def _headline(column: str) -> bool:
    """A benchmark task's first official metric (the full set stays in the table)."""
    from raydistill.eval.tasks import TASKS

    parts = column.split("/")
    if len(parts) != 3 or parts[0] != "bench":
        return False
    if parts[1:] == ["glue", "glue_average"]:
        return True
    spec = TASKS.get(parts[1])
    return spec is not None and spec.metrics[0] == parts[2]


def render(frame, cols: list[str], title: str = "", ranked: int | None = None) -> str:
    """A text table numbered from 1; with ``ranked``, the rows after the first ``ranked`` are unranked ('-')."""
    headers = ["#"] + [c.removeprefix("config/") for c in cols]
    body = [[str(i + 1) if ranked is None or i < ranked else "-"] + [leaderboard_value(v) for v in row]
            for i, row in enumerate(frame[cols].itertuples(index=False))]
    widths = [max(len(h), *(len(r[j]) for r in body)) if body else len(h) for j, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = ([title] if title else []) + [line(headers), line(["-" * w for w in widths])] + [line(r) for r in body]
    return "\n".join(out)
