"""Sweep files: a base experiment config, constants, a search space, and how Tune should run it.

Everything is validated here, on the driver, before Ray starts: the base config, that paths in the
space exist in the config schema, that primitives are well formed, the benchmark tasks, and that the
metric is one the trials will report. A value inside the space is only checked when its trial starts (a
bad one fails that trial, not the sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from raydistill.config import (ExperimentConfig, Strict, apply_overrides, check_run_name, load_yaml, validate_config,
                               yaml_dump)
from raydistill.errors import ConfigError
from raydistill.ranking import checked_mode
from raydistill.sweep.space import Dimension, parse_space, set_path

TRAIN_METRICS = ("loss", "lr", "tokens_per_s", "step_time_s", "step")
VAL_METRICS = ("val/loss", "val/ce", "val/ppl")


class SearchSpec(Strict):
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: Tune's basic variant generator (also expands grid entries); grid: "
        "every grid combination once, num_samples times; optuna: TPE (pip install 'raydistill[optuna]')")
    seed: int | None = Field(0, description="seed of the sampler (null: nondeterministic)")


class SchedulerSpec(Strict):
    kind: Literal["fifo", "asha", "median"] = "fifo"
    metric: str | None = Field(None, description="metric the scheduler acts on (default: the sweep's metric); "
                               "use a validation loss when the sweep ranks by a benchmark score reported at the end")
    mode: Literal["min", "max"] | None = Field(None, description="default: the sweep's mode when the scheduler "
                                               "acts on the sweep's metric, else its metric's direction")
    grace_period: int = Field(1, ge=1, description="steps (time_attr units) before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA")
    max_t: int | None = Field(None, ge=1, description="ASHA: default train.max_steps of the base config")


class EvalSpec(Strict):
    tasks: str | list[str] | None = Field("builtin", description="benchmark tasks/suites scored at the end of "
                                          "each trial (see raydistill eval); null: none")
    data_dir: str | None = Field(None, description="benchmark data directory (GLUE, SQuAD, CoNLL-2003 files)")
    settings: dict[str, Any] = Field(default_factory=dict, description="raydistill.eval.EvalSettings fields")
    teacher: bool = Field(True, description="also score the teacher once per sweep on the same tasks and "
                          "settings (STORAGE/NAME/teacher/bench.json, reused by --resume): the report's teacher "
                          "row and teacher-baseline gap; a randomly initialised preset teacher is not scored")


def _on_off(v: Any) -> Any:
    """``true`` turns a tracker on with its defaults, ``false``/``null`` leaves it off."""
    if v is True:
        return {}
    if v is False:
        return None
    return v


class MlflowSpec(Strict):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (file:///path, http://host:5000, "
                                     "databricks); default: MLFLOW_TRACKING_URI, else MLflow's own default")
    experiment: str | None = Field(None, description="experiment name; default: MLFLOW_EXPERIMENT_NAME, else "
                                   "the sweep's name")
    tags: dict[str, str] = Field(default_factory=dict, description="tags on every trial's run")
    save_artifact: bool = Field(False, description="upload each trial's directory as the run's artifacts")


class WandbSpec(Strict):
    project: str | None = Field(None, description="W&B project; default: WANDB_PROJECT, else the sweep's name")
    entity: str | None = Field(None, description="W&B entity (team or user); default: WANDB_ENTITY")
    group: str | None = Field(None, description="run group; default: WANDB_RUN_GROUP, else the sweep's name")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="default: WANDB_MODE, else online; offline writes runs under dir for `wandb sync`")
    dir: str | None = Field(None, description="where W&B writes its files (default: WANDB_DIR, else ./wandb)")
    tags: list[str] = Field(default_factory=list)
    api_key_file: str | None = Field(None, description="default: WANDB_API_KEY or `wandb login` (not needed "
                                     "offline)")


class CallbacksSpec(Strict):
    tensorboard: bool = Field(True, description="Ray Tune's TBXLoggerCallback: event files of the reported "
                              "results in each trial's directory (every run also writes tensorboard/ per logged "
                              "step)")
    mlflow: MlflowSpec | None = Field(None, description="Ray Tune's MLflowLoggerCallback: one MLflow run per "
                                      "trial (true: defaults)")
    wandb: WandbSpec | None = Field(None, description="Ray Tune's WandbLoggerCallback: one W&B run per trial "
                                    "(true: defaults)")

    @field_validator("mlflow", "wandb", mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:
        return _on_off(v)


class SweepSpec(Strict):
    error_title: ClassVar[str] = "invalid sweep file"
    name: str = Field(..., description="sweep name: a directory under storage_path")
    base: str | dict[str, Any] = Field(..., description="experiment config: a path (relative to the sweep "
                                       "file) or an inline mapping")
    set: dict[str, Any] = Field(default_factory=dict, description="config path -> value for every trial")
    space: dict[str, Any] = Field(default_factory=dict, description="config path -> {primitive: args}")
    num_samples: int = Field(1, ge=1, description="samples of the space (each grid combination is repeated)")
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: str = Field("val/loss", description="what ranks trials: a reported metric, e.g. val/loss, val/ppl, "
                        "bench/builtin-cola/accuracy, bench/glue/glue_average")
    mode: Literal["min", "max"] | None = Field(None, description="min or max; default: the metric's direction "
                                               "(loss, perplexity: min; accuracy, F1, ...: max)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster's CPUs "
                                              "(GPUs) allow given each trial's workers")
    max_failures: int = Field(0, ge=0, description="retries of a failed trial; failures never stop the sweep")
    storage_path: str = Field("runs/sweeps", description="local directory, or s3://... / gs://... (passed to Ray)")
    driver_cpus: float = Field(0.01, gt=0, description="CPUs reserved by each trial's driver (its workers "
                               "reserve their own)")
    eval: EvalSpec = Field(default_factory=EvalSpec)
    export_best: bool = Field(True, description="copy the best trial's student to STORAGE/NAME/best_student")
    status_every_s: float = Field(10.0, gt=0, description="seconds between live trial tables")
    callbacks: CallbacksSpec = Field(default_factory=CallbacksSpec, description="experiment trackers fed by "
                                     "Ray Tune: tensorboard, mlflow, wandb")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_run_name(v)

    @model_validator(mode="after")
    def _grid(self):
        if self.search.algorithm == "optuna" and any(
                isinstance(v, dict) and "grid" in v for v in self.space.values()):
            raise ValueError("search.algorithm optuna cannot expand grid entries (Ray's OptunaSearch refuses "
                             "grid_search); use choice, or algorithm random/grid")
        return self


class Sweep:
    """A validated sweep: the spec, the resolved base config (plain data) and the parsed space."""

    def __init__(self, spec: SweepSpec, base: dict[str, Any], dims: list[Dimension], source: str | None):
        self.spec, self.base, self.dims, self.source = spec, base, dims, source

    @property
    def dir(self) -> str:
        """Where Tune keeps the experiment (and raydistill its tables); a URI's query string (S3 options) stays
        at the end."""
        base, sep, query = self.spec.storage_path.partition("?")
        return f"{base.rstrip('/')}/{self.spec.name}{sep}{query}"

    @property
    def is_local(self) -> bool:
        return "://" not in self.spec.storage_path

    def trial_config(self, values: dict[str, Any], output_dir: str, name: str) -> ExperimentConfig:
        data = apply_overrides(self.base, [])
        for path, value in values.items():
            set_path(data, path, value)
        data.update(output_dir=output_dir, name=name)
        return self._shared_storage(validate_config(data))

    def base_config(self) -> ExperimentConfig:
        return self._shared_storage(validate_config(self.base))

    def _shared_storage(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """A sweep's teacher cache lives in its storage by default (STORAGE/NAME/teacher_cache): every trial, on
        any node, reads what the sweep's driver filled."""
        if cfg.teacher_cache is not None and cfg.teacher_cache.uri is None:
            base, sep, query = self.dir.partition("?")
            cfg.teacher_cache.uri = f"{base}/teacher_cache{sep}{query}"
        return cfg

    def to_yaml(self) -> str:
        """The sweep with its base inlined, so a resume does not depend on files that may have changed."""
        dump = self.spec.model_dump(mode="json")
        dump["base"] = self.base
        dump["set"] = {}
        return yaml_dump(dump)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def apply_space_overrides(raw: dict, overrides: list[str]) -> dict:
    """Sweep-file overrides. ``space.<config path>=...`` adds or replaces one search dimension (the rest of
    the key is the config path, dots included: ``space.train.lr='{loguniform: [1e-4, 1e-2]}'``); ``null``
    removes it. Every other key addresses the sweep file like a config override (``set.train.lr=1e-4``)."""
    from raydistill.config import parse_override

    plain = []
    raw = apply_overrides(raw, [])  # a copy
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] not in SweepSpec.model_fields:
            hint = ""
            if keys[0] in ExperimentConfig.model_fields:
                hint = (f"; {keys[0]!r} is an experiment config key: set it for every trial with "
                        f"set.{item} or search it with space.{item.split('=', 1)[0]}='{{choice: [...]}}'")
            raise ConfigError(f"override {item!r}: {keys[0]!r} is not a sweep file key; allowed: "
                              f"{', '.join(sorted(SweepSpec.model_fields))}{hint}")
        if keys[0] != "space" or len(keys) == 1:
            plain.append(item)
            continue
        space = raw.get("space")
        if space is None:
            space = raw["space"] = {}
        if not isinstance(space, dict):
            raise ConfigError(f"override {item!r}: the sweep's space is {space!r}, not a mapping")
        path = ".".join(keys[1:])
        if value is None:
            space.pop(path, None)
        else:
            space[path] = value
    return apply_overrides(raw, plain)


def load_sweep(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
               data: dict | None = None) -> Sweep:
    """Load, override and validate a sweep file (or ``data``)."""
    raw = load_yaml(path) if data is None else data
    raw = apply_space_overrides(raw, list(overrides))
    spec = validate_config(raw, SweepSpec)
    if "://" not in spec.storage_path:  # Tune and every trial must agree on one absolute directory
        spec.storage_path = str(Path(spec.storage_path).expanduser().resolve())
    if isinstance(spec.base, str):
        base_path = Path(spec.base).expanduser()
        if not base_path.is_absolute() and path is not None:
            base_path = Path(path).parent / base_path
        try:
            base = load_yaml(base_path)
        except ConfigError as e:
            raise ConfigError(f"base {spec.base!r}: {e}") from None
    else:
        base = spec.base
    constants: dict[str, Any] = {}
    if spec.set:
        _flatten("", spec.set, constants)
    base = apply_overrides(base, [])
    for p, v in constants.items():
        set_path(base, p, v)
    try:
        cfg = validate_config(base)
    except ConfigError as e:
        raise ConfigError(f"sweep base config: {e}") from None
    # Paths in the base resolve against the caller's directory, not the trial's.
    base = cfg.model_dump(mode="json")
    base["output_dir"] = str(Path(cfg.output_dir).expanduser().resolve())
    base["cache_dir"] = str(Path(cfg.cache_dir).expanduser().resolve())
    dims = parse_space(spec.space)
    sweep = Sweep(spec, base, dims, None if path is None else str(path))
    _check_eval(spec.eval)
    _check_callbacks(spec.callbacks)
    check_metric(sweep, spec.metric, "metric")
    if spec.scheduler.metric:
        check_metric(sweep, spec.scheduler.metric, "scheduler.metric")
    _resolve_modes(spec)
    return sweep


def _resolve_modes(spec: SweepSpec) -> None:
    """Every mode set to the direction its metric improves in (``raydistill.ranking``): a scheduler
    on another metric than the sweep's never borrows the sweep's mode."""
    spec.mode = checked_mode(spec.metric, spec.mode, "mode")
    s = spec.scheduler
    if s.metric and s.metric != spec.metric:
        s.mode = checked_mode(s.metric, s.mode, "scheduler.mode")
    elif s.mode not in (None, spec.mode):
        raise ConfigError(f"scheduler.mode {s.mode!r}: the scheduler acts on the sweep's metric {spec.metric!r}, "
                          f"ranked {spec.mode!r}; allowed: {spec.mode} (or leave scheduler.mode out)")
    else:
        s.mode = spec.mode


def _possible_objectives(sweep: Sweep) -> set[str]:
    """Objectives active in the base or in any categorical value of the space."""
    from raydistill.objectives import REGISTRY

    names = {k for k, v in (sweep.base.get("objectives") or {}).items() if v is not None}
    for d in sweep.dims:
        if d.path == "objectives":
            for value in d.values:
                names |= {k for k, v in (value or {}).items() if v is not None}
        elif d.path.startswith("objectives."):
            names.add(d.path.split(".")[1])
    return names & set(REGISTRY)


def reported_metric_names(sweep: Sweep) -> tuple[set[str], tuple[str, ...]]:
    """(exact names, prefixes) of the metrics trials can report."""
    exact = set(TRAIN_METRICS) | set(VAL_METRICS)
    prefixes = []
    for name in _possible_objectives(sweep):
        exact |= {name, f"val/{name}"}
        prefixes += [f"{name}/", f"val/{name}/"]
    if {"iit", "iit_cosine"} & _possible_objectives(sweep):
        prefixes.append("val/iia")
    prefixes.append("val/rouge")  # generation metrics, when configured
    tasks = sweep.spec.eval.tasks
    if tasks:
        from raydistill.eval.tasks import GLUE_TASKS, resolve_tasks

        specs = resolve_tasks(tasks)
        for t in specs:
            exact |= {f"bench/{t.name}/{m}" for m in t.reported}
        if any(t.name in GLUE_TASKS for t in specs):
            exact.add("bench/glue/glue_average")
    return exact, tuple(prefixes)


def check_metric(sweep: Sweep, metric: str, field: str) -> None:
    exact, prefixes = reported_metric_names(sweep)
    if metric in exact or metric.startswith(prefixes):
        return
    shown = sorted(m for m in exact if m not in TRAIN_METRICS[1:])
    raise ConfigError(f"{field} {metric!r} is never reported by these trials; allowed: {', '.join(shown)} "
                      f"(or names under {', '.join(prefixes)})")


def _check_callbacks(spec: CallbacksSpec) -> None:
    """A tracker the sweep file turns on must be installed: said before Ray starts, not when Tune builds it."""
    import importlib.util

    for field, package in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if getattr(spec, field) is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(f"callbacks.{field} needs the {package} package, which is not installed: "
                              f"pip install {package} (or remove callbacks.{field})")


def _check_eval(spec: EvalSpec) -> None:
    from raydistill.eval.settings import EvalSettings

    if spec.tasks:
        from raydistill.eval.tasks import resolve_tasks

        try:
            resolve_tasks(spec.tasks)
        except ConfigError as e:
            raise ConfigError(f"eval.tasks {spec.tasks!r}: {e}") from None
    try:
        EvalSettings(**spec.settings)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"eval.settings {spec.settings}: {e}") from None
