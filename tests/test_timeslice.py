"""Time-slicing a run against a reference (``raydistill.bench.timeslice``), on a real process tree without Ray:
a "driver" process starts a "worker" that logs a row per window of busy work, and a "daemon" that writes
heartbeats. Frozen after each row, the whole tree stops while the reference runs, and the frozen time comes
out of the next window exactly (the worker's own CPU time says how long it really worked)."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

from raydistill.bench.timeslice import SlicedRun
from raydistill.errors import RaydistillError

WORKER = textwrap.dedent("""
    import json, sys, time
    rows, windows = sys.argv[1], int(sys.argv[2])
    for w in range(1, windows + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        while time.process_time() - cpu < 0.25:  # a window's work: a fixed amount of CPU time
            pass
        row = {"step": 2 * w, "step_time_s": (time.perf_counter() - wall) / 2, "cpu_s": time.process_time() - cpu}
        with open(rows, "a") as f:
            f.write(json.dumps(row) + "\\n")
""")
DAEMON = textwrap.dedent("""
    import sys, time
    with open(sys.argv[1], "a") as f:
        while True:
            f.write(f"{time.time()}\\n"); f.flush(); time.sleep(0.005)
""")
DRIVER = textwrap.dedent("""
    import subprocess, sys
    here, title, windows = sys.argv[1], sys.argv[2], sys.argv[3]
    daemon = subprocess.Popen([sys.executable, f"{here}/daemon.py", f"{here}/beats"])
    # exec -a: the worker's process title, as Ray names an actor's process after its class
    worker = subprocess.Popen(["bash", "-c", f'exec -a {title} "$0" "$@"', sys.executable, f"{here}/worker.py",
                               f"{here}/rows.jsonl", windows])
    code = worker.wait()
    daemon.kill()
    sys.exit(code)
""")


def _run(tmp_path, windows=4, title="rdtest-worker", reference=None, **kw) -> SlicedRun:
    for name, text in (("worker.py", WORKER), ("daemon.py", DAEMON), ("driver.py", DRIVER)):
        (tmp_path / name).write_text(text)
    return SlicedRun([sys.executable, str(tmp_path / "driver.py"), str(tmp_path), title, str(windows)],
                     tmp_path / "rows.jsonl", tmp_path / "run.log", reference, worker_title="rdtest-worker", **kw)


def test_the_whole_tree_is_frozen_after_each_row_and_the_frozen_time_leaves_the_next_window(tmp_path):
    frozen_at: list[tuple[float, float]] = []

    def reference(row):
        begun = time.time()
        time.sleep(0.4)
        frozen_at.append((begun, time.time()))
        return row["step"]

    run = _run(tmp_path, windows=4, reference=reference, slice_after=lambda row: row["step"] < 8)
    rows = run.run()
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    # after every row but the last, with what the reference returned for it
    assert [(s.after_step, s.result) for s in run.slices] == [(2, 2), (4, 4), (6, 6)]
    frozen = {s.after_step + 2: s.frozen_s for s in run.slices}
    for row in rows:
        wall = row["step_time_s"] * 2
        if row["step"] in frozen:
            assert frozen[row["step"]] >= 0.4
            assert wall > row["cpu_s"] + 0.35  # the frozen time fell inside this window ...
        # ... and without it the window is the work the worker did (its CPU time; nothing else ran on its core)
        assert wall - frozen.get(row["step"], 0.0) == pytest.approx(row["cpu_s"], abs=0.06)
    # The driver's other child (not the worker) was frozen too: no heartbeat while the reference ran.
    beats = [float(x) for x in (tmp_path / "beats").read_text().split()]
    assert len(beats) > 50
    for begun, ended in frozen_at:
        assert not [b for b in beats if begun + 0.02 < b < ended - 0.02]


def test_rows_are_read_whole_and_once_as_the_file_grows(tmp_path):
    rows = tmp_path / "metrics.jsonl"
    run = SlicedRun([sys.executable, "-c", "pass"], rows, tmp_path / "log")
    assert run._new_rows() == []  # no file yet
    rows.write_text('{"step": 1}\n{"st')  # the second row is still being written
    assert run._new_rows() == [{"step": 1}]
    assert run._new_rows() == []
    with open(rows, "a") as f:
        f.write('ep": 2}\n{"step": 3}\n')
    assert run._new_rows() == [{"step": 2}, {"step": 3}]
    assert run.rows == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_without_a_reference_the_run_is_not_frozen(tmp_path):
    run = _run(tmp_path, windows=2)
    assert [r["step"] for r in run.run()] == [2, 4] and run.slices == []


def test_a_tree_without_the_worker_cannot_be_sliced_and_is_not_left_running(tmp_path):
    run = _run(tmp_path, windows=50, title="other-name", reference=lambda row: None)
    with pytest.raises(RaydistillError, match="expected one rdtest-worker process .* found 0"):
        run.run()
    assert len(run.rows) < 50  # interrupted, not waited for


def test_a_failing_command_names_its_status_and_output(tmp_path):
    (tmp_path / "fail.py").write_text("import sys\nprint('the reason it failed')\nsys.exit(3)\n")
    run = SlicedRun([sys.executable, str(tmp_path / "fail.py")], tmp_path / "rows.jsonl", tmp_path / "log",
                    name="the tiny run")
    with pytest.raises(RaydistillError, match=r"(?s)the tiny run exited with status 3.*the reason it failed"):
        run.run()


@pytest.mark.e2e
def test_the_throughput_bench_slices_a_real_ray_train_run_window_by_window(monkeypatch):
    """The whole bench at a tiny size: its framework run is `raydistill train` on a local Ray cluster of its own
    (RAY_ADDRESS is not followed), frozen after each of its rows but the last while the bare loop runs the
    same steps' batches; each timed framework window is paired with the bare window run inside it."""
    from raydistill.bench.throughput import bench_throughput

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing answers there
    r = bench_throughput(teacher="tiny-gpt2", teacher_overrides={"n_layer": 2}, student_layers=1, batch_size=2,
                         block_size=32, steps=4, window=2)
    fw, bare = r["framework"], r["bare"]
    # rows at steps 2 (warm-up), 4 and 6: frozen after steps 2 and 4, so both timed windows have a pair
    assert fw["windows"] == 2 and len(r["round_ratios"]) == 1
    # the bare run on its own (2 windows), its turns with DeepSpeed's (2), the 2 run inside the framework's
    assert bare["windows"] == 6
    assert all(t > 0 for t in fw["window_step_times_s"]) and fw["tokens_per_s"] > 0
    assert r["pairs"] == 2 and r["ratio"] == pytest.approx(r["round_ratios"][0]) and 0 < r["ratio"] < 50
    assert r["ratio_interval"] is None  # too few pairs for one
    assert r["steal"] is None or 0 <= r["steal"] < 1  # the hypervisor's share of the CPU time (Linux VMs)
    assert (r["steal"] is None) != ("(steal)" in r["table"])
    assert fw["peak_memory_bytes"] > 50 * 2**20
