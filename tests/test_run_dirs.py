"""Run directories a user can trust: resume from config.json, refusals, restarts, logs."""

from __future__ import annotations

import csv
import json
import re
import warnings

import pytest

from metagrad_rl.cli import main
from metagrad_rl.errors import ConfigError
from metagrad_rl.trainers.ppo import PPOConfig, train

FAST = ["--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1"]
PPO_COLUMNS = ("pg_loss", "v_loss", "entropy", "approx_kl", "clip_frac", "lr", "explained_variance")


def _rows(run):
    with open(run / "progress.csv") as f:
        return list(csv.DictReader(f))


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("metagrad-rl: error: "), err
    return err[0]


def _train(run, *extra):
    base = ["train", "--env", "InvertedPendulum-v5", "--out", str(run), "--no-progress", *FAST]
    return [*base, *extra]


def test_cln_resume_without_algo_reads_config_json(capsys, tmp_path):
    run = tmp_path / "cln"
    argv = _train(run, "--algo", "cln", "--meta-grad", "exact", "--total-steps", "128")
    assert main(argv) == 0
    resume = ["train", "--out", str(run), "--resume", "--total-steps", "192", "--no-progress"]
    assert main(resume) == 0
    assert "done: cln on InvertedPendulum-v5" in capsys.readouterr().out
    assert [r["global_step"] for r in _rows(run)] == ["64", "128", "192"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["algo"] == "cln" and saved["config"]["meta_grad"] == "exact"
    assert saved["config"]["total_steps"] == 192
    line = _err(capsys, [*resume[:-1], "--meta-grad", "eq17", "--total-steps", "256"])
    assert "--meta-grad='eq17' differs from the resumed run's 'exact'" in line
    line = _err(capsys, [*resume, "--algo", "ppo", "--total-steps", "256"])
    assert "--algo='ppo' differs from the resumed run's 'cln'" in line


def test_a_resume_that_asks_for_no_new_steps_says_so(capsys, tmp_path):
    run = tmp_path / "r"
    assert main(_train(run, "--total-steps", "128")) == 0
    line = _err(capsys, ["train", "--out", str(run), "--resume", "--total-steps", "150"])
    assert "--total-steps=150 asks for no new steps" in line and ">= 192" in line


def test_extending_total_steps_restarts_the_lr_annealing(tmp_path):
    cfg = dict(env="InvertedPendulum-v5", num_steps=64, num_minibatches=2, update_epochs=1)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(PPOConfig(total_steps=64 * 4, **cfg), full)
    train(PPOConfig(total_steps=64 * 4, **cfg), cut, stop_at_step=128)
    train(PPOConfig(total_steps=64 * 4, **cfg), cut, resume=True)  # same total: same schedule
    lrs = [float(r["lr"]) for r in _rows(cut)]
    assert (
        lrs
        == [float(r["lr"]) for r in _rows(full)]
        == pytest.approx([3e-4, 2.25e-4, 1.5e-4, 0.75e-4])
    )
    train(PPOConfig(total_steps=64 * 6, **cfg), cut, resume=True)  # extended: back to --lr
    assert [float(r["lr"]) for r in _rows(cut)][4:] == pytest.approx([3e-4, 1.5e-4])


def test_out_empty_and_foreign_directories_are_refused(capsys, tmp_path):
    assert "--out '' is invalid" in _err(capsys, _train(""))
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    line = _err(capsys, _train(foreign))
    assert "holds files metagrad-rl did not write (notes.txt)" in line
    assert "did not write" in _err(capsys, [*_train(foreign), "--overwrite"])
    assert (foreign / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model": "gpt"}')
    assert "config.json' was not written by metagrad-rl" in _err(capsys, _train(other))
    assert json.loads((other / "config.json").read_text()) == {"model": "gpt"}


def test_a_run_killed_before_its_first_checkpoint_starts_again(capsys, tmp_path):
    run = tmp_path / "r"
    assert main(_train(run, "--total-steps", "128", "--checkpoint-every", "0")) == 0
    (run / "checkpoint.pt").unlink()  # as if killed before the first checkpoint
    (run / "summary.json").unlink()
    (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    line = _err(capsys, [*_train(run, "--total-steps", "128"), "--resume"])
    assert "started again without --resume" in line
    assert main(_train(run, "--total-steps", "128")) == 0
    assert [r["global_step"] for r in _rows(run)] == ["64", "128"]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "progress.csv",
        "summary.json",
    ]


def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    cfg = dict(env="InvertedPendulum-v5", num_steps=64, num_minibatches=2, update_epochs=1)
    run = tmp_path / "r"
    train(PPOConfig(total_steps=128, **cfg), run, stop_at_step=64)
    (run / ".progress.csv.abc.tmp").write_text("x")
    train(PPOConfig(total_steps=128, **cfg), run, resume=True)
    assert not (run / ".progress.csv.abc.tmp").exists()


def test_total_steps_rounding_is_the_first_line_and_the_bar_rate_is_sane(capsys, tmp_path):
    argv = _train(tmp_path / "r", "--total-steps", "300")
    argv.remove("--no-progress")
    assert main(argv) == 0
    out = capsys.readouterr()
    first = out.out.splitlines()[0]
    assert first.startswith("note: --total-steps 300 is not a multiple of the rollout")
    assert "training 256 steps (4 iterations)" in first
    rates = [float(x) for x in re.findall(r"([\d.]+)step/s", out.err)]
    assert rates and max(rates) < 1e5  # the first update used to read 22,906,492 steps/s


@pytest.mark.parametrize("algo", ["ppo", "cln", "lirpg"])
def test_every_trainer_writes_ppo_columns_without_warnings(tmp_path, algo):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(_train(tmp_path / "r", "--algo", algo, "--total-steps", "192")) == 0
    rows = _rows(tmp_path / "r")
    for col in PPO_COLUMNS:
        assert rows[-1][col] != "", col
    assert float(rows[-1]["lr"]) == pytest.approx(3e-4 / 3)


def test_bad_config_is_refused_before_any_file(tmp_path):
    with pytest.raises(ConfigError, match="total_steps=10 is less than one rollout"):
        PPOConfig(env="InvertedPendulum-v5", total_steps=10, num_steps=64)


def test_an_older_ppo_checkpoint_is_a_one_line_error(capsys, tmp_path):
    import torch

    from metagrad_rl.checkpoint import save_checkpoint

    run = tmp_path / "r"
    assert main(_train(run, "--total-steps", "64")) == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    del ckpt["update_gen"]
    ckpt["update_rng"] = "{}"  # what the numpy-RNG version wrote
    save_checkpoint(run / "checkpoint.pt", ckpt)
    line = _err(capsys, ["train", "--out", str(run), "--resume", "--total-steps", "128"])
    assert "written by an older metagrad_rl" in line
