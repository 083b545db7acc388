"""``raydistill report``: statistics, importance and Pareto fronts on known data; the whole report on a
synthetic sweep folder written here (the files a sweep writes: results.csv, sweep.yaml, trial_<id>/
metrics.jsonl, bench.json, trial.jsonl, config.resolved.json, teacher/bench.json) through a local path, a
file:// URI and an in-process S3 server (moto); a running sweep without its results table.

The report of a REAL sweep is checked by ``check_report_of_sweep`` at the end of
tests/test_e2e_sweep.py's sweep test (so no extra sweep runs in CI)."""

from __future__ import annotations

import html.parser
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from raydistill.report import build_report
from raydistill.report import stats as S
from raydistill.report.sections import SECTION_IDS
from raydistill.report.sweepdata import load_sweep, objective_family, tokens_seen

OBJECTIVES = {
    "kd": {"task": {"weight": 1.0}, "kd": {"weight": 1.0}, "iit": {"weight": 0.0, "alignment": "middle"}},
    "iit": {"task": {"weight": 1.0}, "kd": {"weight": 1.0}, "iit": {"weight": 1.0, "alignment": "middle"}},
    "td": {"task": {"weight": 0.5}, "td": {"weight": 1.0}},
    "task": {"task": {"weight": 1.0}},
}
FAMILY = {"kd": "standard", "iit": "iit", "td": "td", "task": "baseline"}
QUALITY = {"kd": 0.50, "iit": 0.56, "td": 0.40, "task": 0.30}  # f1 by objectives, before seed and lr effects
TEACHER_F1, TEACHER_PPL = 0.80, 5.0


# ---------------------------------------------------------------- a synthetic sweep folder, as sweeps write it

def write_sweep(root: Path, seeds=(0, 1, 2), with_table: bool = True, running: str | None = None) -> Path:
    """A sweep of 4 objective sets x len(seeds) seeds with a log-uniform lr. ``running``: the id of a trial
    that is still running (half its curve, a half-written last line, no bench.json, no end event)."""
    rng = np.random.default_rng(0)
    directory = root / "syn"
    directory.mkdir(parents=True)
    spec = {"name": "syn", "metric": "bench/builtin-qa/f1", "mode": "max",
            "base": {"objectives": OBJECTIVES["kd"], "train": {"max_steps": 20, "seed": 42, "lr": 1e-3}},
            "set": {},
            "space": {"objectives": {"grid": OBJECTIVES}, "train.lr": {"loguniform": [1e-4, 1e-2]},
                      "train.seed": {"grid": list(seeds)}}}
    (directory / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    rows = []
    lrs = {o: float(10 ** rng.uniform(-4, -2)) for o in OBJECTIVES}  # each sampled lr rerun with every seed
    for i, (objectives, seed) in enumerate((o, s) for o in OBJECTIVES for s in seeds):
        tid = f"abc_{i:05d}"
        lr = lrs[objectives]
        f1 = QUALITY[objectives] + 0.02 * seed + 0.05 * (math.log10(lr) + 3) + float(rng.normal(0, 0.005))
        ppl = 12.0 - 10 * f1
        is_running = tid == running
        trial = directory / f"trial_{tid}"
        trial.mkdir()
        cfg = {"objectives": OBJECTIVES[objectives], "train": {"max_steps": 20, "seed": seed, "lr": lr}}
        (trial / "config.resolved.json").write_text(json.dumps(cfg))
        lines = []
        for step in (5, 10, 15, 20)[: 2 if is_running else 4]:
            row = {"step": step, "loss": 3.0 - step * 0.05, "task": 2.5 - step * 0.04, "lr": lr,
                   "tokens_per_s": 1000.0 + i, "step_time_s": 0.5, "time": 1.0e9 + step}
            if objectives in ("kd", "iit"):
                row["kd"] = 0.2 - step * 0.005
            if objectives == "iit":
                row["iit"] = 0.3 - step * 0.01
            if step % 10 == 0:
                row.update({"val/loss": 2.8 - step * 0.03, "val/ppl": 15.0 - step * 0.1})
                if objectives in ("kd", "iit"):  # IIA measured (iit weight 0 in kd)
                    iia = f1 + 0.2 + step * 0.001
                    row.update({"val/iia/t1-s0": iia, "val/iia/t3-s1": iia - 0.05, "val/iia/mean": iia - 0.025})
            lines.append(json.dumps(row))
        text = "\n".join(lines) + "\n"
        if is_running:
            text += '{"step": 15, "loss": 2.'  # being appended
        (trial / "metrics.jsonl").write_text(text)
        events = [{"event": "start", "time": 1.0e9, "trial_id": tid}]
        scores = {"bench/builtin-qa/f1": f1, "bench/builtin-ppl/perplexity": ppl}
        if not is_running:
            events.append({"event": "end", "time": 1.0e9 + 100, **scores})
            (trial / "bench.json").write_text(json.dumps({"summary": [
                {"model": str(trial / "student"), "task": "builtin-qa", "metric": "f1", "mean": f1, "std": 0.0,
                 "n_seeds": 1, "note": "", "method": ""},
                {"model": str(trial / "student"), "task": "builtin-ppl", "metric": "perplexity", "mean": ppl,
                 "std": 0.0, "n_seeds": 1, "note": "", "method": ""}], "rows": [], "wall_s": 1.0, "notes": []}))
        (trial / "trial.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        # Tune's own files (what an s3 sweep has when the results table is missing)
        (trial / "params.json").write_text(json.dumps({"objectives": objectives, "train.lr": lr, "train.seed": seed}))
        result = {"step": 20 if not is_running else 10, "val/loss": 2.2, "time_total_s": 60.0 + 10 * i,
                  **({} if is_running else {**scores, "finished": 1})}
        (trial / "result.json").write_text(json.dumps(result) + "\n")
        last = json.loads(lines[-1])
        row = {"trial": tid, "status": "running" if is_running else "finished", "config/objectives": objectives,
               "config/train.lr": lr, "config/train.seed": seed, "step": last["step"], "loss": last["loss"],
               "val/loss": 2.2, "runtime_s": 60.0 + 10 * i, "checkpoint_path": str(trial / "student"),
               "trial_dir": str(trial), "error": ""}
        if objectives in ("kd", "iit") and not is_running:
            row["val/iia/mean"] = f1 + 0.2 + 0.02 - 0.025
        if not is_running:
            row.update(scores)
        rows.append(row)
    if with_table:
        pd.DataFrame(rows).to_csv(directory / "results.csv", index=False)
    (directory / "teacher").mkdir()
    (directory / "teacher" / "bench.json").write_text(json.dumps({"summary": [
        {"model": "teacher", "task": "builtin-qa", "metric": "f1", "mean": TEACHER_F1, "std": 0.0, "n_seeds": 1},
        {"model": "teacher", "task": "builtin-ppl", "metric": "perplexity", "mean": TEACHER_PPL, "std": 0.0,
         "n_seeds": 1}]}))
    return directory


# ---------------------------------------------------------------- checks shared with the real-sweep test

class _Balance(html.parser.HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.errors, self.images = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def check_html(path: Path) -> _Balance:
    """Parses with balanced tags, every section present, images embedded (no file or network reference)."""
    text = path.read_text(encoding="utf-8")
    parser = _Balance()
    parser.feed(text)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors[:5], parser.stack)
    assert set(SECTION_IDS) <= parser.ids, set(SECTION_IDS) - parser.ids
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert "<script" not in text and "http://" not in text and "https://" not in text  # opens offline
    return parser


def check_pngs(paths) -> None:
    from PIL import Image

    assert paths
    for p in map(Path, paths):
        assert p.stat().st_size > 1000, p
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 2  # not a blank canvas


def check_markdown(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for sid in SECTION_IDS:
        assert f'<a id="{sid}"></a>' in text
    links = [ln.split("](", 1)[1].rstrip(")") for ln in text.splitlines() if ln.startswith("![")]
    assert links and all((path.parent / link).is_file() for link in links)


def browser() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def plot_pixels(png: Path) -> int:
    """Pixels in the figures' orange-to-green hues (the page's own colours are grey, black and link blue)."""
    from PIL import Image

    with Image.open(png) as im:
        hsv = np.asarray(im.convert("RGB").convert("HSV")).astype(int)
    return int(((hsv[..., 1] > 120) & (hsv[..., 2] > 80) & (hsv[..., 0] >= 10) & (hsv[..., 0] <= 100)).sum())


def render_in_browser(html_path: Path, tmp: Path) -> None:
    """Headless Chromium loads the file: the DOM has every section, and the screenshot has the figures' colours,
    which the same page without its images lacks (so the embedded PNGs decoded)."""
    exe = browser()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,3000"]
    dom = subprocess.run(flags + ["--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in dom.stdout
    bare = tmp / "bare.html"
    bare.write_text(html_path.read_text(encoding="utf-8").replace('src="data:image/png;base64,', 'data-x="'))
    counts = []
    for page, shot in ((html_path, tmp / "shot.png"), (bare, tmp / "bare.png")):
        run = subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
        counts.append(plot_pixels(shot))
    assert counts[0] > 1000 and counts[0] > 5 * counts[1], counts


def check_report_of_sweep(directory: Path, output: Path, max_seconds: float = 30.0) -> dict:
    """``raydistill report DIRECTORY --output OUTPUT`` as a user runs it, and every check on what it wrote."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "raydistill.cli", "report", str(directory), "--output", str(output)],
                         capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    seconds = float(run.stdout.split(" trials in ", 1)[1].split(" s:", 1)[0])
    assert seconds < max_seconds, run.stdout
    check_html(output / "report.html")
    check_markdown(output / "report.md")
    check_pngs(sorted((output / "figures").glob("*.png")))
    if browser():
        render_in_browser(output / "report.html", output)
    return {"seconds": seconds, "wall_s": wall, "stdout": run.stdout}


# ---------------------------------------------------------------- statistics on known data

def test_pareto_front_keeps_only_undominated_trials():
    frame = pd.DataFrame({"trial": list("abcdef"), "cost": [1, 2, 2, 3, 4, 5], "m": [0.5, 0.4, 0.7, 0.6, 0.9, 0.9]})
    assert list(S.pareto_front(frame, "cost", "m", "max")["trial"]) == ["a", "c", "e"]
    assert list(S.pareto_front(frame, "cost", "m", "min")["trial"]) == ["a", "b"]


def test_replicate_intervals_are_student_t_intervals():
    frame = pd.DataFrame({"configuration": ["x"] * 3 + ["y"] * 2 + ["z"], "family": ["iit"] * 6,
                          "m": [1.0, 2.0, 3.0, 5.0, 5.0, 9.0]})
    table = S.replicate_intervals(frame, "m").set_index("configuration")
    assert list(table.index) == ["x", "y"]  # z ran once: no interval
    # mean 2, sem 1/sqrt(3), t(0.975, df=2) = 4.3027
    assert table.loc["x", "mean"] == pytest.approx(2.0)
    assert table.loc["x", "ci_low"] == pytest.approx(2 - 4.302653 / math.sqrt(3), rel=1e-5)
    assert table.loc["x", "ci_high"] == pytest.approx(2 + 4.302653 / math.sqrt(3), rel=1e-5)
    assert table.loc["y", "ci_low"] == table.loc["y", "ci_high"] == 5.0


def test_paired_comparison_of_families_on_shared_seeds():
    rng = np.random.default_rng(1)
    rows = []
    for seed in range(6):
        noise = rng.normal(0, 0.05)
        rows += [{"seed": seed, "family": "iit", "m": 0.60 + noise + rng.normal(0, 0.005)},
                 {"seed": seed, "family": "standard", "m": 0.50 + noise + rng.normal(0, 0.005)}]
    rows.append({"seed": 99, "family": "td", "m": 0.3})  # no shared seed: listed, not tested
    result = S.paired_families(pd.DataFrame(rows), "m")
    table = result.table.set_index(["family_a", "family_b"])
    row = table.loc[("iit", "standard")]
    assert row["n_seeds"] == 6 and row["mean_diff"] == pytest.approx(0.10, abs=0.01)
    assert row["p_value"] < 1e-4 and row["ci_low"] > 0  # seed noise cancels in the pairs
    assert row["wilcoxon_p"] == pytest.approx(1 / 32)  # exact two-sided p for 6 positive differences
    assert table.loc[("iit", "td"), "n_seeds"] == 0
    assert not S.paired_families(pd.DataFrame(rows[:2]), "m").table["n_seeds"].ge(2).any()


def test_importance_ranks_the_parameter_the_metric_depends_on():
    rng = np.random.default_rng(0)
    n = 30
    frame = pd.DataFrame({"config/train.lr": 10 ** rng.uniform(-4, -2, n),
                          "config/noise": rng.choice(["a", "b", "c"], n)})
    frame["m"] = np.log10(frame["config/train.lr"]) + rng.normal(0, 0.01, n)
    imp = S.parameter_importance(frame, ["config/train.lr", "config/noise"], "m")
    assert imp.n_trials == n and list(imp.table["parameter"]) == ["train.lr", "noise"]
    assert imp.table["importance"].iloc[0] > 10 * max(imp.table["importance"].iloc[1], 1e-3)
    few = S.parameter_importance(frame.head(3), ["config/train.lr"], "m")
    assert few.table is None and "3 trial(s)" in few.note


def test_family_and_tokens_from_a_trials_files():
    assert objective_family(OBJECTIVES["kd"]) == "standard"  # iit at weight 0 only measures IIA
    assert objective_family(OBJECTIVES["iit"]) == "iit"
    assert objective_family(OBJECTIVES["td"]) == "td"
    assert objective_family(OBJECTIVES["task"]) == "baseline"
    assert objective_family({"task": {"weight": 1.0}, "jsd": {"weight": 1.0}, "iit": None}) == "standard"
    curves = pd.DataFrame({"step": [5, 10, 20], "tokens_per_s": [100.0, 200.0, 50.0], "step_time_s": [0.5, 0.25, 1.0]})
    assert tokens_seen(curves) == pytest.approx(5 * 50 + 5 * 50 + 10 * 50)


# ---------------------------------------------------------------- the whole report on a synthetic sweep

def test_report_of_a_synthetic_sweep_through_a_file_uri(tmp_path):
    directory = write_sweep(tmp_path)
    data = load_sweep(directory.as_uri())
    assert data.metric == "bench/builtin-qa/f1" and data.mode == "max" and len(data.table) == 12
    assert data.params == ["config/objectives", "config/train.lr"] and data.seed_params == ["config/train.seed"]
    assert "config/train.lr" in data.log_params and data.teacher["bench/builtin-qa/f1"] == TEACHER_F1
    assert dict(zip(data.table["config/objectives"], data.table["family"])) == FAMILY

    out = build_report(directory.as_uri(), output=tmp_path / "out")
    assert out["sections"] == list(SECTION_IDS)
    check_html(Path(out["html"]))
    check_markdown(Path(out["markdown"]))
    check_pngs(out["figures"])
    names = {Path(p).stem for p in out["figures"]}
    assert names == {"param_objectives", "param_train_lr", "parallel_coordinates", "importance", "curves_loss_terms",
                     "curves_validation", "curves_iia_pairs", "iia_vs_scores", "cost_quality", "seed_intervals",
                     "paired_families"}
    md = Path(out["markdown"]).read_text()
    assert "| teacher" in md and "gap closed builtin-qa/f1" in md  # teacher row and gap closed
    assert "Based on 12 trials" in md and "Final IIA per aligned pair" in md and "| val/iia/t3-s1" in md
    assert "Paired comparison of objective families" in md and "| iit " in md
    # gap closed: (student - baseline) / (teacher - baseline), baseline = mean of the task-only trials
    base = data.table.loc[data.table["family"] == "baseline", "bench/builtin-qa/f1"].mean()
    best = data.table["bench/builtin-qa/f1"].max()
    assert f"{(best - base) / (TEACHER_F1 - base):.4g}" in md


def test_report_of_a_running_sweep_without_results_table(tmp_path):
    # What exists so far: trial folders (one still running, its last metrics line half-written), no results table.
    directory = write_sweep(tmp_path, seeds=(0,), with_table=False, running="abc_00001")
    (directory / "trial_abc_00002" / "metrics.jsonl").unlink()  # as on s3, where Tune uploads only its own files
    data = load_sweep(str(directory))
    assert data.trials["abc_00002"].curves.attrs["source"] == "tune"
    assert list(data.trials["abc_00002"].curves["val/loss"]) == [2.2]
    status = dict(zip(data.table["trial"], data.table["status"]))
    assert status["abc_00001"] == "running" and list(status.values()).count("finished") == 3
    assert len(data.trials["abc_00001"].curves) == 2
    assert any("rebuilt from the trial folders" in n for n in data.notes)
    out = build_report(str(directory), output=tmp_path / "out")
    check_html(Path(out["html"]))
    check_pngs(out["figures"])
    md = Path(out["markdown"]).read_text()
    assert "still running (1 trials running or pending)" in md
    assert "for 1 of them no metrics.jsonl is in the storage" in md
    assert "No configuration was run more than once" in md


def write_table_sweep(root: Path, rows: list[dict], space: dict) -> Path:
    """A sweep folder with only sweep.yaml (val/loss, min) and results.csv."""
    directory = root / "tbl"
    directory.mkdir(parents=True)
    (directory / "sweep.yaml").write_text(yaml.safe_dump({"name": "tbl", "metric": "val/loss", "mode": "min",
                                                          "base": {"objectives": OBJECTIVES["kd"]}, "space": space}))
    pd.DataFrame(rows).to_csv(directory / "results.csv", index=False)
    return directory


def test_unfinished_trials_are_never_ranked_nor_in_the_statistics(tmp_path):
    from raydistill.report.sections import leaderboard, overview, seeds

    rows = [{"trial": "a", "status": "finished", "config/train.seed": 0, "step": 12345, "val/loss": 2.00,
             "runtime_s": 100.0},
            {"trial": "b", "status": "finished", "config/train.seed": 1, "step": 12345, "val/loss": 2.02,
             "runtime_s": 100.0},
            {"trial": "c", "status": "failed", "config/train.seed": 2, "step": 50, "val/loss": 1.5, "runtime_s": 8.0},
            {"trial": "d", "status": "interrupted", "config/train.seed": 3, "step": 20, "val/loss": 1.0,
             "runtime_s": 5.0},
            {"trial": "e", "status": "pending", "config/train.seed": 4}]
    d = load_sweep(str(write_table_sweep(tmp_path, rows, {"train.seed": {"grid": [0, 1, 2, 3, 4]}})))
    board = leaderboard(d).blocks[0].table
    assert list(zip(board["rank"], board["trial"])) == [("1", "a"), ("2", "b"), ("–", "c"), ("–", "d"), ("–", "e")]
    assert board["step"].iloc[0] == "12345" and board["runtime_s"].iloc[-1] == "–"
    intervals = next(b.table for b in seeds(d).blocks if b.kind == "table")
    assert intervals["n"].tolist() == ["2"] and intervals["mean"].tolist() == ["2.01"]  # a and b only
    assert any("use the 2 finished or stopped trials only" in b.text for b in overview(d).blocks)


def test_configurations_are_grouped_on_exact_values(tmp_path):
    # Two learning rates that agree to 4 significant digits are different configurations; a repeated one is not.
    rows = [{"trial": "a", "status": "finished", "config/train.lr": 0.0012341, "config/train.seed": 0, "val/loss": 2.0},
            {"trial": "b", "status": "finished", "config/train.lr": 0.0012344, "config/train.seed": 1, "val/loss": 3.0},
            {"trial": "c", "status": "finished", "config/train.lr": 0.005, "config/train.seed": 0, "val/loss": 2.5},
            {"trial": "e", "status": "finished", "config/train.lr": 0.005, "config/train.seed": 1, "val/loss": 2.7}]
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.seed": {"grid": [0, 1]}}
    d = load_sweep(str(write_table_sweep(tmp_path, rows, space)))
    assert d.table["configuration"].tolist() == ["train.lr=0.0012341", "train.lr=0.0012344", "train.lr=0.005",
                                                 "train.lr=0.005"]
    intervals = S.replicate_intervals(d.table, "val/loss")
    assert intervals["configuration"].tolist() == ["train.lr=0.005"] and intervals["n"].tolist() == [2]


def test_a_rebuilt_report_reads_tunes_error_file(tmp_path):
    from raydistill.report.sections import leaderboard

    directory = write_sweep(tmp_path, seeds=(0,), with_table=False, running="abc_00001")
    (directory / "trial_abc_00001" / "error.txt").write_text("Failure # 1\nNonFiniteLoss: non-finite loss\n")
    (directory / "trial_abc_00001" / "result.json").write_text(json.dumps({"step": 10, "bench/builtin-qa/f1": 0.99})
                                                                + "\n")
    data = load_sweep(str(directory))
    assert dict(zip(data.table["trial"], data.table["status"]))["abc_00001"] == "failed"
    board = leaderboard(data).blocks[0].table
    assert board.iloc[-1][["rank", "trial", "status"]].tolist() == ["–", "abc_00001", "failed"]
    md = Path(build_report(str(directory), output=tmp_path / "out")["markdown"]).read_text()
    assert "still running" not in md


def test_a_rebuilt_report_tells_a_scheduler_stopped_trial_from_a_running_one(tmp_path):
    """Without results.csv, a trial an early-stopping scheduler stopped has no end event of its own: Tune's
    newest experiment state (its layout: each trial and its runtime metadata as JSON strings) says TERMINATED."""
    directory = write_sweep(tmp_path, seeds=(0,), with_table=False, running="abc_00001")
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)

    def state(name: str, statuses: dict[str, str]) -> None:
        trial_data = [[json.dumps({"trial_id": tid, "status": status}), json.dumps({"last_result": {"step": 10}})]
                      for tid, status in statuses.items()]
        (directory / name).write_text(json.dumps({"trial_data": trial_data, "runner_data": {}, "stats": {}}))

    def statuses(where: Path) -> dict[str, str]:
        table = load_sweep(str(where)).table
        return dict(zip(table["trial"], table["status"]))

    # abc_00003 failed without an error.txt, an end event or a final result
    (directory / "trial_abc_00003" / "trial.jsonl").write_text(json.dumps({"event": "start", "time": 1.0e9}) + "\n")
    (directory / "trial_abc_00003" / "result.json").write_text(json.dumps({"step": 10}) + "\n")
    state("experiment_state-2026-01-01_10-00-00.json", {"abc_00001": "RUNNING", "abc_00003": "ERROR"})
    state("experiment_state-2026-01-01_11-00-00.json", {"abc_00001": "TERMINATED", "abc_00002": "ERROR",
                                                        "abc_00003": "ERROR"})
    # The newest state wins, and it is read as results.csv reads Tune's: ERROR is failed even after the trial's
    # end event (raydistill.ranking.trial_status).
    assert statuses(directory) == {"abc_00000": "finished", "abc_00001": "stopped", "abc_00002": "failed",
                                   "abc_00003": "failed"}
    assert statuses(copy)["abc_00001"] == "running"  # no experiment state: nothing says it stopped


def test_report_command_errors_and_default_output(tmp_path):
    from typer.testing import CliRunner

    from raydistill.cli import app
    from raydistill.errors import ConfigError

    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert isinstance(result.exception, ConfigError) and "no such sweep directory" in str(result.exception)
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert isinstance(result.exception, ConfigError) and "no results table" in str(result.exception)
    directory = write_sweep(tmp_path, seeds=(0,))
    assert any("no trial has a column 'bench/nope'" in n for n in load_sweep(str(directory), "bench/nope").notes)
    result = runner.invoke(app, ["report", str(directory), "--metric", "bench/builtin-ppl/perplexity"])
    assert result.exit_code == 0, result.output
    md = (directory / "report" / "report.md").read_text()
    assert "ranked by bench/builtin-ppl/perplexity (min)" in md  # mode from the name


@pytest.mark.skipif(browser() is None, reason="no headless browser (chromium) on this machine: "
                    "apt-get install chromium-headless-shell to render the report in tests")
def test_report_renders_in_a_headless_browser(tmp_path):
    out = build_report(str(write_sweep(tmp_path)), output=tmp_path / "out")
    render_in_browser(Path(out["html"]), tmp_path)


def test_report_from_s3_through_an_in_process_server(tmp_path, s3_server):
    import pyarrow.fs as pafs

    s3, _ = pafs.FileSystem.from_uri(f"s3://bucket?{s3_server}")
    directory = write_sweep(tmp_path, seeds=(0, 1))
    pafs.copy_files(str(directory), "bucket/sweeps/syn", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3)
    uri = f"s3://bucket/sweeps/syn?{s3_server}"
    data = load_sweep(uri)
    assert len(data.table) == 8 and data.teacher and data.trials["abc_00000"].curves is not None
    out = build_report(uri, output=tmp_path / "out")
    check_html(Path(out["html"]))
    check_pngs(out["figures"])
    local = (Path(build_report(str(directory), output=tmp_path / "local")["markdown"])).read_text()
    remote = Path(out["markdown"]).read_text()
    assert "endpoint_override" not in remote and "s3://bucket/sweeps/syn" in remote  # query strings may hold keys
    # Same content whatever the storage (the first lines name the location and the time).
    assert remote.split("<a id=\"leaderboard\">")[1] == local.split("<a id=\"leaderboard\">")[1]


def test_report_never_imports_the_training_code(tmp_path):
    # A report can be built where torch, Ray and DeepSpeed are absent (a laptop reading a bucket).
    directory = write_sweep(tmp_path, seeds=(0,))
    code = ("import sys; from raydistill.report import build_report; "
            f"build_report({str(directory)!r}, output={str(tmp_path / 'out')!r}); "
            "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'transformers', 'raydistill.config', "
            "'raydistill.train', 'raydistill.sweep', 'raydistill.eval', 'raydistill.objectives') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
