"""raydistill's Grafana dashboard (``dashboards/raydistill.json``, shipped with the package) and where it goes.

Ray's dashboard writes, at cluster start, a Grafana configuration into the head node's session folder
(``SESSION/metrics/grafana``: ``grafana.ini``, a Prometheus data source, and a file provider reading every
dashboard JSON in ``SESSION/metrics/grafana/dashboards``, shown in Grafana's "Ray" folder). A Grafana
started with that ``grafana.ini`` therefore shows raydistill's dashboard once the JSON is in that folder.
The folder is rewritten for every new session: raydistill installs the JSON when it starts a local cluster,
and ``raydistill dashboard`` does it for a cluster started with ``ray start``."""

from __future__ import annotations

import os
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from raydistill.errors import ConfigError

DASHBOARD_FILE = "raydistill.json"
DASHBOARD_UID = "raydistill"
# Ray's own overrides of where its Grafana dashboards go (ray.dashboard.modules.metrics.metrics_head).
DASHBOARD_DIR_ENV = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"
METRICS_ROOT_ENV = "RAY_METRICS_OUTPUT_ROOT"


def dashboard_json() -> str:
    """The dashboard's JSON text, from the installed package."""
    return resources.files("raydistill.monitoring").joinpath("dashboards", DASHBOARD_FILE).read_text()


def ray_temp_dir() -> Path:
    """Ray's default temporary root (``RAY_TMPDIR``, else ``TMPDIR`` on Linux, else /tmp, plus ``ray``)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux")
                                            else None) or "/tmp"
    return Path(base) / "ray"


def dashboards_dir(session_dir: str | Path | None = None) -> Path:
    """The folder Ray's Grafana provisioning reads dashboards from: Ray's override variables when set, else the
    given session's (default: the latest session under Ray's temporary root)."""
    if os.environ.get(DASHBOARD_DIR_ENV):
        return Path(os.environ[DASHBOARD_DIR_ENV])
    if os.environ.get(METRICS_ROOT_ENV):
        return Path(os.environ[METRICS_ROOT_ENV]) / "grafana" / "dashboards"
    session = Path(session_dir) if session_dir else ray_temp_dir() / "session_latest"
    return session / "metrics" / "grafana" / "dashboards"


def install(target: str | Path | None = None) -> Path:
    """Copy the dashboard into ``target`` (default: ``dashboards_dir()``); return the file written. A default
    folder that does not exist means no Ray cluster with its dashboard has started on this machine."""
    folder = Path(target) if target else dashboards_dir()
    if not folder.is_dir():
        if target:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            raise ConfigError(
                f"no Ray Grafana configuration at {folder}: start the cluster first on this machine (its head "
                "node: `ray start --head`, or a running `raydistill train`/`sweep`), with the dashboard on, or "
                "pass --dir with your Grafana's dashboards folder (or --print to import the JSON by hand)")
    path = folder / DASHBOARD_FILE
    tmp = path.with_name(f".{DASHBOARD_FILE}.tmp")
    tmp.write_text(dashboard_json())
    tmp.replace(path)  # Grafana polls the folder: never let it read half a file
    return path


def install_when_ready(session_dir: str | Path, timeout_s: float = 60.0) -> threading.Thread:
    """For a cluster raydistill just started: Ray's dashboard writes (and first wipes) its Grafana folder a few
    seconds after ``ray.init`` returns; wait for its own dashboards to be there, then add raydistill's. In a
    daemon thread: nothing waits for it, and a failure only means the panels are missing."""
    folder = dashboards_dir(session_dir)

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (folder / "default_grafana_dashboard.json").is_file():
                try:
                    install(folder)
                except OSError:
                    pass
                return
            time.sleep(0.5)

    thread = threading.Thread(target=run, name="raydistill-grafana", daemon=True)
    thread.start()
    return thread


def next_steps(path: Path | None = None) -> str:
    """How to see the panels: Prometheus and Grafana as Ray documents them."""
    root = ray_temp_dir() / "session_latest" / "metrics"
    where = f"installed {path}\n" if path else ""
    return (f"{where}To see the panels (local cluster, on the head node):\n"
            f"  ray metrics launch-prometheus            # Prometheus on :9090, scraping every Ray node\n"
            f"  grafana server --homepath GRAFANA_HOME --config {root}/grafana/grafana.ini web   # Grafana on :3000\n"
            f"Then the Ray dashboard's Metrics tab shows Ray's panels; \"View in Grafana\" opens Grafana, where "
            f"Dashboards > Ray > raydistill (uid {DASHBOARD_UID}) has raydistill's. When Prometheus or Grafana "
            f"run elsewhere, set RAY_PROMETHEUS_HOST / RAY_GRAFANA_HOST before `ray start`.")
