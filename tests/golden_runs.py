"""Short fixed-seed training runs whose ``progress.csv`` and final parameters are pinned.

Each run is one ``metagrad-rl train`` command on Hopper-v5 with a 64-step rollout and four
iterations (a few seconds). :func:`record` writes, per run, ``tests/golden/<name>/progress.csv``
without the wall-clock column ``steps_per_sec`` and ``params.txt``: one ``sha256`` per tensor of
the final ``theta``, ``eta`` and critics in ``checkpoint.pt``. ``tests/test_golden.py`` re-runs
them and compares both as strings, so a refactor that changes any bit of the training fails.

Regenerate (only for a deliberate change of behaviour, documented in the commit and a test)::

    .venv/bin/python tests/golden_runs.py            # every run
    .venv/bin/python tests/golden_runs.py ppo lirpg  # some

The values are this machine's CPU build of torch 2.13.0; another CPU or BLAS may differ in the
last digits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden"
#: Columns that measure the wall clock, not the training.
WALL_CLOCK = ("steps_per_sec",)
BASE = (
    "--env Hopper-v5 --num-steps 64 --num-minibatches 4 --update-epochs 2 "
    "--total-steps 256 --seed 1 --no-progress"
).split()
RUNS: dict[str, str] = {
    "ppo": "--algo ppo",
    "cln-eq17": "--algo cln --meta-grad eq17",
    "cln-exact": "--algo cln --meta-grad exact",
    "lirpg": "--algo lirpg --ent-coef 0.01",
    "cln-exact-2workers": "--algo cln --meta-grad exact --nproc 2 --parallel allreduce",
    "cln-eq17-2workers": "--algo cln --meta-grad eq17 --nproc 2 --parallel allreduce",
    "ppo-2rollout": "--algo ppo --nproc 2 --parallel rollout",
    "cln-eq17-2rollout": "--algo cln --meta-grad eq17 --nproc 2 --parallel rollout",
    "cln-three-term": "--algo cln --meta-grad three-term",
    "cln-sampling-aware-2envs": "--algo cln --meta-grad sampling-aware --num-envs 2",
    "lirpg-dice": "--algo lirpg --meta-grad dice",
    "cln-truncated-k8": "--algo cln --meta-grad truncated-k8",
    "cln-exact-r3": "--algo cln --meta-grad exact-r3",
    "cln-terms-eq12+eq13": "--algo cln --meta-grad terms-eq12+eq13",
}


def train(name: str, out: Path) -> None:
    """Runs ``RUNS[name]`` into ``out`` in a fresh interpreter (nothing shared with the caller)."""
    cmd = [sys.executable, "-m", "metagrad_rl", "train", *BASE, *RUNS[name].split()]
    cmd += ["--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"


def progress_without_wall_clock(run_dir: Path) -> str:
    """``progress.csv`` as text with the :data:`WALL_CLOCK` columns left out."""
    with open(run_dir / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k not in WALL_CLOCK]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def parameter_digests(run_dir: Path) -> str:
    """One line ``<group>/<name> <sha256 of the tensor's bytes>`` per final parameter."""
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    lines = []
    for group in ("theta", "eta", "critics"):
        flat: dict[str, torch.Tensor] = {}
        _flatten(ckpt.get(group) or {}, group, flat)
        for key in sorted(flat):
            data = flat[key].detach().contiguous().cpu().numpy().tobytes()
            lines.append(f"{key} {hashlib.sha256(data).hexdigest()}")
    return "\n".join(lines) + "\n"


def _flatten(tree: object, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(v, f"{prefix}/{k}", out)


def record(names: list[str], scratch: Path) -> None:
    for name in names:
        run_dir = scratch / name
        train(name, run_dir)
        dest = GOLDEN / name
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "progress.csv").write_text(progress_without_wall_clock(run_dir))
        (dest / "params.txt").write_text(parameter_digests(run_dir))
        print(f"recorded {dest}")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record(sys.argv[1:] or list(RUNS), Path(tmp))
