"""Config dataclasses: field docstrings, validation helpers and plain-dict round trips.

Every config is a dataclass with a docstring under each field (as CleanRL's ``Args``). The CLI
reads those docstrings as ``--help`` text with :func:`field_docs`, so the docstring is the one
place a hyperparameter is described.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from functools import cache
from typing import Any

from metagrad_rl.errors import ConfigError


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each field of ``cls`` and bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # pragma: no cover - source unavailable
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config (tuples become lists)."""
    out = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Builds ``cls`` from :func:`to_dict` output (unknown keys are an error); validates it."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(
            f"unknown settings {flags} for {cls.__name__}: expected flags of "
            f"`metagrad-rl train --algo ... --help`"
        )
    return cls(**check_types(cls, data))


def check_types(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``data`` with each value checked against the type of its field of ``cls``.

    Ints, floats, bools, strings and tuples of ints (``hidden``) are checked exactly as a
    TOML or JSON file or a flag would give them: a bool is not an int, a string is not a
    bool, ``64`` is not a tuple; an int is accepted for a float (and becomes one) and a list
    of ints for a tuple. A wrong type is one :class:`ConfigError` naming the key, the value
    and the expected type (``where`` says which file). Keys that are not fields pass through.
    """
    hints = _field_types(cls)
    out = {}
    for k, v in data.items():
        kind = hints.get(k)
        out[k] = v if kind is None else _checked(k, v, kind, where)
    return out


def check_fields(config: Any) -> None:
    """Checks (and normalises, as :func:`check_types`) every field of a config in place."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for k, v in check_types(type(config), values).items():
        if v is not values[k]:
            setattr(config, k, v)


@cache
def _field_types(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


#: What each field type accepts, as a message says it.
_EXPECTED = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}


def _checked(key: str, value: Any, kind: Any, where: str) -> Any:
    """``value`` as a ``kind`` (int -> float, list -> tuple), or a one-line ConfigError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple and args[1:] == (Ellipsis,) and args[0] is int:
        if isinstance(value, list | tuple) and all(_is_int(x) for x in value):
            return tuple(value)
        expected = "a list of integers, e.g. [64, 64]"
    elif kind is bool:
        if isinstance(value, bool):
            return value
        expected = _EXPECTED[bool]
    elif kind is int:
        if _is_int(value):
            return value
        expected = _EXPECTED[int]
    elif kind is float:
        if _is_int(value) or isinstance(value, float):
            return float(value)
        expected = _EXPECTED[float]
    elif kind is str:
        if isinstance(value, str):
            return value
        expected = _EXPECTED[str]
    else:  # a type this checker does not know: the config's own validation judges it
        return value
    raise ConfigError(f"{where}{key}={value!r} is {_kind_of(value)}: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind_of(value: Any) -> str:
    names = {bool: "a bool", int: "an integer", float: "a float", str: "a string"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def read_config_file(path: str) -> tuple[str | None, dict[str, Any]]:
    """``(algo, {field: value})`` from a TOML or JSON file (``train --config FILE``).

    Keys are the CLI's flag names (``total-steps`` or ``total_steps``); an ``algo`` key picks
    the algorithm. A run's ``config.json`` (``{"algo": ..., "config": {...}}``) is accepted as
    it is. Values are validated by the config dataclass like the flags are.
    """
    import json
    import tomllib
    from pathlib import Path

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(
            f"--config {path!r} cannot be read ({err.strerror or type(err).__name__}): "
            "expected a TOML or JSON file"
        ) from err
    try:
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except ValueError as err:
        kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
        msg = " ".join(str(err).split())
        raise ConfigError(f"--config {path!r} is not valid {kind} ({msg})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} holds a {type(data).__name__}: expected a table")
    if isinstance(data.get("config"), dict):  # a run's config.json
        data = {**data["config"], "algo": data.get("algo")}
    fields = {str(k).replace("-", "_"): v for k, v in data.items()}
    algo = fields.pop("algo", None)
    return (None if algo is None else str(algo)), fields


# -- validation helpers: each raises a one-line ConfigError naming the field and the value ------
def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid: expected a positive integer")


def nonnegative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}={value!r} is invalid: expected an integer >= 0")


def positive_float(name: str, value: Any) -> None:
    if not _real(value) or not value > 0:
        raise ConfigError(f"{name}={value!r} is invalid: expected a positive finite number")


def nonnegative_float(name: str, value: Any) -> None:
    if not _real(value) or value < 0:
        raise ConfigError(f"{name}={value!r} is invalid: expected a finite number >= 0")


def unit_interval(name: str, value: Any) -> None:
    if not _real(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value!r} is invalid: expected a number in [0, 1]")


def torch_device(name: str, value: Any) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA only where torch has a CUDA device."""
    import re

    import torch

    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ConfigError(f"{name}={value!r} is invalid: expected cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{name}={value!r} is not available: torch {torch.__version__} sees no CUDA "
                "device here: expected cpu"
            )
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"{name}={value!r} is not available: {torch.cuda.device_count()} CUDA "
                f"device(s) here: expected cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )


def one_of(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is invalid: expected one of {', '.join(choices)}")


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
