"""Monitoring without a cluster: the Grafana dashboard against the series catalogue, where it is installed,
the FLOP estimate behind MFU, the progress board's bookkeeping, the terminal display (plain lines and the
live display) and the sweep's trial table with its phase column. The series a real run exports are
checked on a real Ray cluster in test_monitoring_e2e.py."""

import io
import json
import re
import sys
import time

import pytest
import torch

from raydistill.errors import ConfigError
from raydistill.monitoring import board as B
from raydistill.monitoring import grafana
from raydistill.monitoring.metrics import SERIES, device_peak_flops, flops_per_token
from raydistill.monitoring.terminal import Display, describe

EXPORTED = {name for s in SERIES.values() for name in s.exported()}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out += [p] + p.get("panels", [])
    return [p for p in out if p["type"] != "row"]


def test_every_panel_queries_series_raydistill_exports_and_every_series_has_a_panel():
    dashboard = json.loads(grafana.dashboard_json())
    assert dashboard["uid"] == grafana.DASHBOARD_UID
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "run", "trial"}
    used = set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_raydistill_\w+", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= EXPORTED, (panel["title"], names - EXPORTED)
            used |= names
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["datasource"]["uid"] == "${datasource}"
    # Each series reaches a panel (a histogram through its _sum/_count).
    for s in SERIES.values():
        assert used & set(s.exported()), f"{s.name} has no panel"


def test_install_writes_the_packaged_json_where_rays_grafana_reads_it(tmp_path, monkeypatch):
    monkeypatch.delenv(grafana.DASHBOARD_DIR_ENV, raising=False)
    monkeypatch.delenv(grafana.METRICS_ROOT_ENV, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    folder = tmp_path / "ray" / "session_latest" / "metrics" / "grafana" / "dashboards"
    assert grafana.dashboards_dir() == folder
    with pytest.raises(ConfigError, match="no Ray Grafana configuration at .*dashboards: start the cluster first"):
        grafana.install()
    folder.mkdir(parents=True)
    path = grafana.install()
    assert path == folder / "raydistill.json" and path.read_text() == grafana.dashboard_json()
    assert "ray metrics launch-prometheus" in grafana.next_steps(path)
    # Ray's own overrides of the folder win; --dir creates the folder it is given.
    monkeypatch.setenv(grafana.METRICS_ROOT_ENV, str(tmp_path / "root"))
    assert grafana.dashboards_dir() == tmp_path / "root" / "grafana" / "dashboards"
    monkeypatch.setenv(grafana.DASHBOARD_DIR_ENV, str(tmp_path / "dash"))
    assert grafana.dashboards_dir() == tmp_path / "dash"
    assert grafana.install(tmp_path / "mine").read_text() == grafana.dashboard_json()


def test_install_when_ready_waits_for_rays_own_dashboards(tmp_path, monkeypatch):
    monkeypatch.delenv(grafana.DASHBOARD_DIR_ENV, raising=False)
    monkeypatch.delenv(grafana.METRICS_ROOT_ENV, raising=False)
    folder = tmp_path / "metrics" / "grafana" / "dashboards"
    thread = grafana.install_when_ready(tmp_path, timeout_s=10)
    time.sleep(0.8)
    assert not (folder / "raydistill.json").exists()  # Ray wipes the folder when it starts: wait for it
    folder.mkdir(parents=True)
    (folder / "default_grafana_dashboard.json").write_text("{}")
    thread.join(timeout=5)
    assert (folder / "raydistill.json").read_text() == grafana.dashboard_json()


def test_the_cli_prints_the_dashboard_json():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "raydistill.cli", "dashboard", "--print"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["uid"] == "raydistill"


@pytest.mark.parametrize("objectives, stream", [
    ({"task": {}, "kd": {}}, None),
    ({"td": {"action_space": {"kind": "top_k", "k": 64}}}, None),  # fused head: the student's V x H never runs
    ({"td": {"action_space": {"kind": "top_k", "k": 64}, "fused_head": False}}, None),
    ({"cosine": {}}, None),  # block outputs only: neither head runs
    ({"kd": {}}, {"task": {}}),  # an extra stream the teacher never sees
])
def test_the_steps_flop_estimate_counts_the_passes_its_objectives_run(objectives, stream):
    """Against torch's flop counter on a real step (forward and backward): within 3% (biases and the attention
    formula's rounding), whichever heads and teacher passes the objectives skip."""
    from transformers import AutoModelForCausalLM

    from raydistill.data.masking import next_token_labels
    from raydistill.models.presets import preset_config
    from raydistill.monitoring.metrics import counted_flops, step_flops_per_token
    from raydistill.objectives import REGISTRY, build_objectives
    from raydistill.objectives.base import ModelInfo
    from raydistill.train.step import DistillModule

    v, b, t = 8192, 2, 64
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(preset_config("tiny-gpt2", v, special)).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_config(preset_config("tiny-gpt2", v, special, {"n_layer": 2})).train()
    info = ModelInfo(is_encoder=False, vocab_size=v, student_layers=2, student_hidden=64, teacher_layers=4,
                     teacher_hidden=64)
    ids = torch.randint(3, v, (b, t))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = next_token_labels(ids, batch["attention_mask"])

    def built(objs):
        return build_objectives({k: REGISTRY[k].Settings(**a) for k, a in objs.items()}, info)

    streams = {"lm": built(stream)} if stream else {}
    module = DistillModule(student, built(objectives), info, streams=streams)

    def step():
        loss, _ = module(batch, teacher, streams={name: batch for name in streams})
        loss.backward()

    counted = counted_flops(step) / (b * t * (1 + len(streams)))
    estimate = step_flops_per_token(module, teacher, t, {None: b, **{name: b for name in streams}})
    assert estimate == pytest.approx(counted, rel=0.03)


def test_flops_per_token_is_6n_plus_attention_for_the_student_and_2n_for_the_teacher():
    from transformers import GPT2Config, GPT2LMHeadModel

    def model(layers):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=100, n_positions=64))

    student, teacher = model(1), model(2)

    def matmul(m):  # by hand: every parameter but the token and position embeddings, plus the tied head (V x d)
        return sum(p.numel() for n, p in m.named_parameters() if not n.endswith(("wte.weight", "wpe.weight"))) \
            + 100 * 32

    got = flops_per_token(student, teacher, (1, 2), (32, 32), seq_len=16, teacher_runs=True)
    assert got == 6 * matmul(student) + 12 * 1 * 32 * 16 + 2 * matmul(teacher) + 4 * 2 * 32 * 16
    # A teacher no objective uses costs nothing.
    assert flops_per_token(student, teacher, (1, 2), (32, 32), 16, teacher_runs=False) == \
        6 * matmul(student) + 12 * 32 * 16


def test_mfu_has_no_peak_on_cpu():
    assert device_peak_flops(torch.device("cpu"), "bf16") is None


def test_the_board_keeps_each_keys_phase_and_resets_progress_on_a_new_phase():
    board = B.ProgressBoard(metrics=False)
    board.post("t1", {"run": "s", "trial": "t1", "phase": B.TRAINING, "done": 0, "total": 60})
    board.post("t1", {"done": 30, "detail": "loss 3.2"})
    entry = board.snapshot()["t1"]
    assert (entry["phase"], entry["done"], entry["total"], entry["detail"]) == (B.TRAINING, 30, 60, "loss 3.2")
    assert describe(entry) == "training 30/60"
    board.post("t1", {"phase": B.BENCHMARKS})
    entry = board.snapshot()["t1"]
    assert entry["done"] is None and entry["total"] is None and entry["detail"] == ""
    assert re.fullmatch(r"benchmarks 0:0\d", describe(entry, now=entry["since"] + 3))


def test_plain_output_is_one_line_per_phase_never_a_redraw(capsys):
    with Display("plain") as display:
        assert not display.live_mode
        with display.phase(B.PREPARING):
            pass
        display.set_phase(B.TRAINING)
        display.set_phase(B.VALIDATION)
        display.set_phase(B.TRAINING)  # back from validation: said once already
        display.set_phase(B.BENCHMARKS, key="t1")
    out = capsys.readouterr().out.splitlines()
    assert out == ["[raydistill] preparing data", "[raydistill] training", "[raydistill] validation",
                   "[raydistill] trial t1: benchmarks"]
    assert "\x1b" not in "".join(out)


def test_live_display_draws_phases_and_the_table(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    with Display("live") as display:
        display.table = lambda snapshot: "TRIALS " + ",".join(sorted(snapshot))
        display.table_keys = lambda: {"t1"}
        display.set_phase(B.TRAINING, key="teacher")
        display.set_phase(B.VALIDATION, key="t1")
        time.sleep(0.6)
    text = buffer.getvalue()
    assert "teacher: training" in text and "TRIALS t1,teacher" in text
    assert "trial t1: validation" not in text  # the table's trials get no line of their own


def test_the_sweep_table_has_a_phase_column_for_running_trials(tmp_path):
    from raydistill.sweep.runner import SweepMonitor
    from raydistill.sweep.spec import load_sweep

    sweep = load_sweep(None, [], data={"name": "t", "base": {"teacher": {"name": "tiny-gpt2"},
                                                                "monitoring": {"metrics": False}},
                                       "storage_path": str(tmp_path), "metric": "val/loss", "mode": "min",
                                       "space": {"train.lr": {"grid": [1e-3, 2e-3]}}})
    monitor = SweepMonitor(sweep, str(tmp_path))
    monitor._rows = [{"trial": "a", "status": "running", "step": 30, "config/train.lr": 1e-3, "val/loss": 3.1},
                     {"trial": "b", "status": "pending", "step": None, "config/train.lr": 2e-3}]
    now = time.time()
    table = monitor.table({"a": {"phase": B.TRAINING, "done": 40, "total": 60, "since": now},
                           "b": {"phase": B.PREPARING, "since": now}})
    header, _, first, second = table.splitlines()[1:5]
    assert header.split()[:5] == ["#", "trial", "status", "phase", "step"]
    assert "training 40/60" in first and "preparing" not in second  # a pending trial shows no phase


def test_the_sweep_monitor_pickles_while_a_live_display_shows_its_table(tmp_path):
    """Tune pickles its callbacks into tuner.pkl (and a resumed sweep gets them back): the monitor must not hold
    the display (threads, locks), only find it."""
    import ray.cloudpickle as pickle

    from raydistill.sweep import runner
    from raydistill.sweep.spec import load_sweep

    sweep = load_sweep(None, [], data={"name": "t", "base": {"teacher": {"name": "tiny-gpt2"},
                                                                "monitoring": {"metrics": False}},
                                       "storage_path": str(tmp_path), "metric": "val/loss", "mode": "min"})
    import signal

    monitor = runner.SweepMonitor(sweep, str(tmp_path))
    handler = signal.getsignal(signal.SIGINT)
    with Display("live") as display:
        runner.DISPLAY.append(display)
        try:
            monitor.setup()  # also chains the sweep's SIGINT bookkeeping: put pytest's handler back after
            assert display.table == monitor.table
            restored = pickle.loads(pickle.dumps(monitor))
        finally:
            runner.DISPLAY.remove(display)
            signal.signal(signal.SIGINT, handler)
    assert restored.sweep.spec.name == "t" and restored.display is None


def test_the_dashboard_url_comes_with_how_to_log_in_and_how_to_reach_it(monkeypatch):
    import socket

    from raydistill.train.launcher import dashboard_lines

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    lines = dashboard_lines("127.0.0.1:41234", local=True).splitlines()
    assert lines[0] == "[raydistill] Ray dashboard: http://127.0.0.1:41234"
    assert "`ray get-auth-token`" in lines[1] and "~/.ray/auth_token" in lines[1]
    assert lines[2] == (f"[raydistill] from a laptop: ssh -N -L 41234:127.0.0.1:41234 {socket.gethostname()}, then "
                        "open http://localhost:41234")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert dashboard_lines("10.0.0.5:8265", local=False) == "[raydistill] Ray dashboard: http://10.0.0.5:8265"


def test_a_sweep_monitor_pickled_before_monitoring_existed_resumes(tmp_path):
    import ray.cloudpickle as pickle

    from raydistill.sweep import runner
    from raydistill.sweep.spec import load_sweep

    sweep = load_sweep(None, [], data={"name": "t", "base": {"teacher": {"name": "tiny-gpt2"},
                                                                "monitoring": {"metrics": False}},
                                       "storage_path": str(tmp_path), "metric": "val/loss", "mode": "min"})
    old = runner.SweepMonitor(sweep, str(tmp_path))
    del old.__dict__["_rows"], old.__dict__["series"]  # what an earlier version's tuner.pkl holds
    restored = pickle.loads(pickle.dumps(old))
    assert restored._rows == [] and restored.series.sweep == "t" and not restored.series.enabled


def test_ray_trains_run_view_is_on_only_where_a_dashboard_can_show_it(monkeypatch):
    from raydistill.config import load_config
    from raydistill.train import launcher

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launcher, "_USER_STATE_TRACKING", None)

    def view(*overrides: str) -> str:
        return launcher.worker_env(load_config(None, ["teacher.name=tiny-gpt2", *overrides]))[launcher.STATE_TRACKING]

    assert view("ray.dashboard=true") == "1"
    assert view("ray.dashboard=false") == "0"  # a local cluster without a dashboard: nothing could show it
    assert view("ray.dashboard=false", "ray.address=10.0.0.1:6379") == "1"  # the cluster's own dashboard
    monkeypatch.setattr(launcher, "_USER_STATE_TRACKING", "1")  # the user's choice wins
    assert view("ray.dashboard=false") == "1"


def test_ray_trains_preemption_watcher_runs_only_on_a_cluster_raydistill_joins(monkeypatch):
    from raydistill.config import load_config
    from raydistill.train import launcher

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launcher, "_USER_PREEMPTION_WATCHER", None)

    def watcher(*overrides: str) -> str:
        cfg = load_config(None, ["teacher.name=tiny-gpt2", *overrides])
        assert launcher.worker_env(cfg)[launcher.PREEMPTION_WATCHER] == launcher.ray_train_switches(cfg)[
            launcher.PREEMPTION_WATCHER]  # the driver's controller and the sweep trials' see the same switch
        return launcher.worker_env(cfg)[launcher.PREEMPTION_WATCHER]

    assert watcher() == "0"  # the local cluster raydistill starts has no cloud nodes to drain
    assert watcher("ray.address=10.0.0.1:6379") == "1"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert watcher() == "1"
    monkeypatch.setattr(launcher, "_USER_PREEMPTION_WATCHER", "1")  # the user's choice wins
    monkeypatch.delenv("RAY_ADDRESS")
    assert watcher() == "1"


def test_ray_trains_poll_interval_is_the_configs_else_the_users_else_half_a_second(monkeypatch):
    from raydistill.config import load_config
    from raydistill.train import launcher

    monkeypatch.setattr(launcher, "_USER_HEALTH_CHECK", None)

    def interval(*overrides: str) -> str:
        cfg = load_config(None, ["teacher.name=tiny-gpt2", *overrides])
        assert launcher.worker_env(cfg)[launcher.HEALTH_CHECK] == launcher.ray_train_switches(cfg)[launcher.HEALTH_CHECK]
        return launcher.worker_env(cfg)[launcher.HEALTH_CHECK]

    assert interval() == "0.5"  # at Ray's 2 s a run returns 2-4 s after its export
    assert interval("ray.health_check_interval_s=2") == "2"
    monkeypatch.setattr(launcher, "_USER_HEALTH_CHECK", "1.5")  # the user's environment, unless the config says
    assert interval() == "1.5"
    assert interval("ray.health_check_interval_s=0.25") == "0.25"
    with pytest.raises(ConfigError, match=r"ray\.health_check_interval_s.*0"):
        load_config(None, ["teacher.name=tiny-gpt2", "ray.health_check_interval_s=0"])
