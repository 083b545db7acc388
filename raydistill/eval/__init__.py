"""Downstream benchmarks for teachers and students: GLUE, SQuAD v1.1, CoNLL-2003 NER, perplexity, and
built-in offline tasks derived from the built-in corpus.

Python API (what training and sweeps call)::

    from raydistill.eval import EvalSettings, evaluate_model
    rows = evaluate_model("out/student", "quick", EvalSettings(seeds=(0, 1)), data_dir="../shared/data")

Attributes are imported lazily so that ``raydistill --help`` does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "raydistill.eval.runner", "evaluate_model": "raydistill.eval.runner",
    "metric_value": "raydistill.eval.runner", "EvalReport": "raydistill.eval.runner",
    "EvalSettings": "raydistill.eval.settings", "ResultRow": "raydistill.eval.results",
    "SummaryRow": "raydistill.eval.results", "summarize": "raydistill.eval.results",
    "write_results": "raydistill.eval.results", "TASKS": "raydistill.eval.tasks", "SUITES": "raydistill.eval.tasks",
    "resolve_tasks": "raydistill.eval.tasks", "eval_command": "raydistill.eval.cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raydistill.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
