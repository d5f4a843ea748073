"""`--device`: cpu by default, cuda when asked (tests skipped without one), one-line errors."""

from __future__ import annotations

import pytest
import torch

from metagrad_rl.cli import main

FAST = ["--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _train(tmp_path, algo, device, *extra):
    argv = ["train", "--algo", algo, "--env", "InvertedPendulum-v5", "--device", device]
    return [*argv, "--out", str(tmp_path / algo), "--no-progress", "--total-steps", "192", *FAST]


def _err(capsys, argv):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metagrad-rl: error: ")
    return lines[0]


def test_bad_and_absent_devices_are_one_line_errors(capsys, tmp_path, monkeypatch):
    line = _err(capsys, _train(tmp_path, "ppo", "gpu"))
    assert "device='gpu' is invalid: expected cpu, cuda or cuda:N" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _err(capsys, _train(tmp_path, "cln", "cuda"))
    assert "device='cuda' is not available" in line and "expected cpu" in line
    assert not (tmp_path / "cln").exists()


@pytest.mark.parametrize(
    "algo,extra", [("ppo", []), ("cln", ["--meta-grad", "exact"]), ("lirpg", [])]
)
def test_cpu_device_runs_and_resumes(tmp_path, algo, extra):
    argv = [*_train(tmp_path, algo, "cpu"), *extra]
    assert main(argv) == 0
    assert main([*argv, "--resume", "--total-steps", "256"]) == 0


@CUDA
@pytest.mark.parametrize(
    "algo,extra",
    [
        ("ppo", []),
        ("cln", ["--meta-grad", "eq17"]),
        ("cln", ["--meta-grad", "exact"]),
        ("lirpg", []),
    ],
)
def test_every_algorithm_on_cuda(tmp_path, algo, extra):
    argv = [*_train(tmp_path, algo, "cuda"), *extra]
    assert main(argv) == 0
    assert main([*argv, "--resume", "--total-steps", "256"]) == 0
    assert main(["evaluate", str(tmp_path / algo / "checkpoint.pt"), "--episodes", "1"]) == 0
