"""What a new user sees: config values type-checked for files, flags and Python alike, and
messages that say what is wrong (one line, exit code 2) instead of misleading or cut ones."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

from metagrad_rl.checkpoint import load_checkpoint, load_failure_reason, save_checkpoint
from metagrad_rl.cli import join_negative_values, main
from metagrad_rl.errors import ConfigError
from metagrad_rl.trainers.ppo import PPOConfig

FAST = ["--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1"]
ENV = ["--env", "InvertedPendulum-v5"]


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("metagrad-rl: error: "), err
    return err[0]


# ------------------------------------------------------------------ config types


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("h.toml", "hidden = 64\n", "hidden=64 is an integer: expected a list of integers"),
        ("a.toml", 'anneal-lr = "false"\n', "anneal_lr='false' is a string: expected true"),
        ("t.toml", "total-steps = 1e5\n", "total_steps=100000.0 is a float: expected an integer"),
        ("s.json", '{"seed": true}', "seed=True is a bool: expected an integer"),
        ("l.json", '{"lr": "3e-4"}', "lr='3e-4' is a string: expected a number"),
        ("e.json", '{"env": 5}', "env=5 is an integer: expected a string"),
        ("r.json", '{"reward-hidden": [64, "a"]}', "reward_hidden=[64, 'a'] is a list: expected"),
    ],
)
def test_config_file_values_of_the_wrong_type(capsys, tmp_path, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    line = _err(capsys, ["train", "--config", str(f), "--out", str(tmp_path / "r")])
    assert f"--config '{f}': {needle}" in line
    assert not (tmp_path / "r").exists()


def test_python_configs_are_checked_and_normalised_alike():
    with pytest.raises(ConfigError, match="anneal_lr='false' is a string: expected true or false"):
        PPOConfig(env="InvertedPendulum-v5", anneal_lr="false")
    with pytest.raises(ConfigError, match="hidden=64 is an integer"):
        PPOConfig(env="InvertedPendulum-v5", hidden=64)
    cfg = PPOConfig(env="InvertedPendulum-v5", lr=1, hidden=[32, 32])
    assert isinstance(cfg.lr, float) and cfg.hidden == (32, 32)


def test_a_negative_number_after_a_flag_reaches_validation(capsys, tmp_path):
    assert join_negative_values(["--lr", "-1e-3", "--hidden", "64", "-3"]) == [
        "--lr=-1e-3",
        "--hidden",
        "64",
        "-3",
    ]
    line = _err(capsys, ["train", *ENV, "--lr", "-1e-3", "--out", str(tmp_path / "r")])
    assert "lr=-0.001 is invalid: expected a positive finite number" in line


# ------------------------------------------------------------------ files and directories


def test_a_corrupt_checkpoints_reason_is_whole_words(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "x": Fraction(1, 3)}, bad)  # not plain data: weights_only refuses
    with pytest.raises(ConfigError) as e:
        load_checkpoint(bad)
    msg = str(e.value)
    assert "is corrupt or not a metagrad_rl checkpoint (Unsupported global" in msg
    assert "\x1b" not in msg and msg.endswith(")")
    long = RuntimeError("word " * 60)
    assert load_failure_reason(long) == " ".join(["word"] * 24) + " ..."


def test_out_naming_a_file_says_so(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _err(capsys, ["train", *ENV, "--out", str(afile)])
    assert f"--out '{afile}' is a file: expected a directory path" in line


def test_evaluate_takes_a_run_directory_and_wall_time_adds_up_over_a_resume(capsys, tmp_path):
    run = tmp_path / "run"
    base = ["train", *ENV, "--out", str(run), "--no-progress", *FAST]
    assert main([*base, "--total-steps", "64"]) == 0
    line = _err(capsys, ["evaluate", str(tmp_path)])
    assert f"checkpoint '{tmp_path}' is a directory: expected a checkpoint.pt file" in line
    assert main(["evaluate", str(run), "--episodes", "1"]) == 0
    assert "mean return over 1 episodes" in capsys.readouterr().out

    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["wall_time_s"] > 0
    save_checkpoint(run / "checkpoint.pt", {**ckpt, "wall_time_s": 1000.0})
    assert main([*base, "--total-steps", "128", "--resume"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_time_s"] >= 1000.0  # the first part's seconds plus the resumed part's
    assert load_checkpoint(run / "checkpoint.pt")["wall_time_s"] >= 1000.0


def test_device_errors_read_the_same_with_one_and_two_workers(capsys, tmp_path):
    lines = [
        _err(capsys, ["train", *ENV, "--device", "gpu", "--nproc", n, "--out", str(tmp_path)])
        for n in ("1", "2")
    ]
    assert lines[0] == lines[1]
    assert lines[0].startswith("metagrad-rl: error: device='gpu' is invalid")
