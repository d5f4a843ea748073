"""Run directories and their logs.

A run directory holds (all written atomically or row by row):

- ``config.json`` -- the algorithm name and its config, written once when the run starts;
- ``progress.csv`` -- one row per iteration: ``global_step``, ``episodic_return`` (mean raw
  return of the episodes finished in that iteration, empty if none), losses, ``approx_kl``,
  ``clip_frac``, ``lr``, ``steps_per_sec`` ...;
- ``checkpoint.pt`` -- the latest checkpoint (:mod:`metagrad_rl.checkpoint`);
- ``summary.json`` -- final numbers, written when the run finishes.

TensorBoard is not used: it would add a large dependency for scalars that ``progress.csv`` and
``metagrad-rl plot`` already show. The CSV is the source of truth.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from metagrad_rl.checkpoint import CsvLog, atomic_write_json
from metagrad_rl.errors import ConfigError

CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress.csv"
CHECKPOINT_FILE = "checkpoint.pt"
SUMMARY_FILE = "summary.json"


def check_writable_dir(out: str | Path) -> Path:
    """Creates ``out`` if needed and proves it writable, or raises a one-line ConfigError.

    Nothing is left behind on failure except directories that ``mkdir -p`` created.
    """
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(
            f"output directory {str(p)!r} cannot be written ({reason}): expected a writable "
            "directory path"
        ) from err
    return p


def prepare_run_dir(out: str | Path, resume: bool) -> Path:
    """Checks ``out`` before any work: writable, and holding a run exactly when resuming."""
    p = Path(out)
    if resume:
        if not (p / CHECKPOINT_FILE).is_file():
            raise ConfigError(
                f"cannot resume: {str(p / CHECKPOINT_FILE)!r} does not exist: expected the --out "
                "directory of an earlier run"
            )
        return check_writable_dir(p)
    if (p / CHECKPOINT_FILE).exists() or (p / PROGRESS_FILE).exists():
        raise ConfigError(
            f"output directory {str(p)!r} already holds a run: pass --resume to continue it or "
            "choose another --out"
        )
    return check_writable_dir(p)


def clear_run_dir(out: str | Path) -> None:
    """Removes an earlier run's files from ``out`` (``train --overwrite``); keeps other files."""
    p = Path(out)
    for name in (CHECKPOINT_FILE, PROGRESS_FILE, SUMMARY_FILE, CONFIG_FILE):
        (p / name).unlink(missing_ok=True)


def write_run_config(run_dir: Path, algo: str, config: dict[str, Any]) -> None:
    atomic_write_json(run_dir / CONFIG_FILE, {"algo": algo, "config": config})


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / CONFIG_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"run directory {str(run_dir)!r} has no readable {CONFIG_FILE}: expected the --out "
            "directory of a `metagrad-rl train` run"
        ) from err


class RunLogger:
    """Appends one whole CSV row per iteration to ``progress.csv`` and times steps/s."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.csv = CsvLog(run_dir / PROGRESS_FILE, keep_until_step=resume_step)
        self._t = time.perf_counter()
        self.start = self._t

    def log(self, global_step: int, steps: int, row: dict[str, Any]) -> dict[str, Any]:
        """Logs ``row`` with ``global_step`` and ``steps_per_sec`` over the last ``steps`` steps."""
        now = time.perf_counter()
        sps = steps / max(now - self._t, 1e-9)
        self._t = now
        full = {"global_step": global_step, **row, "steps_per_sec": sps}
        self.csv.append(full)
        return full

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
