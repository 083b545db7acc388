"""Evaluation errors the user can fix; the CLI prints the message and exits non-zero."""

from raydistill.errors import ConfigError, RaydistillError


class EvalDataError(RaydistillError):
    """A benchmark data folder or file is missing or not in the expected format."""


class EvalConfigError(ConfigError):
    """An unknown task, suite or metric, or an invalid fine-tuning setting."""
