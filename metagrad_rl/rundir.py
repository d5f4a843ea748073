"""Run directories and their logs.

A run directory holds (all written atomically or row by row):

- ``config.json`` -- the algorithm name and its config, written once when the run starts;
- ``progress.csv`` -- one row per iteration: ``global_step``, ``episodic_return`` (mean raw
  return of the episodes finished in that iteration, empty if none), losses, ``approx_kl``,
  ``clip_frac``, ``lr``, ``steps_per_sec`` ...;
- ``checkpoint.pt`` -- the latest checkpoint (:mod:`metagrad_rl.checkpoint`);
- ``summary.json`` -- final numbers, written when the run finishes.

With ``train --tensorboard`` the same scalars also go to ``tensorboard/`` as TensorBoard events
(the optional ``tensorboard`` extra; not a core dependency). The CSV is always written and is
the source of truth.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metagrad_rl.checkpoint import atomic_write_bytes, atomic_write_json
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


RUN_FILES = (CONFIG_FILE, PROGRESS_FILE, CHECKPOINT_FILE, SUMMARY_FILE)
#: TensorBoard event files of ``train --tensorboard`` (a folder inside the run directory).
TENSORBOARD_DIR = "tensorboard"


def _is_our_temp(name: str) -> bool:
    """A temporary file of an atomic write (or the write probe) that a kill left behind."""
    if name.startswith(".write-probe."):
        return True
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


def check_run_dir(out: str | Path) -> Path:
    """Refuses ``--out ""`` and a directory holding files this tool did not write."""
    if not str(out).strip():
        raise ConfigError(
            "--out '' is invalid: expected a directory path for the run (e.g. runs/my-run)"
        )
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError(
            f"--out {str(p)!r} is a file: expected a directory path for the run (e.g. runs/my-run)"
        )
    if not p.is_dir():
        return p
    ours = {*RUN_FILES, TENSORBOARD_DIR}
    foreign = sorted(e.name for e in p.iterdir() if e.name not in ours and not _is_our_temp(e.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ConfigError(
            f"output directory {str(p)!r} holds files metagrad-rl did not write ({shown}): "
            "expected a new or empty directory, or the --out of an earlier run"
        )
    if (p / CONFIG_FILE).exists():
        try:
            cfg = json.loads((p / CONFIG_FILE).read_text())
            ok = isinstance(cfg, dict) and {"algo", "config"} <= set(cfg)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{str(p / CONFIG_FILE)!r} was not written by metagrad-rl: expected a new or "
                "empty directory, or the --out of an earlier run"
            )
    return p


def remove_stale_temps(run_dir: Path) -> list[str]:
    """Removes temporary files that a killed write left in ``run_dir``; returns their names."""
    gone = []
    for e in run_dir.iterdir():
        if e.is_file() and _is_our_temp(e.name):
            e.unlink(missing_ok=True)
            gone.append(e.name)
    return gone


def resume_checkpoint(out: str | Path) -> Path:
    """The checkpoint ``--resume`` continues from, or a one-line error saying what to do."""
    path = check_run_dir(out) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"cannot resume: {str(path)!r} does not exist: expected the --out directory of an "
            "earlier run (a run stopped before its first checkpoint is started again without "
            "--resume)"
        )
    return path


def prepare_run_dir(out: str | Path, resume: bool) -> Path:
    """Checks ``out`` before any work: writable, ours, and holding a run exactly when resuming.

    A directory whose run was killed before its first checkpoint (a ``config.json`` and maybe
    a ``progress.csv``, no ``checkpoint.pt``) is started afresh; stale temporary files of
    interrupted atomic writes are removed.
    """
    p = check_run_dir(out)
    if resume:
        resume_checkpoint(p)
    elif (p / CHECKPOINT_FILE).exists():
        raise ConfigError(
            f"output directory {str(p)!r} already holds a run: pass --resume to continue it or "
            "choose another --out"
        )
    elif p.is_dir():
        clear_run_dir(p)  # a run that stopped before its first checkpoint: start it again
    p = check_writable_dir(p)
    remove_stale_temps(p)
    return p


def clear_run_dir(out: str | Path) -> None:
    """Removes an earlier run's files from ``out`` (``train --overwrite``).

    Refuses (before deleting anything) a directory holding files this tool did not write.
    """
    p = check_run_dir(out)
    if not p.is_dir():
        return
    for name in RUN_FILES:
        (p / name).unlink(missing_ok=True)
    if (p / TENSORBOARD_DIR).is_dir():
        import shutil

        shutil.rmtree(p / TENSORBOARD_DIR)


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


class CsvLog:
    """An append-only CSV whose rows are written whole (one ``write`` + ``fsync`` per row).

    The header is fixed by the first row. Opening an existing log for a resumed run first
    drops rows past ``keep_until_step`` (written after the checkpoint being resumed), atomically.
    """

    def __init__(
        self, path: str | Path, step_key: str = "global_step", keep_until_step: int | None = None
    ) -> None:
        self.path = Path(path)
        self.step_key = step_key
        self.fields: list[str] | None = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
                fields = list(rows[0].keys()) if rows else None
            if fields and keep_until_step is not None:
                kept = [r for r in rows if int(float(r[step_key])) <= keep_until_step]
                atomic_write_bytes(self.path, _csv_text(fields, kept, header=True).encode())
            self.fields = fields

    def append(self, row: Mapping[str, Any]) -> None:
        header = self.fields is None
        if self.fields is None:
            self.fields = list(row.keys())
        text = _csv_text(self.fields, [row], header=header)
        with open(self.path, "a", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _csv_text(fields: Sequence[str], rows: Sequence[Mapping[str, Any]], header: bool) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    return buf.getvalue()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """All rows of a CSV log as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
