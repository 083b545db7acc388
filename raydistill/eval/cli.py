"""``raydistill eval MODEL --suite TASKS ...``: written for typer; the main CLI registers
:func:`eval_command` as its ``eval`` subcommand. Errors are RaydistillError subclasses whose message the
CLI prints without a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from raydistill.eval.errors import EvalConfigError
from raydistill.eval.tasks import SUITES, TASKS, parse_objective

_TASK_HELP = (f"comma-separated tasks and suites. Tasks: {', '.join(TASKS)}. Suites: "
              + "; ".join(f"{name} = {'+'.join(tasks)}" for name, tasks in SUITES.items()))


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise EvalConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise EvalConfigError("--seeds: give at least one seed")
    return seeds


def eval_command(
    model: Annotated[str, typer.Argument(help="save_pretrained directory, Hugging Face id, or preset "
                                              "(tiny-bert, tiny-gpt2, tiny-llama: random init)")],
    suite: Annotated[str, typer.Option("--suite", "-s", help=_TASK_HELP)] = "builtin",
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="local benchmark files laid out like ../shared/data (glue/, conll2003/, squad-v1.1/, "
                           "wikitext-2/); without it, real tasks come from the Hugging Face hub")] = None,
    max_train_examples: Annotated[Optional[int], typer.Option(help="fine-tune on at most this many examples")] = None,
    max_eval_examples: Annotated[Optional[int], typer.Option(help="score at most this many examples")] = None,
    seeds: Annotated[str, typer.Option(help="comma-separated fine-tuning seeds (mean and std over them)")] = "0",
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="directory for results.csv, summary.csv and results.json")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="fine-tuning epochs (default 3)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="fine-tuning batch size (default 32)")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(
        "--lr", help="learning rate (default 1e-3 for a preset, 5e-5 for pretrained weights)")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="tokens per example or window (default 128)")] = None,
    doc_stride: Annotated[Optional[int], typer.Option(help="SQuAD window overlap in tokens (default 32)")] = None,
    ppl_method: Annotated[Optional[str], typer.Option(
        help="perplexity windows: sliding (decoders' default: each token scored once, with context) or "
             "non_overlapping (encoders' only method)")] = None,
    ppl_context: Annotated[Optional[int], typer.Option(
        help="perplexity window length in tokens (default: the model's training length or max positions)")] = None,
    ppl_stride: Annotated[Optional[int], typer.Option(
        help="sliding-window perplexity: tokens between window starts (default: half the window)")] = None,
    builtin_seed: Annotated[int, typer.Option(help="world seed of the built-in corpus tasks")] = 0,
    objective: Annotated[Optional[str], typer.Option(
        help="TASK:METRIC to print on the last line (e.g. sst2:accuracy, glue:glue_average)")] = None,
    use_ray: Annotated[bool, typer.Option("--ray/--local", help="run each task and seed as a Ray task")] = False,
    num_cpus: Annotated[float, typer.Option(help="CPUs per Ray evaluation task")] = 1,
    num_gpus: Annotated[Optional[float], typer.Option(
        help="GPUs per Ray evaluation task (default: 1 when the cluster has GPUs, else 0)")] = None,
    num_threads: Annotated[Optional[int], typer.Option(help="torch CPU threads per job (default: torch's)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Fine-tune and score MODEL on downstream benchmarks (GLUE, SQuAD, CoNLL-2003, perplexity)."""
    from rich.console import Console

    from raydistill.eval.results import summary_table, write_results
    from raydistill.eval.runner import evaluate, metric_value
    from raydistill.eval.settings import EvalSettings

    goal = parse_objective(objective) if objective else None
    given = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "max_length": max_length,
             "doc_stride": doc_stride, "max_train_examples": max_train_examples,
             "max_eval_examples": max_eval_examples, "num_threads": num_threads, "ppl_method": ppl_method,
             "ppl_context_length": ppl_context, "ppl_stride": ppl_stride}
    settings = EvalSettings(seeds=parse_seeds(seeds), builtin_seed=builtin_seed, device=device, num_cpus=num_cpus,
                            num_gpus=num_gpus, **{k: v for k, v in given.items() if v is not None})
    report = evaluate(model, suite, settings, data_dir=data_dir, use_ray=use_ray)
    console = Console()
    console.print(summary_table(report.summary, title=f"raydistill eval {model}"))
    for note in report.notes:
        console.print(f"[dim]note[/dim] {note}")
    timing = report.timing()
    console.print(f"{len(report.jobs)} jobs, {timing['wall_s']:.1f} s, {timing['examples']} examples, "
                  f"{timing['examples_per_s']:.1f} examples/s")
    if output is not None:
        paths = write_results(output, report.rows, report.summary, report.meta())
        console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    if goal:
        console.print(f"objective {goal[0]}:{goal[1]} = {metric_value(report.summary, *goal):.6f}")
