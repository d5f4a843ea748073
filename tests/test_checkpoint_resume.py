"""Atomic files, safe loading, and resume == an uninterrupted run."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from metagrad_rl.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from metagrad_rl.errors import ConfigError
from metagrad_rl.rundir import CsvLog
from metagrad_rl.trainers.ppo import PPOConfig, train


def test_atomic_write_leaves_old_file_and_no_temp_on_failure(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_bytes(p, b"old")

    class Boom(Exception):
        pass

    def bad_write(_f):
        raise Boom

    from metagrad_rl import checkpoint as ck

    with pytest.raises(Boom):
        ck._atomic_write(p, bad_write)
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.json"]


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    payload = {"t": torch.arange(3.0), "cfg": {"lr": 3e-4, "hidden": [64, 64]}, "s": "x", "n": None}
    save_checkpoint(tmp_path / "c.pt", payload)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["cfg"] == payload["cfg"]
    got = load_checkpoint(tmp_path / "c.pt")
    torch.testing.assert_close(got["t"], payload["t"])


def test_missing_and_corrupt_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConfigError, match="corrupt") as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value)
    torch.save({"no": "format"}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a metagrad_rl checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_csv_log_rows_are_whole_and_resume_drops_later_rows(tmp_path):
    p = tmp_path / "progress.csv"
    log = CsvLog(p)
    for s in (10, 20, 30):
        log.append({"global_step": s, "x": s / 10})
    CsvLog(p, keep_until_step=20).append({"global_step": 30, "x": 9.0})
    rows = list(csv.DictReader(open(p)))
    assert [(r["global_step"], r["x"]) for r in rows] == [("10", "1"), ("20", "2"), ("30", "9")]


def _tiny(**kw):
    base = dict(
        env="Hopper-v5",
        total_steps=3 * 64,
        num_steps=64,
        num_minibatches=4,
        update_epochs=2,
        seed=5,
        checkpoint_every=1,
    )
    base.update(kw)
    return PPOConfig(**base)


def _rows(run):
    with open(run / "progress.csv") as f:
        return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in csv.DictReader(f)]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(_tiny(), full)
    first = train(_tiny(), cut, stop_at_step=64)
    assert not first["finished"] and first["global_step"] == 64
    assert not (cut / "summary.json").exists()
    train(_tiny(), cut, resume=True)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["global_step"] == b["global_step"] == 192
    for g in a["params"]:
        for k in a["params"][g]:
            torch.testing.assert_close(a["params"][g][k], b["params"][g][k], rtol=0, atol=0)
    for x, y in zip(a["opt_state"], b["opt_state"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert _rows(full) == _rows(cut)


def test_resume_refuses_changed_hyperparameters(tmp_path):
    train(_tiny(total_steps=64), tmp_path / "r")
    with pytest.raises(ConfigError, match="--lr=0.001 differs"):
        train(_tiny(total_steps=128, lr=1e-3), tmp_path / "r", resume=True)
