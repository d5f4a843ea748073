"""The redesigned trainers reproduce the recorded runs bit for bit (``tests/golden_runs.py``).

Each run of :data:`golden_runs.RUNS` is trained afresh and its ``progress.csv`` (without the
wall-clock column) and final parameters' digests are compared with ``tests/golden/<name>/`` as
strings: ``rtol=0`` on every logged value and every bit of ``theta``, ``eta`` and the critics.
"""

from __future__ import annotations

import pytest
from golden_runs import GOLDEN, RUNS, parameter_digests, progress_without_wall_clock, train


@pytest.mark.parametrize("name", list(RUNS))
def test_run_reproduces_the_recorded_progress_and_parameters(name, tmp_path):
    run_dir = tmp_path / name
    train(name, run_dir)
    assert progress_without_wall_clock(run_dir) == (GOLDEN / name / "progress.csv").read_text()
    assert parameter_digests(run_dir) == (GOLDEN / name / "params.txt").read_text()


def test_every_recorded_run_is_still_a_run():
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(RUNS)
