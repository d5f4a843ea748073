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
    kwargs = {}
    for k, v in data.items():
        default = names[k].default
        kwargs[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple) else v
    return cls(**kwargs)


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
