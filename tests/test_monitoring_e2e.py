"""A short `raydistill train` on a local Ray cluster exports raydistill's series: scraped from the node's
Prometheus endpoint (the metrics export port Ray reports), as Prometheus would, with their tags, the last
step reached, and the Grafana dashboard's queries naming what is there."""

import json
import os
import re
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from raydistill.config import load_config
from raydistill.monitoring import grafana
from raydistill.train import launcher

pytestmark = pytest.mark.e2e

TINY = ["teacher.name=tiny-gpt2", "student.num_layers=1", "data.builtin.num_documents=400", "data.block_size=32",
        "tokenizer.vocab_size=512", "train.batch_size=8", "train.lr=3e-3", "train.warmup_ratio=0",
        "train.lr_schedule=constant", "train.eval_batches=1", "scaling.num_workers=2", "ray.dashboard=false",
        "objectives.kd.weight=1.0"]
STEPS = 6


@pytest.fixture(scope="module")
def metrics_cluster():
    """A local cluster whose processes hand their metrics to the node's agent every second (Ray's default is
    every 10 s), so that a run of a few seconds has its values exported while it runs."""
    import ray

    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    # Ray Train's run view, as a user who exports RAY_TRAIN_ENABLE_STATE_TRACKING=1 gets it: without a dashboard
    # (it is off here to start faster) raydistill would leave it off.
    chosen, launcher._USER_STATE_TRACKING = launcher._USER_STATE_TRACKING, "1"
    env = os.environ.get(launcher.STATE_TRACKING)
    try:
        launcher.init_ray(load_config(None, ["teacher.name=tiny-gpt2", "ray.dashboard=false"]))
        yield
    finally:
        ray.shutdown()
        os.environ.pop("RAY_metrics_report_interval_ms", None)
        launcher._USER_STATE_TRACKING = chosen
        if env is None:
            os.environ.pop(launcher.STATE_TRACKING, None)
        else:
            os.environ[launcher.STATE_TRACKING] = env


RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}  # Ray's, per process


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every ray_raydistill_* sample of every node, with raydistill's labels only."""
    from raydistill.monitoring.metrics import metrics_endpoints

    out = []
    for url in metrics_endpoints().values():
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_raydistill_"):
                    labels = {k: v for k, v in sample.labels.items()
                              if k not in RAY_LABELS and not k.startswith("otel_")}
                    out.append((sample.name, labels, sample.value))
    return out


class Prometheus(threading.Thread):
    """Scrapes like Prometheus, twice a second, keeping each series' last value. Ray's agent drops a gauge two
    report intervals after its process stops refreshing it (a finished run's workers), so a test that scraped
    only after the run would find its gauges gone, as a Prometheus scraping every 10 s keeps their history."""

    def __init__(self):
        super().__init__(daemon=True)
        self.last: dict[tuple[str, frozenset], float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                for name, labels, value in scrape():
                    self.last[(name, frozenset(labels.items()))] = value
            except OSError:
                pass

    def series(self, name: str, run: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(labels), value) for (n, labels), value in self.last.items()
                if n == name and dict(labels).get("run") == run]


def test_a_train_run_exports_its_numbers_to_prometheus(metrics_cluster, tmp_path, cache_dir, capfd):
    capfd.readouterr()
    run = tmp_path / "run"
    name = "mon"
    started = time.time()
    prometheus = Prometheus()
    prometheus.start()
    try:
        launcher.run(load_config(None, [f"output_dir={run}", f"cache_dir={cache_dir}", f"name={name}", *TINY,
                                        f"train.max_steps={STEPS}", "train.log_every=2", "train.eval_every=3",
                                        "train.checkpoint_every=3", "objectives.iit={weight: 0.0, alignment: late}",
                                        "monitoring.peak_flops=1.0e12"]))
        time.sleep(3)  # the last report interval of the last processes
    finally:
        prometheus.stop.set()
        prometheus.join()
    out = capfd.readouterr().out
    # Not a terminal: plain progress lines, one per phase entered.
    for line in ("[raydistill] preparing data", "[raydistill] starting workers", "[raydistill] training (6 steps)",
                 "[raydistill] validation", "[raydistill] checkpoint", "[raydistill] export"):
        assert line + "\n" in out, (line, out[-3000:])
    assert "\x1b[2K" not in out  # no redraws

    # Ray Train's run view (the dashboard's Train tab) is on when chosen: its state actor knows the run.
    import ray

    state = ray.get_actor("train_v2_state_actor", namespace="_train_state_actor")
    assert name in {r.name for r in ray.get(state.get_train_runs.remote()).values()}

    mine = prometheus.series
    steps = {labels["rank"]: value for labels, value in mine("ray_raydistill_train_step", name)}
    assert steps == {"0": STEPS, "1": STEPS}, steps  # every rank reached the final step
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    for series in ("ray_raydistill_train_progress", "ray_raydistill_train_tokens_per_s",
                   "ray_raydistill_train_step_time_s", "ray_raydistill_train_flops_per_s", "ray_raydistill_train_mfu",
                   "ray_raydistill_train_tokens_total", "ray_raydistill_train_updated_timestamp_s",
                   "ray_raydistill_checkpoint_seconds_count", "ray_raydistill_export_seconds_count"):
        got = mine(series, name)
        assert {labels["rank"] for labels, _ in got} == {"0", "1"}, (series, got)
        assert all(labels["trial"] == "" for labels, _ in got)
    assert {v for _, v in mine("ray_raydistill_train_progress", name)} == {1.0}
    # MFU is the FLOP estimate over monitoring.peak_flops.
    flops = {labels["rank"]: v for labels, v in mine("ray_raydistill_train_flops_per_s", name)}
    mfu = {labels["rank"]: v for labels, v in mine("ray_raydistill_train_mfu", name)}
    assert all(flops[r] > 0 and mfu[r] == pytest.approx(flops[r] / 1e12) for r in ("0", "1"))
    assert sum(v for _, v in mine("ray_raydistill_checkpoint_seconds_count", name)) == 4  # 2 each on 2 ranks
    assert sum(v for _, v in mine("ray_raydistill_export_seconds_count", name)) == 2
    assert all(v > 0 for _, v in mine("ray_raydistill_train_tokens_total", name))
    # Rank 0: the loss, each term, the learning rate, validation and IIA per pair, as the last logged row.
    (loss_labels, loss), = mine("ray_raydistill_train_loss", name)
    assert loss_labels["rank"] == "0" and loss == pytest.approx(last["loss"], rel=1e-5)
    terms = {labels["term"]: value for labels, value in mine("ray_raydistill_train_loss_term", name)}
    assert set(terms) == {"kd"} and terms["kd"] == pytest.approx(last["kd"], rel=1e-5)
    (_, lr), = mine("ray_raydistill_train_lr", name)
    assert lr == pytest.approx(3e-3)
    val = {labels["metric"]: value for labels, value in mine("ray_raydistill_val", name)}
    assert val["loss"] == pytest.approx(last["val/loss"], rel=1e-5) and {"ppl", "ce", "kd"} <= set(val)
    iia = {labels["pair"]: value for labels, value in mine("ray_raydistill_val_iia", name)}
    assert "mean" in iia and len(iia) >= 2 and all(0 <= v <= 1 for v in iia.values()), iia
    assert iia["mean"] == pytest.approx(last["val/iia/mean"], rel=1e-5)
    # The progress board's phase series: the phases the run went through.
    phases = {labels["phase"] for labels, _ in mine("ray_raydistill_phase", name)}
    assert {"starting workers", "training"} <= phases, phases
    assert all(v >= started for _, v in mine("ray_raydistill_train_updated_timestamp_s", name))

    # Every series the dashboard queries for a train run was there (the sweep's and GPU memory are not, on CPU).
    present = {n for n, _ in prometheus.last}
    dashboard = json.loads(grafana.dashboard_json())
    queried = {n for p in dashboard["panels"] for t in p.get("targets", [])
               for n in re.findall(r"\bray_raydistill_\w+", t["expr"])}
    absent = queried - present
    assert absent <= {"ray_raydistill_gpu_memory_bytes", "ray_raydistill_sweep_trials", "ray_raydistill_sweep_best",
                      "ray_raydistill_sweep_bench_score"}, absent


def test_the_sweep_driver_exports_trials_by_state_the_best_metric_and_bench_scores(metrics_cluster):
    from raydistill.monitoring.metrics import SweepMetrics

    rows = [{"trial": "a", "status": "finished", "val/loss": 3.0, "bench/builtin-qa/f1": 0.5},
            {"trial": "b", "status": "finished", "val/loss": 2.5, "bench/builtin-qa/f1": 0.7},
            {"trial": "c", "status": "running", "val/loss": float("nan")},
            {"trial": "d", "status": "pending"}]
    SweepMetrics("sw", "val/loss", "min").update(rows)
    prometheus = Prometheus()
    prometheus.start()
    deadline = time.time() + 20
    while time.time() < deadline and not prometheus.series("ray_raydistill_sweep_bench_score", "sw"):
        time.sleep(0.5)
    time.sleep(1)
    prometheus.stop.set()
    prometheus.join()
    states = {labels["state"]: v for labels, v in prometheus.series("ray_raydistill_sweep_trials", "sw")}
    assert states == {"pending": 1, "running": 1, "finished": 2, "stopped": 0, "interrupted": 0, "failed": 0}
    (best_labels, best), = prometheus.series("ray_raydistill_sweep_best", "sw")
    assert best_labels["metric"] == "val/loss" and best == 2.5
    scores = {(labels["trial"], labels["score"]): v
              for labels, v in prometheus.series("ray_raydistill_sweep_bench_score", "sw")}
    assert scores == {("a", "builtin-qa/f1"): 0.5, ("b", "builtin-qa/f1"): 0.7}
