"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class RaydistillError(Exception):
    """Base of errors that are the user's to fix; the message says what and how."""


class ConfigError(RaydistillError):
    """A configuration value is wrong; raised on the driver before any cluster work starts."""
