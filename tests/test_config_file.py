"""`train --config FILE`: TOML or JSON with the flags' names, the same validation, and a run's
config.json accepted as it is."""

from __future__ import annotations

import json

from metagrad_rl.cli import main

FAST = 'num-steps = 64\nnum-minibatches = 2\nupdate-epochs = 1\nenv = "InvertedPendulum-v5"\n'


def _err(capsys, argv):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metagrad-rl: error: ")
    return lines[0]


def _saved(run):
    return json.loads((run / "config.json").read_text())


def test_toml_config_with_flag_names_and_flags_winning(tmp_path):
    f = tmp_path / "cln.toml"
    f.write_text(FAST + 'algo = "cln"\nmeta-grad = "exact"\ntotal_steps = 128\nhidden = [32, 32]\n')
    run = tmp_path / "r"
    argv = ["train", "--config", str(f), "--out", str(run), "--no-progress", "--eta-lr", "0.01"]
    assert main(argv) == 0
    saved = _saved(run)
    assert saved["algo"] == "cln"
    cfg = saved["config"]
    assert (cfg["meta_grad"], cfg["total_steps"], cfg["hidden"]) == ("exact", 128, [32, 32])
    assert cfg["eta_lr"] == 0.01 and cfg["num_steps"] == 64


def test_a_runs_config_json_is_a_valid_config(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text(FAST + 'algo = "lirpg"\ntotal-steps = 64\n')
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    again = ["train", "--config", str(tmp_path / "a" / "config.json"), "--seed", "2"]
    assert main([*again, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = _saved(tmp_path / "a"), _saved(tmp_path / "b")
    assert b["algo"] == "lirpg" and {**a["config"], "seed": 2} == b["config"]


def test_bad_config_files_are_one_line_errors(capsys, tmp_path):
    out = ["--out", str(tmp_path / "r")]
    bad_key = tmp_path / "k.toml"
    bad_key.write_text(FAST + "bogus-flag = 1\n")
    line = _err(capsys, ["train", "--config", str(bad_key), *out])
    assert "unknown settings --bogus-flag for PPOConfig" in line
    bad_value = tmp_path / "v.json"
    bad_value.write_text('{"lr": 0, "env": "InvertedPendulum-v5"}')
    assert "lr=0.0 is invalid: expected a positive finite number" in _err(
        capsys, ["train", "--config", str(bad_value), *out]
    )
    broken = tmp_path / "b.toml"
    broken.write_text("lr = = 1")
    assert "is not valid TOML" in _err(capsys, ["train", "--config", str(broken), *out])
    assert "cannot be read" in _err(capsys, ["train", "--config", str(tmp_path / "no.toml"), *out])
    clash = tmp_path / "c.toml"
    clash.write_text(FAST + 'algo = "cln"\n')
    line = _err(capsys, ["train", "--config", str(clash), "--algo", "ppo", *out])
    assert "--algo='ppo' differs from" in line
    assert not (tmp_path / "r").exists()
