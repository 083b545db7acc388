"""Search spaces: ``{config.path: {primitive: args}}`` in a sweep file -> Ray Tune domains, and a sampled
point back to config values.

Primitives are Tune's: ``choice``, ``grid``, ``uniform``, ``loguniform``, ``randint`` (high exclusive)
and ``quniform``. ``choice``/``grid`` also take a mapping ``{name: value}``: Tune then samples the *name*
(a plain string, which every search algorithm handles and every table shows) and the trial gets the
value, which may be structured (a layer alignment, a whole ``objectives`` section). Unnamed structured
values are named by their compact JSON."""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from raydistill.config import ExperimentConfig
from raydistill.errors import ConfigError

CATEGORICAL = ("choice", "grid")
NUMERIC = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3}
PRIMITIVES = CATEGORICAL + tuple(NUMERIC)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


@dataclass(frozen=True)
class Dimension:
    """One swept config path."""

    path: str
    kind: str
    args: tuple = ()  # numeric bounds
    names: tuple = ()  # categorical: what Tune samples
    values: tuple = ()  # categorical: what the config gets, aligned with names

    def tune_domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.names))
        if self.kind == "choice":
            return tune.choice(list(self.names))
        return getattr(tune, self.kind)(*self.args)

    def config_value(self, sampled: Any) -> Any:
        """The config value for what Tune sampled (a name for categorical dimensions)."""
        if self.kind in CATEGORICAL:
            for name, value in zip(self.names, self.values):
                if name == sampled:
                    return value
            raise ConfigError(f"space.{self.path}: sampled {sampled!r} is none of {list(self.names)}")
        return sampled

    @property
    def size(self) -> int | None:
        """Number of distinct values (None: continuous)."""
        if self.kind in CATEGORICAL:
            return len(self.names)
        if self.kind == "randint":
            return int(self.args[1] - self.args[0])
        return None


def parse_dimension(path: str, spec: Any) -> Dimension:
    where = f"space.{path}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in PRIMITIVES:
        raise ConfigError(f"{where}: expected one of {{{', '.join(f'{p}: ...' for p in PRIMITIVES)}}}, got "
                          f"{spec!r} (constants belong under 'set')")
    kind, args = next(iter(spec.items()))
    if kind in CATEGORICAL:
        if isinstance(args, dict):
            names, values = tuple(str(k) for k in args), tuple(args.values())
        elif isinstance(args, list):
            values = tuple(args)
            names = tuple(v if _scalar(v) else json.dumps(v, separators=(",", ":")) for v in values)
        else:
            raise ConfigError(f"{where}: {kind} takes a list of values or a mapping name -> value, got {args!r}")
        if not values:
            raise ConfigError(f"{where}: {kind} is empty; give at least one value")
        if len(set(map(repr, names))) != len(names):
            raise ConfigError(f"{where}: {kind} has repeated values {list(names)}")
        return Dimension(path, kind, names=names, values=values)
    n = NUMERIC[kind]
    if not isinstance(args, list) or len(args) != n or not all(isinstance(a, (int, float)) and not isinstance(
            a, bool) for a in args):
        shape = "[low, high, q]" if n == 3 else "[low, high]"
        raise ConfigError(f"{where}: {kind} takes {shape} numbers, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: randint takes integers [low, high) , got {args!r}")
    if kind == "quniform" and not (args[2] > 0 and math.isfinite(args[2])):
        raise ConfigError(f"{where}: quniform needs q > 0, got {args[2]}")
    if kind == "randint":
        args = [int(low), int(high)]
    return Dimension(path, kind, args=tuple(args))


def _models_in(annotation: Any) -> list[Any]:
    """The pydantic models, dicts and lists a field's annotation admits (through Optional/Union)."""
    args = typing.get_args(annotation)
    if args and typing.get_origin(annotation) not in (dict, list, tuple):
        return [m for a in args for m in _models_in(a)]
    return [annotation]


def check_config_path(path: str) -> None:
    """Raise ConfigError unless ``path`` names a field of the experiment config (free-form mappings such as
    ``teacher.config_overrides`` accept any key below them)."""
    model: Any = ExperimentConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config's top level"
            raise ConfigError(f"space.{path}: {'.'.join(parts[:i + 1])!r} is not a config field; allowed under "
                              f"{where}: {', '.join(sorted(fields))}")
        if i == len(parts) - 1:
            return
        kinds = _models_in(fields[part].annotation)
        sub = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if sub is None:
            if any(k is dict or typing.get_origin(k) is dict for k in kinds):
                return  # free-form mapping
            raise ConfigError(f"space.{path}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
        model = sub


def parse_space(space: dict[str, Any]) -> list[Dimension]:
    dims = []
    for path, spec in space.items():
        check_config_path(path)
        dims.append(parse_dimension(path, spec))
    paths = [d.path for d in dims]
    for a in paths:
        for b in paths:
            if b.startswith(a + "."):
                raise ConfigError(f"space: {a!r} and {b!r} overlap (one is inside the other)")
    return dims


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    return {d.path: d.tune_domain() for d in dims}


def trial_values(dims: list[Dimension], sampled: dict[str, Any]) -> dict[str, Any]:
    """Config path -> value for one trial, from Tune's sampled point."""
    return {d.path: d.config_value(sampled[d.path]) for d in dims if d.path in sampled}


def set_path(data: dict, path: str, value: Any) -> None:
    """Set a dotted path in a nested dict, creating sections; the value replaces what was there."""
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = node[k] = {}
        node = nxt
    node[keys[-1]] = json.loads(json.dumps(value))


def grid_size(dims: list[Dimension]) -> int:
    return math.prod(d.size for d in dims if d.kind == "grid")
