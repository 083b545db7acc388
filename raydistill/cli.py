"""Command line: parse arguments, call the library, print. Errors the user can fix print as one message
(no traceback) and exit with status 2."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from raydistill.errors import RaydistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distillation experiments on Ray Train + DeepSpeed.")
bench_app = typer.Typer(no_args_is_help=True, help="Side-by-side performance measurements.")
app.add_typer(bench_app, name="bench")

OVERRIDES = typer.Argument(None, help="dotted overrides, e.g. train.lr=1e-4 scaling.num_workers=4")


def _load(config: str, overrides: Optional[List[str]], address: Optional[str]):
    from raydistill.config import load_config

    extra = list(overrides or [])
    if address:
        extra.append(f"ray.address={address}")
    return load_config(config, extra)


def _print_summary(summary: dict) -> None:
    metrics = summary.get("final_metrics") or {}
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    typer.echo(f"[raydistill] done in {summary['wall_time_s']:.1f} s; exported {summary['export_dir']}")
    for k in sorted(shown):
        typer.echo(f"  {k:<24} {shown[k]:.6g}")


@app.command()
def train(config: str = typer.Argument(..., help="experiment YAML"), overrides: Optional[List[str]] = OVERRIDES,
          address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)")):
    """Distil a student from a teacher (resumes automatically when rerun with the same name)."""
    from raydistill.train.launcher import run

    _print_summary(run(_load(config, overrides, address), mode="distill"))


@app.command()
def teacher(config: str = typer.Argument(..., help="experiment YAML"), overrides: Optional[List[str]] = OVERRIDES,
            address: Optional[str] = typer.Option(None, help="Ray cluster address")):
    """Train or fine-tune the config's teacher with the task loss; exported to OUTPUT_DIR/teacher."""
    from raydistill.train.launcher import run

    _print_summary(run(_load(config, overrides, address), mode="teacher"))


@app.command("config")
def show_config(config: str = typer.Argument(..., help="experiment YAML"),
                overrides: Optional[List[str]] = OVERRIDES,
                as_teacher: bool = typer.Option(False, "--teacher", help="check it as `raydistill teacher` would "
                                                "(default: as `raydistill train`)")):
    """Dry run: validate a config (with overrides), run every check `raydistill train` runs before Ray
    starts (files, directories, models and shapes, corpus, tokenizer, objectives), and print the config with
    every default filled in. Tokenizer and packed data are cached for the run, as train would."""
    from raydistill.config import dump_config
    from raydistill.train.plan import prepare

    cfg = _load(config, overrides, None)
    plan = prepare(cfg, mode="teacher" if as_teacher else "distill")
    typer.echo(dump_config(cfg))
    for note in plan.notes:
        typer.echo(f"# note: {note}", err=True)
    train_blocks, val_blocks = plan.blocks
    student = "" if as_teacher else (f"; student {plan.info.student_layers} blocks x {plan.info.student_hidden}"
                                     f"{' from the teacher ' + str(plan.init_layers) if plan.init_layers else ''}")
    typer.echo(f"# checked: {len(train_blocks)} training and {len(val_blocks)} validation blocks of "
               f"{cfg.data.block_size} tokens, vocabulary {plan.info.vocab_size}; teacher "
               f"{plan.info.teacher_layers or plan.info.student_layers} blocks{student}; objectives "
               f"{', '.join(plan.objectives)}; output_dir {plan.output_dir}", err=True)


@app.command()
def sweep(sweep_file: Optional[str] = typer.Argument(None, help="sweep YAML (see sweeps/)"),
          overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides of the sweep file, e.g. "
                                                          "num_samples=8 storage_path=/data/sweeps set.train.lr=1e-4"),
          resume: Optional[str] = typer.Option(None, "--resume", help="continue the interrupted sweep in this "
                                               "directory (STORAGE_PATH/NAME) without redoing finished trials"),
          address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)")):
    """Run a Ray Tune sweep: every trial distils a student on Ray Train + DeepSpeed and is scored on the
    benchmarks; ends with the leaderboard, results table, best config and best student."""
    from raydistill.monitoring.board import PREPARING
    from raydistill.monitoring.terminal import Display
    from raydistill.sweep.results import load_saved_sweep
    from raydistill.sweep.runner import run_sweep
    from raydistill.sweep.spec import load_sweep
    from raydistill.train.preflight import check_sweep_before_ray

    extra = list(overrides or [])
    if address:
        extra.append(f"set.ray.address={address}")
    if resume:
        if sweep_file is not None:
            raise typer.BadParameter("give either SWEEP_FILE or --resume PATH, not both")
        sweep = load_saved_sweep(resume, extra)
    elif sweep_file is None:
        raise typer.BadParameter("give a sweep file, or --resume PATH")
    else:
        sweep = load_sweep(sweep_file, extra)
    with Display(sweep.base_config().monitoring.progress) as display:
        with display.phase(PREPARING):  # the base config's corpus, tokenizer and packed blocks (then cached)
            check_sweep_before_ray(sweep)
        run_sweep(sweep, resume_path=resume, display=display)


@app.command()
def results(path: str = typer.Argument(..., help="sweep directory (STORAGE_PATH/NAME), finished or running"),
            top: Optional[int] = typer.Option(None, help="show only the best N trials"),
            as_json: bool = typer.Option(False, "--json", help="print the table as JSON records")):
    """Print the leaderboard of a sweep."""
    from raydistill.sweep.results import format_leaderboard, leaderboard, load_saved_sweep, read_table

    spec = load_saved_sweep(path)
    frame = read_table(path)
    if as_json:
        board = leaderboard(frame, spec.spec.metric, spec.spec.mode)
        board = board.head(top) if top else board
        records = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}  # NaN -> null
                   for row in board.to_dict("records")]
        typer.echo(json.dumps(records, indent=2, default=str))
    else:
        typer.echo(format_leaderboard(frame, spec, limit=top))


@app.command()
def report(path: str = typer.Argument(..., help="sweep directory (STORAGE_PATH/NAME) or URI (file://, s3://, gs://), "
                                      "finished or running"),
           output: Optional[str] = typer.Option(None, "--output", "-o", help="folder for report.html, report.md and "
                                                "figures/ (default: PATH/report, or ./NAME-report for s3/gs)"),
           metric: Optional[str] = typer.Option(None, help="rank by this column (default: the sweep's metric)"),
           mode: Optional[str] = typer.Option(None, help="min or max (default: the sweep's, else from the name)")):
    """Write a sweep's report: one self-contained HTML file and a Markdown summary with PNG figures."""
    from raydistill.report import build_report

    if mode not in (None, "min", "max"):
        raise typer.BadParameter("--mode is min or max")
    out = build_report(path, output=output, metric=metric, mode=mode)
    typer.echo(f"[raydistill] report of {out['trials']} trials in {out['seconds']:.1f} s: {out['html']} "
               f"(self-contained), {out['markdown']} (+ {len(out['figures'])} figures)")


@app.command()
def dashboard(directory: Optional[str] = typer.Option(None, "--dir", help="Grafana dashboards folder to write to "
                                                        "(default: the one Ray's Grafana configuration of the latest "
                                                        "Ray session on this machine reads)"),
              print_json: bool = typer.Option(False, "--print", help="print the dashboard JSON instead (to import "
                                              "into any Grafana)")):
    """Install raydistill's Grafana dashboard where Ray's Grafana integration picks it up, and say how to see it
    (Prometheus and Grafana as Ray documents them). Run it on the cluster's head node."""
    from raydistill.monitoring import grafana

    if print_json:
        typer.echo(grafana.dashboard_json(), nl=False)
        return
    typer.echo(grafana.next_steps(grafana.install(directory)))


def _register_eval() -> None:
    from raydistill.eval.cli import eval_command

    app.command("eval", help="Fine-tune and score a model on downstream benchmarks (GLUE, SQuAD, CoNLL-2003, "
                "perplexity, built-in tasks).")(eval_command)


_register_eval()


@bench_app.command("iit")
def bench_iit(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
              models: str = typer.Option("tiny-bert,tiny-gpt2,tiny-llama,bert-base", help="comma-separated"),
              batch_size: int = typer.Option(8, help="sequences per step (the main case)"),
              seq_len: int = typer.Option(128, help="tokens per sequence (the main case)"),
              gpu_sizes: bool = typer.Option(False, "--gpu-sizes", help="also measure 16 x 512 (GPU-sized)"),
              steps: int = typer.Option(10),
              release_freed_memory: bool = typer.Option(
                  False, "--release-freed-memory", help="measure with glibc's default malloc (freed memory goes "
                  "back to the OS) instead of keeping it as training workers do")):
    """Step time of task+kd+cosine vs the same plus iit, side by side; ratio for the BERT-base config."""
    from raydistill.bench.iit import GPU_SIZES
    from raydistill.bench.iit import bench_iit as run_bench

    result = run_bench(models=models.split(","), batch_size=batch_size, seq_len=seq_len, steps=steps,
                       keep_freed_memory=not release_freed_memory, extra_sizes=GPU_SIZES if gpu_sizes else ())
    typer.echo(json.dumps(result, indent=2) if as_json else json.dumps(result["rows"], indent=2))


@bench_app.command("overhead")
def bench_overhead(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
                   steps: int = typer.Option(30, help="timed steps per side"),
                   preset: str = typer.Option("tiny-bert", help="teacher preset")):
    """Ray Train + DeepSpeed (1 worker) vs a bare PyTorch loop: the same KD step, side by side."""
    from raydistill.bench.overhead import bench_overhead as run_bench

    result = run_bench(steps=steps, preset=preset)
    typer.echo(json.dumps(result, indent=2) if as_json else result["table"])


@bench_app.command("throughput")
def bench_throughput(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
                     preset: str = typer.Option("cpu", help="cpu (tiny GPT-2, 16x256, 1-3 min on 2 cores) or "
                                                "gpt2-medium (GPT-2-medium-sized teacher -> 12 blocks, 16x512, bf16)"),
                     teacher: Optional[str] = typer.Option(None, help="teacher preset (default: the preset's)"),
                     student_layers: Optional[int] = typer.Option(None, help="student blocks"),
                     batch_size: Optional[int] = typer.Option(None), block_size: Optional[int] = typer.Option(
                         None, help="sequence length (gpt2-medium: 512 or 1024)"),
                     precision: Optional[str] = typer.Option(None, help="fp32 or bf16"),
                     objectives: str = typer.Option("task,kd", help="comma-separated objectives, each at weight 1"),
                     zero_stage: int = typer.Option(2), steps: Optional[int] = typer.Option(None, help="timed steps"),
                     rounds: int = typer.Option(1, help="framework runs: on CPU each time-sliced with the bare "
                                                "loop (the ratio: the median over all window pairs), on a GPU each "
                                                "between two bare runs (the ratio: the median of the rounds')"),
                     set_: Optional[List[str]] = typer.Option(None, "--set", help="a config override for both sides, "
                                                              "as `train` takes it (repeatable), e.g. "
                                                              "deepspeed.extra.zero_optimization.overlap_comm=true"),
                     bare_only: bool = typer.Option(False, "--bare-only", help="skip the Ray Train + DeepSpeed side")):
    """Tokens/s, step time, counted FLOPs/token, FLOP/s, MFU and peak memory of the same distillation step in a
    bare PyTorch loop, through DeepSpeed's engine alone and through Ray Train + DeepSpeed (1 worker), side by
    side; ratios framework / bare and DeepSpeed / bare."""
    from raydistill.bench.throughput import PRESETS, bench_throughput as run_bench

    if preset not in PRESETS:
        raise typer.BadParameter(f"{preset!r}; allowed: {', '.join(PRESETS)}", param_hint="--preset")
    if precision not in (None, "fp32", "bf16"):
        raise typer.BadParameter(f"{precision!r}; allowed: fp32, bf16", param_hint="--precision")
    import contextlib

    # --json: stdout carries the JSON alone, the run's progress lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        result = run_bench(preset, teacher=teacher, student_layers=student_layers, batch_size=batch_size,
                           block_size=block_size, precision=precision, objectives=tuple(objectives.split(",")),
                           zero_stage=zero_stage, steps=steps, framework=not bare_only, rounds=rounds,
                           overrides=tuple(set_ or ()))
    typer.echo(json.dumps(result, indent=2) if as_json else result["table"])


@bench_app.command("td")
def bench_td(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
             vocabs: str = typer.Option("32000,150000", help="comma-separated vocabulary sizes"),
             ks: str = typer.Option("8,64,512", help="comma-separated td top-k sizes"),
             reps: int = typer.Option(3, help="timed repetitions per variant"),
             batch_size: int = typer.Option(4, help="sequences per step (the main case)"),
             seq_len: int = typer.Option(128, help="tokens per sequence (the main case)"),
             gpu_sizes: bool = typer.Option(False, "--gpu-sizes", help="also measure 16 x 512 (GPU-sized; about "
                                            "5 GB per 150k-vocabulary logits tensor)"),
             bf16: bool = typer.Option(False, "--bf16", help="also measure the objective rows in bfloat16")):
    """Peak memory and time of td (top-k) vs full-vocabulary kd: the objective alone and a whole step."""
    from raydistill.bench.td import GPU_SIZES
    from raydistill.bench.td import bench_td as run_bench

    result = run_bench(vocabs=[int(v) for v in vocabs.split(",")], ks=[int(k) for k in ks.split(",")], reps=reps,
                       bf16=bf16, batch_size=batch_size, seq_len=seq_len, extra_sizes=GPU_SIZES if gpu_sizes else ())
    typer.echo(json.dumps(result, indent=2) if as_json else result["table"])


@bench_app.command("sparse-kd")
def bench_sparse_kd(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
                    ks: str = typer.Option("16,64,256", help="comma-separated top-K sizes"),
                    temperatures: str = typer.Option("1,2", help="comma-separated kd temperatures"),
                    text: Optional[str] = typer.Option(None, help="UTF-8 training text (default: WikiText-2)"),
                    teacher_steps: int = typer.Option(300, help="training steps of the teacher"),
                    student_steps: int = typer.Option(100, help="training steps of the student"),
                    distill_steps: int = typer.Option(100, help="steps of each distilled student"),
                    tail_samples: str = typer.Option("8,16,32", help="comma-separated S: top-64 + S tail samples"),
                    draws: int = typer.Option(4, help="draws of the tail samples per S (spread, mean gradient)"),
                    distill_samples: int = typer.Option(16, help="S of the third student (0: none)")):
    """Sparse KD (kd top_k, with and without tail samples) vs full-vocabulary KD on a trained tiny teacher: loss
    gap, gradients, rest mass, distilled students."""
    from raydistill.bench.sparse_kd import bench_sparse_kd as run_bench, table

    result = run_bench(ks=[int(k) for k in ks.split(",")], temperatures=[float(t) for t in temperatures.split(",")],
                       text=text, teacher_steps=teacher_steps, student_steps=student_steps,
                       distill_steps=distill_steps, tail_samples=[int(s) for s in tail_samples.split(",") if s],
                       draws=draws, distill_samples=distill_samples)
    typer.echo(json.dumps(result, indent=2) if as_json else table(result))


@bench_app.command("sweep")
def bench_sweep(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
                trials: int = typer.Option(4), steps: int = typer.Option(30, help="training steps per trial"),
                concurrency: Optional[int] = typer.Option(None, help="max concurrent trials (default: what fits)")):
    """A sweep of N tiny trials vs the same trials run back to back with raydistill train; CPU utilisation."""
    from raydistill.bench.sweep import bench_sweep as run_bench

    result = run_bench(trials=trials, steps=steps, concurrency=concurrency)
    typer.echo(json.dumps(result, indent=2) if as_json else result["table"])


@bench_app.command("teacher-cache")
def bench_teacher_cache(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
                        trials: int = typer.Option(4), steps: int = typer.Option(20, help="training steps per trial"),
                        top_k: int = typer.Option(64, help="kd top_k and the cache's K"),
                        dtype: str = typer.Option("float16", help="cache value dtype: float16, bfloat16, float32")):
    """N trials of sparse KD with the teacher online vs from the teacher cache (filled once), side by side."""
    from raydistill.bench.teacher_cache import bench_teacher_cache as run_bench

    result = run_bench(trials=trials, steps=steps, top_k=top_k, dtype=dtype)
    typer.echo(json.dumps(result, indent=2) if as_json else result["table"])


@bench_app.command("data")
def bench_data(as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
               tokens: str = typer.Option("10000000,100000000", help="comma-separated corpus sizes (tokens)"),
               cpus: str = typer.Option("", help="comma-separated CPU counts (default: 1 and all)"),
               text: Optional[str] = typer.Option(None, help="UTF-8 text repeated to each size (default: WikiText-2)"),
               parts: str = typer.Option("build,two_node,step", help="build (each size and CPU count), two_node, step"),
               steps: int = typer.Option(40, help="timed training steps per run of the step comparison")):
    """A corpus of N tokens prepared on Ray Data on 1 and all CPUs (and two nodes); training from its shards."""
    from raydistill.bench.data import bench_data as run_bench

    result = run_bench(tokens=tuple(int(float(t)) for t in tokens.split(",")), text=text, parts=tuple(parts.split(",")),
                       cpus=tuple(int(c) for c in cpus.split(",")) if cpus else None, steps=steps)
    typer.echo(json.dumps(result, indent=2) if as_json else result["table"])


_SIGINT = []


def _on_sigint(signum, frame):
    _SIGINT.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    import signal

    signal.signal(signal.SIGINT, _on_sigint)
    try:
        app()
    except RaydistillError as e:
        # Exit status: 2 a configuration error, 1 a failed run, 130 an interrupted command (its message says how
        # to resume).
        code = getattr(e, "exit_code", 2)
        typer.echo(str(e) if code == 130 else f"error: {e}", err=True)
        sys.exit(code)
    except SystemExit as e:
        if e.code == 1 and _SIGINT:  # Ctrl-C where raydistill does not handle it: click's "Aborted!", status 130
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
