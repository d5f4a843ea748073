"""Atomic files: checkpoints and JSON results (``progress.csv``'s whole-row appends:
:class:`metagrad_rl.rundir.CsvLog`).

A file is either absent, its old version, or complete: writers go to a temporary file in the
same directory, ``fsync`` it and ``os.replace`` it over the target. Checkpoints hold tensors,
numbers, strings, lists and dicts only (RNG states as JSON strings, the config as a dict), so
they load with ``torch.load(weights_only=True)``, which never runs pickled code.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from metagrad_rl.errors import ConfigError

CHECKPOINT_FORMAT = 1


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers never see a partial file."""

    def write(f: IO[bytes]) -> None:
        f.write(data)

    _atomic_write(Path(path), write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Saves ``payload`` (tensors and plain data only) atomically with ``torch.save``."""
    full = {"format": CHECKPOINT_FORMAT, **payload}
    _atomic_write(Path(path), lambda f: torch.save(full, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint safely; a missing or corrupt file is a one-line :class:`ConfigError`."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(
            f"checkpoint {str(p)!r} is a directory: expected a checkpoint.pt file "
            f"(a run directory's is {str(p / 'checkpoint.pt')!r})"
        )
    if not p.is_file():
        raise ConfigError(f"checkpoint {str(p)!r} does not exist: expected a checkpoint.pt file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means the file is not ours or is damaged
        raise ConfigError(
            f"checkpoint {str(p)!r} is corrupt or not a metagrad_rl checkpoint "
            f"({load_failure_reason(err)})"
        ) from err
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint {str(p)!r} is not a metagrad_rl checkpoint: expected format "
            f"{CHECKPOINT_FORMAT}"
        )
    return obj


def load_failure_reason(err: BaseException, limit: int = 120) -> str:
    """The informative part of a ``torch.load`` error, whole words, at most ``limit`` chars.

    A ``weights_only`` failure begins with several sentences of advice; what went wrong is
    after ``WeightsUnpickler error:`` (e.g. ``Unsupported global: GLOBAL __main__.A``).
    """
    import re

    text = str(err).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.DOTALL)
    if found:
        text = found.group(1).strip()
    line = " ".join(text.splitlines()[0].split()) if text else type(err).__name__
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if len(line) <= limit:
        return line
    cut = line[: limit + 1].rsplit(" ", 1)[0].rstrip(" ,;:.")
    return cut + " ..."
