"""Evaluate a model on tasks: one job per (task, seed), run as a plain local call (debugging, tests) or as
Ray tasks with resources (in parallel where the cluster has room; on GPU when the job asks for one)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from raydistill.errors import RaydistillError
from raydistill.eval.errors import EvalConfigError
from raydistill.eval.finetune import TaskOutcome, run_classification, run_ner, run_qa
from raydistill.eval.model_source import resolve_model
from raydistill.eval.perplexity import check_method, run_perplexity
from raydistill.eval.results import ResultRow, SummaryRow, summarize
from raydistill.eval.settings import EvalSettings
from raydistill.eval.taskdata import check_data, load_task_data
from raydistill.eval.tasks import TASKS, canonical, check_metric, resolve_tasks, suite_caps

_RUNNERS = {"classification": run_classification, "regression": run_classification, "ner": run_ner,
            "qa": run_qa, "perplexity": run_perplexity}


@dataclass(frozen=True)
class Job:
    model: str
    task: str
    seed: int
    settings: EvalSettings
    data_dir: str | None = None
    label: str = ""  # the model as the user named it, for the result rows (``model`` is absolute)


@dataclass
class JobResult:
    rows: list[ResultRow]
    task: str
    seed: int
    wall_s: float
    n_train: int
    n_eval_examples: int  # questions, sentences, documents: what a reader counts as examples
    epochs: int
    device: str
    train_loss: float | None = None


@dataclass
class EvalReport:
    rows: list[ResultRow]
    summary: list[SummaryRow]
    jobs: list[JobResult]
    settings: EvalSettings
    wall_s: float
    notes: list[str] = field(default_factory=list)

    def timing(self) -> dict:
        """Wall time and throughput: examples fine-tuned (times epochs) plus examples scored, per second."""
        per_job = [{"task": j.task, "seed": j.seed, "wall_s": round(j.wall_s, 3), "device": j.device,
                    "n_train": j.n_train, "n_eval": j.n_eval_examples, "train_loss": j.train_loss,
                    "examples_per_s": round((j.n_train * j.epochs + j.n_eval_examples) / max(j.wall_s, 1e-9), 1)}
                   for j in self.jobs]
        processed = sum(j.n_train * j.epochs + j.n_eval_examples for j in self.jobs)
        return {"wall_s": round(self.wall_s, 3), "examples": processed,
                "examples_per_s": round(processed / max(self.wall_s, 1e-9), 1), "jobs": per_job}

    def meta(self) -> dict:
        return {"settings": self.settings.to_dict(), "timing": self.timing(), "notes": self.notes}


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalConfigError("eval device 'cuda' asked for, but no GPU is visible (ask Ray for num_gpus, or use auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def _threads(n: int | None):
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _quiet_transformers():
    # Every head is new on purpose; transformers' "newly initialized weights" warnings would drown the table.
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def run_job(job: Job) -> JobResult:
    """Fine-tune and score one task with one seed (the unit of work, local or in a Ray task)."""
    start = time.perf_counter()
    spec = TASKS[job.task]
    source = resolve_model(job.model)
    device = pick_device(job.settings.device)
    with _quiet_transformers(), _threads(job.settings.num_threads):
        data = load_task_data(spec, job.settings, job.data_dir)
        outcome: TaskOutcome = _RUNNERS[spec.kind](spec, source, data, job.settings, job.seed, device)
    rows = [ResultRow(job.label or job.model, spec.name, metric, float(value), job.seed, outcome.n_train,
                      outcome.n_eval, outcome.note, outcome.method) for metric, value in outcome.metrics.items()]
    return JobResult(rows, spec.name, job.seed, time.perf_counter() - start, outcome.n_train, len(data.eval),
                     job.settings.epochs if outcome.n_train else 0, str(device), outcome.train_loss)


def _ray_job(job: Job) -> JobResult:
    # Ray gives the task num_cpus cores; torch would otherwise start a thread per core of the node.
    if job.settings.num_threads is None:
        job = replace(job, settings=replace(job.settings, num_threads=max(1, int(job.settings.num_cpus))))
    return run_job(job)


def _run_ray(jobs: list[Job], settings: EvalSettings) -> list[JobResult]:
    import ray

    if not ray.is_initialized():
        ray.init()  # joins the cluster of RAY_ADDRESS when set, else starts a local one
    num_gpus = settings.num_gpus
    if num_gpus is None:  # on GPU when the cluster has one
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Called from a sweep trial, the jobs must not be captured by the trial's placement group (it reserves
    # only the trial driver's sliver of a CPU): they take their own resources from the cluster.
    remote = ray.remote(num_cpus=settings.num_cpus, num_gpus=num_gpus, max_retries=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))(_ray_job)
    refs = [remote.remote(job) for job in jobs]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        # A user error inside a task (bad file, unusable model) keeps its message and its type.
        if isinstance(e.cause, RaydistillError):
            raise e.cause from None
        raise


def plan_jobs(model: str, tasks, settings: EvalSettings, data_dir: str | Path | None) -> list[Job]:
    """Validate everything the driver can check cheaply (model, task names, data files), then one job per
    task and seed. A pretrained decoder's perplexity does not depend on the seed: it runs once."""
    specs = resolve_tasks(tasks)
    source = resolve_model(model)
    for spec in specs:
        check_data(spec, data_dir)
        if spec.kind == "perplexity":
            check_method(settings, source.encoder)
    directory = None if data_dir is None else str(Path(data_dir).expanduser().resolve())
    jobs = []
    for spec in specs:
        seeds = settings.seeds
        if spec.kind == "perplexity" and not source.encoder and not source.from_scratch:
            seeds = seeds[:1]
        # Ray workers may run elsewhere: hand them the resolved (absolute) directory, not a relative path.
        jobs.extend(Job(source.location, spec.name, seed, settings, directory, model) for seed in seeds)
    return jobs


def evaluate(model: str, tasks, settings: EvalSettings | None = None, data_dir: str | Path | None = None,
             use_ray: bool = False) -> EvalReport:
    """Fine-tune and score ``model`` (preset name, save_pretrained directory or hub id) on ``tasks`` (task
    and suite names, a list or a comma-separated string). A capped suite ("quick") fills in the example
    caps the settings leave unset."""
    settings = settings or EvalSettings()
    caps = suite_caps(tasks)
    if caps:
        settings = replace(settings, max_train_examples=settings.max_train_examples or caps[0],
                           max_eval_examples=settings.max_eval_examples or caps[1])
    start = time.perf_counter()
    jobs = plan_jobs(model, tasks, settings, data_dir)
    results = _run_ray(jobs, settings) if use_ray else [run_job(job) for job in jobs]
    rows = [row for r in results for row in r.rows]
    notes = sorted({f"{r.task}: {r.note}" for r in rows if r.note})
    return EvalReport(rows, summarize(rows), results, settings, time.perf_counter() - start, notes)


def evaluate_model(model_path_or_preset: str, tasks, settings: EvalSettings | None = None,
                   data_dir: str | Path | None = None, use_ray: bool = False) -> list[ResultRow]:
    """The per-seed result rows of :func:`evaluate` (the sweep driver's entry point)."""
    return evaluate(model_path_or_preset, tasks, settings, data_dir, use_ray).rows


def metric_value(summary: list[SummaryRow], task: str, metric: str, model: str | None = None) -> float:
    """Mean over seeds of one metric (an objective for sweeps); task "glue" with metric "glue_average"
    gives the GLUE average."""
    if not (task == "glue" and metric == "glue_average"):
        check_metric(task, metric)
        task = canonical(task)
    for row in summary:
        if row.task == task and row.metric == metric and (model is None or row.model == model):
            return row.mean
    raise EvalConfigError(f"no result for {task}/{metric}{' of ' + model if model else ''}; "
                          f"evaluated: {sorted({(r.task, r.metric) for r in summary})}")

