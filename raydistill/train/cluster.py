"""What the cluster can give, checked before Ray Train starts, so a request it cannot meet is refused with a
message instead of Ray Train retrying to start workers forever; and an unreachable ``ray.address``.

Ray Train places one bundle per worker (``scaling``: CPUs, GPUs, custom resources) on any node that has room
for the whole bundle. ``workers_that_fit`` counts how many fit the cluster's nodes (their total resources,
not what other jobs hold now: those are freed in time)."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

from raydistill.errors import ConfigError

CONNECT_TIMEOUT_S = 10.0
EXISTING_CLUSTER_TIMEOUT_S = 600.0  # default wait on a cluster raydistill joins (it may be autoscaling)


def worker_request(scaling) -> dict[str, float]:
    return {"CPU": float(scaling.cpus_per_worker), **({"GPU": float(scaling.gpus_per_worker)} if scaling.use_gpu
                                                       else {}),
            **{k: float(v) for k, v in scaling.resources_per_worker.items()}}


def _fits(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def workers_that_fit(nodes: list[dict[str, float]], request: dict[str, float], limit: int,
                     reserved: list[dict[str, float]] = ()) -> int:
    """How many worker bundles (up to ``limit``) the nodes can hold after the ``reserved`` bundles (a sweep
    trial's driver) are placed first, each on the node with the most room."""
    free = [dict(n) for n in nodes]
    for bundle in reserved:
        hosts = [n for n in free if _fits(n, bundle)]
        if not hosts:
            return 0
        host = max(hosts, key=lambda n: n.get("CPU", 0.0))
        for k, v in bundle.items():
            host[k] = host.get(k, 0.0) - v
    count = 0
    for node in free:
        while count < limit and _fits(node, request):
            for k, v in request.items():
                node[k] = node.get(k, 0.0) - v
            count += 1
    return count


def _field(resource: str, scaling) -> str:
    if resource == "CPU":
        return f"scaling.cpus_per_worker={scaling.cpus_per_worker:g}"
    if resource == "GPU":
        return (f"scaling.gpus_per_worker={scaling.gpus_per_worker:g}" if scaling.gpus_per_worker > 1
                else "scaling.use_gpu=true")
    return f"scaling.resources_per_worker.{resource}={scaling.resources_per_worker.get(resource, 0):g}"


def describe(nodes: list[dict[str, float]]) -> str:
    """'1 node: 2 CPUs, no GPU' and the custom resources."""
    keys = sorted({k for n in nodes for k in n if k not in ("memory", "object_store_memory")
                   and not k.startswith(("node:", "accelerator_type:"))} - {"CPU", "GPU"})
    total = lambda k: sum(n.get(k, 0.0) for n in nodes)  # noqa: E731
    parts = [f"{total('CPU'):g} CPUs", f"{total('GPU'):g} GPUs" if total("GPU") else "no GPU"]
    parts += [f"{total(k):g} {k}" for k in keys]
    per_node = ""
    if len(nodes) > 1:
        per_node = "; the largest node: " + ", ".join(
            f"{max(n.get(k, 0.0) for n in nodes):g} {k}" for k in ("CPU", "GPU") if total(k))
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {', '.join(parts)}{per_node}"


def unmet(scaling, nodes: list[dict[str, float]], reserved: list[dict[str, float]] = (),
          what: str = "the run") -> str | None:
    """Why the cluster cannot hold ``scaling.num_workers`` workers, naming the field; None when it can."""
    request = worker_request(scaling)
    n = scaling.num_workers
    fit = workers_that_fit(nodes, request, n, reserved)
    if fit >= n:
        return None
    have = describe(nodes)
    wants = ", ".join(f"{v:g} {k}" for k, v in request.items() if v > 0)
    if workers_that_fit(nodes, request, 1, reserved) == 0:
        short = [k for k, v in request.items() if v > 0 and max((nd.get(k, 0.0) for nd in nodes), default=0) < v]
        fields = ", ".join(_field(k, scaling) for k in short) if short else (
            "scaling (cpus_per_worker / gpus_per_worker / resources_per_worker)")
        return (f"{fields}: each worker of {what} asks for {wants}, which no node of the cluster has ({have}); "
                "ask for less per worker or use a cluster that has it")
    return (f"scaling.num_workers={n}: only {fit} workers of {wants} each fit the cluster ({have})"
            + (" besides the trial's driver" if reserved else "") + "; use fewer workers or a bigger cluster")


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def ensure_fits(scaling, timeout_s: float, reserved: list[dict[str, float]] = (), what: str = "the run") -> None:
    """Refuse (``ConfigError``) a request the cluster cannot hold; on a cluster that may grow (``timeout_s`` >
    0), wait up to ``timeout_s`` for nodes to join first."""
    problem = unmet(scaling, alive_nodes(), reserved, what)
    if problem is None:
        return
    if timeout_s > 0:
        print(f"[raydistill] waiting up to {timeout_s:g} s for the cluster to offer what the workers ask "
              f"(scaling.resource_timeout_s): {problem}", flush=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
            problem = unmet(scaling, alive_nodes(), reserved, what)
            if problem is None:
                return
        problem += f" (waited {timeout_s:g} s: scaling.resource_timeout_s)"
    raise ConfigError(problem)


_HOST_PORT = re.compile(r"^(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)$")


def check_address(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept a connection within ``timeout_s``: Ray itself
    retries an unreachable address for minutes."""
    if not address:
        return
    m = _HOST_PORT.match(address.strip())
    if not m:
        return  # 'auto', 'local' and the like: Ray resolves and reports those itself
    host, port = m.group(1), int(m.group(2))
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else (e.strerror or str(e))
        raise ConfigError(f"ray.address {address!r}: cannot connect to {host}:{port} ({reason}); allowed: the "
                          "address of a running Ray cluster's head (ray start --head prints it), 'auto', or no "
                          "address for a new local cluster") from None


def resource_timeout(scaling: Any, joined_existing: bool) -> float:
    value = getattr(scaling, "resource_timeout_s", None)
    if value is not None:
        return float(value)
    return EXISTING_CLUSTER_TIMEOUT_S if joined_existing else 0.0


_SESSION = re.compile(r"(session_\d{4}-\d{2}-\d{2}_[\w.-]+?)(?:/|$|\s)")


def _cmdline(entry) -> str:
    return entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


def _sessions_in(text: str) -> set[str]:
    return set(_SESSION.findall(text + " "))


def orphaned_ray_processes(sessions: set[str] | None = None) -> list[int]:
    """Ray processes (``ray::...``: agents, idle workers) of this user whose Ray session has no raylet and no GCS
    left: what a killed driver's local cluster leaves behind for a minute or two. A process's session is read
    from the files it holds open under ``/tmp/ray/session_*``; ``sessions`` limits the search to those."""
    import os

    proc = Path("/proc")
    if not proc.is_dir():
        return []
    me, uid = os.getpid(), os.getuid()
    live: set[str] = set()
    candidates: list[tuple[int, set[str]]] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = _cmdline(entry)
        except OSError:
            continue
        head = cmd.split(" ", 1)[0]
        if "raylet" in head or "gcs_server" in head:
            live |= _sessions_in(cmd)
            continue
        if not cmd.startswith("ray::"):
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            held = set()
            for fd in entry.joinpath("fd").iterdir():
                try:
                    held |= _sessions_in(os.readlink(fd))
                except OSError:
                    pass
        except OSError:
            continue
        if held and (sessions is None or held & sessions):
            candidates.append((int(entry.name), held))
    return sorted(pid for pid, held in candidates if not held & live)


SESSIONS_FILE = "ray_sessions.jsonl"  # in the cache directory: the local Ray sessions raydistill started


def remember_session(cache_dir: str | Path, session: str) -> None:
    import json
    import os
    import socket as _socket

    path = Path(cache_dir).expanduser() / SESSIONS_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"session": session, "host": _socket.gethostname(), "driver_pid": os.getpid(),
                                "time": time.time()}) + "\n")
    except OSError:
        pass


def remembered_sessions(cache_dir: str | Path) -> set[str]:
    import json
    import socket as _socket

    host = _socket.gethostname()
    try:
        lines = (Path(cache_dir).expanduser() / SESSIONS_FILE).read_text().splitlines()
    except OSError:
        return set()
    out = set()
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("host") == host and rec.get("session"):
            out.add(rec["session"])
    return out


def cleanup_orphans(sessions: set[str] | None = None, grace_s: float = 3.0) -> list[int]:
    """Stop what ``orphaned_ray_processes(sessions)`` finds (SIGTERM, then SIGKILL after ``grace_s``); return
    their ids."""
    import os
    import signal

    def alive(pid: int) -> bool:  # a zombie (exited, not yet reaped) counts as gone
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    stopped = []
    for pid in orphaned_ray_processes(sessions):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while any(alive(p) for p in stopped) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in stopped:  # Ray's agents wait for their raylet on SIGTERM, which is gone
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return stopped
