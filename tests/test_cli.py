"""The command line: every bad input is one line on stderr, exit code 2, and no files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from metagrad_rl.cli import main

FAST = ["--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1"]


def _err(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out
    assert len(lines) == 1 and lines[0].startswith("metagrad-rl: error: "), out.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--env", "Foo-v0"], "unknown env id 'Foo-v0'"),
        (["--env", "CartPole-v1"], "'CartPole-v1' has a Discrete action space"),
        (["--total-steps", "0"], "total_steps=0"),
        (["--total-steps", "-5"], "total_steps=-5"),
        (["--num-steps", "0"], "num_steps=0"),
        (["--lr", "0"], "lr=0.0"),
        (["--lr=-3e-4"], "lr=-0.0003"),
        (["--lr", "abc"], "'abc'"),
        (["--bottleneck", "65"], "bottleneck=65 is wider than its input layer (64 units)"),
        (["--reward-hidden", "16", "--bottleneck", "17"], "bottleneck=17"),
        (["--algo", "nope"], "'nope'"),
    ],
)
def test_train_bad_input(capsys, tmp_path, argv, needle):
    out = tmp_path / "run"
    line = _err(capsys, ["train", "--out", str(out), *FAST, *argv])
    assert needle in line
    assert not out.exists()  # nothing written, not even the directory


def test_train_unwritable_out_dir(capsys, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    line = _err(capsys, ["train", "--env", "InvertedPendulum-v5", "--out", str(afile / "run")])
    assert f"output directory '{afile / 'run'}' cannot be written" in line
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only directories")
def test_train_read_only_out_dir(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    line = _err(capsys, ["train", "--env", "InvertedPendulum-v5", "--out", str(ro / "run")])
    assert "cannot be written" in line


def test_missing_and_corrupt_checkpoints(capsys, tmp_path):
    assert "does not exist" in _err(capsys, ["evaluate", str(tmp_path / "none.pt")])
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    line = _err(capsys, ["evaluate", str(bad)])
    assert f"checkpoint '{bad}' is corrupt" in line
    line = _err(capsys, ["train", "--resume", "--out", str(tmp_path)])
    assert "is corrupt" in line
    line = _err(capsys, ["train", "--resume", "--out", str(tmp_path / "empty")])
    assert "empty/checkpoint.pt' does not exist" in line
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_plot_of_a_non_run_directory(capsys, tmp_path):
    line = _err(capsys, ["plot", str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert "config.json" in line
    assert not (tmp_path / "c.png").exists()


def test_train_resume_evaluate_plot_end_to_end(capsys, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--env", "InvertedPendulum-v5", "--out", str(run), "--no-progress", *FAST]
    assert main([*base, "--total-steps", "128"]) == 0
    assert "done: ppo on InvertedPendulum-v5" in capsys.readouterr().out
    line = _err(capsys, [*base, "--total-steps", "128"])
    assert "already holds a run" in line
    assert main([*base, "--total-steps", "256", "--resume"]) == 0
    capsys.readouterr()
    with open(run / "progress.csv") as f:
        assert [r.split(",")[0] for r in f.read().splitlines()[1:]] == ["64", "128", "192", "256"]
    assert main(["evaluate", str(run / "checkpoint.pt"), "--episodes", "2"]) == 0
    assert "mean return over 2 episodes" in capsys.readouterr().out
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*base, "--total-steps", "64", "--overwrite"]) == 0
    with open(run / "progress.csv") as f:
        assert len(f.read().splitlines()) == 2


@pytest.mark.parametrize("sub", [[], ["train"], ["plot"], ["evaluate"]])
def test_help_of_every_subcommand(sub):
    r = subprocess.run(
        [sys.executable, "-m", "metagrad_rl.cli", *sub, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "usage: metagrad-rl" in r.stdout
    if sub == ["train"]:
        assert "--total-steps" in r.stdout and "Adam step size" in r.stdout
