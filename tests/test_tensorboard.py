"""`--tensorboard`: the CSV's scalars as TensorBoard events (optional extra; skipped if absent)."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from metagrad_rl.cli import main

HAVE_TB = importlib.util.find_spec("tensorboard") is not None
ARGS = ["--env", "InvertedPendulum-v5", "--num-steps", "64", "--num-minibatches", "2"]


@pytest.mark.skipif(HAVE_TB, reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_a_one_line_error(capsys, tmp_path):
    argv = ["train", *ARGS, "--tensorboard", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'metagrad_rl[tensorboard]'" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not HAVE_TB, reason="tensorboard (optional extra) is not installed")
def test_tensorboard_events_hold_the_csv_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    argv = ["train", "--algo", "cln", *ARGS, "--tensorboard", "--out", str(run), "--no-progress"]
    assert main([*argv, "--total-steps", "128"]) == 0
    assert main([*argv, "--total-steps", "192", "--resume"]) == 0
    with open(run / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("v_loss")
    assert [e.step for e in events] == [int(r["global_step"]) for r in rows]
    assert [e.value for e in events] == pytest.approx([float(r["v_loss"]) for r in rows], 1e-4)
    assert {"pg_loss", "approx_kl", "norm_applied", "intrinsic_reward_mean"} <= set(
        acc.Tags()["scalars"]
    )
