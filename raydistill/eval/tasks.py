"""The benchmark tasks, their official metrics and the named suites.

How each task applies to a decoder (causal LM) student: sequence tasks use the hidden state of the last
real token (``*ForSequenceClassification`` of GPT-2/Llama); NER tags every word from the hidden state of
its first sub-token, which has seen only the words to its left; SQuAD puts the question before the context
so every context token has seen the question; perplexity is next-token perplexity. Encoders use the usual
[CLS]/first-sub-token heads and masked-token perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass

from raydistill.eval.errors import EvalConfigError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification", "regression", "ner", "qa", "perplexity"
    metrics: tuple[str, ...]  # the official metrics, reported in this order
    num_labels: int = 0
    glue: bool = False  # counts in the GLUE average
    description: str = ""

    @property
    def reported(self) -> tuple[str, ...]:
        """Every metric reported for this task: its own, and ``glue_score`` (the mean of them) for a GLUE
        task with more than one."""
        return self.metrics + (("glue_score",) if self.glue and len(self.metrics) > 1 else ())


_GLUE = [
    TaskSpec("sst2", "classification", ("accuracy",), 2, True, "SST-2 sentiment"),
    TaskSpec("mrpc", "classification", ("f1", "accuracy"), 2, True, "MRPC paraphrase"),
    TaskSpec("cola", "classification", ("matthews_corr",), 2, True, "CoLA acceptability"),
    TaskSpec("stsb", "regression", ("pearson", "spearman"), 1, True, "STS-B similarity (0-5)"),
    TaskSpec("rte", "classification", ("accuracy",), 2, True, "RTE entailment"),
    TaskSpec("qnli", "classification", ("accuracy",), 2, True, "QNLI question entailment"),
    TaskSpec("mnli", "classification", ("accuracy",), 3, True, "MNLI entailment (matched dev)"),
    TaskSpec("qqp", "classification", ("f1", "accuracy"), 2, True, "QQP duplicate questions"),
]
_OTHER = [
    TaskSpec("squad", "qa", ("exact_match", "f1"), description="SQuAD v1.1 span extraction"),
    TaskSpec("conll2003", "ner", ("entity_f1", "entity_precision", "entity_recall"),
             description="CoNLL-2003 English NER (entity-level, IOB2)"),
    TaskSpec("wikitext2", "perplexity", ("perplexity",), description="WikiText-2 test perplexity"),
    TaskSpec("builtin-cola", "classification", ("accuracy", "matthews_corr"), 2,
             description="built-in corpus: subject-verb agreement acceptability"),
    TaskSpec("builtin-ner", "ner", ("entity_f1", "entity_precision", "entity_recall"),
             description="built-in corpus: PER/ORG/LOC/MISC NER"),
    TaskSpec("builtin-qa", "qa", ("exact_match", "f1"), description="built-in corpus: extractive QA on facts"),
    TaskSpec("builtin-ppl", "perplexity", ("perplexity",), description="built-in corpus: held-out perplexity"),
]
TASKS: dict[str, TaskSpec] = {t.name: t for t in _GLUE + _OTHER}
GLUE_TASKS = tuple(t.name for t in _GLUE)

SUITES: dict[str, tuple[str, ...]] = {
    "builtin": ("builtin-cola", "builtin-ner", "builtin-qa", "builtin-ppl"),
    "quick": ("sst2", "conll2003", "squad", "wikitext2"),
    "glue": GLUE_TASKS,
    "paper": GLUE_TASKS + ("squad", "conll2003", "wikitext2"),
}

# Example caps (fine-tune, evaluate) per task that a suite applies when the settings leave them unset, so
# "quick" stays a few minutes on a laptop CPU; name the tasks instead of the suite to run them uncapped.
SUITE_CAPS: dict[str, tuple[int, int]] = {"quick": (4000, 2000)}

# Spellings users type ("SST-2", "STS-B", "conll", "ppl") mapped to the canonical task names.
_ALIASES = {"conll": "conll2003", "conll-2003": "conll2003", "squad-v1.1": "squad", "squad1.1": "squad",
            "wikitext": "wikitext2", "wikitext-2": "wikitext2", "ppl": "wikitext2", "perplexity": "wikitext2",
            "mnli-m": "mnli"}


def canonical(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS and key.replace("-", "") in TASKS:  # SST-2, STS-B
        key = key.replace("-", "")
    return key


def resolve_tasks(suite: str | list[str] | tuple[str, ...]) -> list[TaskSpec]:
    """Task specs from a comma-separated list of task and suite names (duplicates dropped, order kept)."""
    names = suite.split(",") if isinstance(suite, str) else list(suite)
    out: dict[str, TaskSpec] = {}
    for raw in names:
        if not raw.strip():
            continue
        key = raw.strip().lower()
        if key in SUITES:
            for name in SUITES[key]:
                out.setdefault(name, TASKS[name])
            continue
        key = canonical(raw)
        if key not in TASKS:
            raise EvalConfigError(f"unknown task or suite {raw.strip()!r}; tasks: {', '.join(TASKS)}; "
                                  f"suites: {', '.join(SUITES)}")
        out.setdefault(key, TASKS[key])
    if not out:
        raise EvalConfigError("no task given; name tasks or a suite, e.g. --suite builtin or --suite sst2,squad")
    return list(out.values())


def check_metric(task: str, metric: str) -> None:
    spec = TASKS.get(canonical(task))
    if spec is None:
        raise EvalConfigError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    allowed = spec.reported
    if metric not in allowed:
        raise EvalConfigError(f"task {spec.name} has no metric {metric!r}; allowed: {', '.join(allowed)}")


def suite_caps(suite: str | list[str] | tuple[str, ...]) -> tuple[int, int] | None:
    """The example caps of the first capped suite named in ``suite``, if any."""
    names = suite.split(",") if isinstance(suite, str) else list(suite)
    for raw in names:
        if raw.strip().lower() in SUITE_CAPS:
            return SUITE_CAPS[raw.strip().lower()]
    return None


def parse_objective(text: str) -> tuple[str, str]:
    """``TASK:METRIC`` (or ``glue:glue_average``), validated."""
    task, sep, metric = text.partition(":")
    if not sep or not task or not metric:
        raise EvalConfigError(f"objective {text!r}: expected TASK:METRIC, e.g. sst2:accuracy or glue:glue_average")
    if (task.strip().lower(), metric.strip()) == ("glue", "glue_average"):
        return "glue", "glue_average"
    check_metric(task, metric.strip())
    return canonical(task), metric.strip()
