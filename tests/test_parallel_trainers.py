"""The trainers with 2 data-parallel workers (:mod:`metagrad_rl.trainers.parallel`).

Two groups of two spawned gloo workers (loopback), on Hopper-v5 with tiny rollouts. In the
first, a CLN run with the ``exact`` meta-gradient loses rank 1 in its second iteration: rank 0
must stop with one :class:`WorkerLostError` line at once. The second group resumes that run
from its checkpoint, runs it uninterrupted for comparison, and runs PPO. The tests check that
both workers applied the same meta-gradients and held the same parameters, that the resumed
CSV equals the uninterrupted one, that rank 0 alone wrote files, and that a checkpoint of 2
workers refuses a resume with 1. A slow test does the fault through the CLI: two
``metagrad-rl train`` workers, one killed with SIGKILL, then ``--resume --nproc 2``.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import _free_port, run_workers, workers

from metagrad_rl.checkpoint import load_checkpoint
from metagrad_rl.distributed import WorkerLostError
from metagrad_rl.errors import ConfigError
from metagrad_rl.pytree import flatten
from metagrad_rl.trainers import bilevel, ppo

N = 2
TINY = dict(
    env="Hopper-v5", num_steps=64, num_minibatches=2, update_epochs=1, seed=3, checkpoint_every=1
)


def _cln(total_steps: int = 192) -> bilevel.CLNConfig:
    return bilevel.CLNConfig(total_steps=total_steps, meta_grad="exact", **TINY)


def _faulty(rank: int, n: int, init: str, root: str) -> dict:
    """Rank 1 dies in iteration 2 (after the checkpoint of iteration 1); rank 0 reports it."""

    def die(step: bilevel.MetaStep) -> None:
        if rank == 1:
            os._exit(1)

    t0 = time.perf_counter()
    try:
        with workers(rank, n, init, timeout_s=60.0):
            t0 = time.perf_counter()
            bilevel.train(_cln(), Path(root) / "cut", on_meta_step=die)
    except WorkerLostError as err:
        return {"error": str(err), "took": time.perf_counter() - t0}
    return {"error": None}


def _worker(rank: int, n: int, init: str, root: str) -> dict:
    out = Path(root)
    metas: list[torch.Tensor] = []

    def record(step: bilevel.MetaStep) -> None:
        metas.append(torch.cat([flatten(step.grad), flatten(step.theta_next)]))

    with workers(rank, n, init, timeout_s=60.0):
        full = bilevel.train(_cln(), out / "full", on_meta_step=record)
        resumed = bilevel.train(_cln(), out / "cut", resume=True)
        p = ppo.train(ppo.PPOConfig(total_steps=128, **TINY), out / "ppo")
    return {"metas": metas, "full": full, "resumed": resumed, "ppo": p}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A faulty run (rank 1 dies), then a group that runs, resumes it, and runs PPO."""
    root = tmp_path_factory.mktemp("parallel")
    runs = root / "runs"
    (fault,) = run_workers(_faulty, N, root / "rdv1", str(runs), timeout_s=200.0, results_from=[0])
    results = run_workers(_worker, N, root / "rdv2", str(runs), timeout_s=300.0)
    return runs, fault, results


def _rows(run: Path) -> list[dict]:
    with open(run / "progress.csv") as f:
        return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in csv.DictReader(f)]


def test_both_workers_apply_the_same_meta_gradients_and_hold_the_same_theta(two):
    _, _, (r0, r1) = two
    assert len(r0["metas"]) == len(r1["metas"]) == 2  # iterations 2 and 3 step eta
    for a, b in zip(r0["metas"], r1["metas"]):
        assert torch.equal(a, b)  # bit-identical (the trainer also checks theta/eta/critics)
    assert r0["full"]["num_workers"] == 2 and r0["full"]["finished"]
    assert r0["ppo"]["finished"] and r0["ppo"]["num_workers"] == 2


def test_a_dead_worker_stops_the_other_with_one_line_at_once(two):
    _, fault, _ = two
    assert fault["error"] is not None and "\n" not in fault["error"]
    assert fault["error"].startswith("worker 0 of 2: lost the other workers")
    assert fault["took"] < 60  # at once (its connection closed), not after the timeout


def test_two_worker_cln_stopped_by_the_fault_and_resumed_gives_the_uninterrupted_csv(two):
    runs, _, (r0, _) = two
    assert r0["resumed"]["finished"]
    full, cut = _rows(runs / "full"), _rows(runs / "cut")
    assert len(full) == 3 and full == cut
    assert [int(r["all_workers_step"]) for r in full] == [128, 256, 384]
    a = load_checkpoint(runs / "full" / "checkpoint.pt")
    b = load_checkpoint(runs / "cut" / "checkpoint.pt")
    assert a["num_workers"] == 2 and len(a["workers"]) == 2
    for k in ("theta", "eta"):
        for name in a[k]:
            assert torch.equal(a[k][name], b[k][name])
    # each rank's own envs: different action-noise streams and physics
    w0, w1 = a["workers"]
    assert w0["collector"]["rng"] != w1["collector"]["rng"]
    assert not torch.equal(w0["collector"]["obs"], w1["collector"]["obs"])
    assert torch.equal(w0["collector"]["obs_norm"]["mean"], w1["collector"]["obs_norm"]["mean"])


def test_only_rank_0_writes_and_episodes_of_both_workers_are_logged(two):
    runs, _, _ = two
    assert sorted(os.listdir(runs / "ppo")) == [
        "checkpoint.pt",
        "config.json",
        "progress.csv",
        "summary.json",
    ]
    # Hopper episodes under a random policy last ~20 steps: 2 x 64 steps end >= 4 of them
    assert all(int(r["episodes"]) >= 4 for r in _rows(runs / "ppo"))


def test_resuming_with_another_number_of_workers_is_one_line(two):
    runs, _, _ = two
    with pytest.raises(ConfigError, match=r"trained with 2 worker\(s\), this one has 1") as err:
        bilevel.train(_cln(256), runs / "full", resume=True)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- faults
def _cli_worker(rank: int, port: int, argv: list[str], log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "metagrad_rl", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
    )


@pytest.mark.slow
def test_cli_a_killed_worker_stops_the_other_with_one_line_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--algo", "ppo", "--out", str(out), "--no-progress", "--worker-timeout", "20"]
    argv += ["--env", "Hopper-v5", "--num-steps", "64", "--num-minibatches", "2"]
    argv += ["--update-epochs", "1", "--checkpoint-every", "1", "--total-steps", str(64 * 400)]
    port = _free_port()
    logs = [tmp_path / "rank0.err", tmp_path / "rank1.err"]
    procs = [_cli_worker(r, port, argv, logs[r]) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and procs[0].poll() is None:
            if (out / "checkpoint.pt").exists() and len(_rows(out)) >= 3:
                break
            time.sleep(0.05)
        assert procs[0].poll() is None, logs[0].read_text()
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    err = logs[0].read_text().strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("metagrad-rl: error: worker 0 of 2: lost the other workers")
    assert "--resume" in err[0]
    assert took < 20  # a dead peer is noticed at once, well before --worker-timeout
    done = int(load_checkpoint(out / "checkpoint.pt")["global_step"])
    assert done < 64 * 400
    again = subprocess.run(
        [sys.executable, "-m", "metagrad_rl", "train", "--resume", "--out", str(out)]
        + ["--nproc", "2", "--no-progress", "--total-steps", str(done + 128)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert again.returncode == 0, again.stderr
    rows = _rows(out)
    assert [int(r["global_step"]) for r in rows][-3:] == [done, done + 64, done + 128]
    assert load_checkpoint(out / "checkpoint.pt")["num_workers"] == 2


# ------------------------------------------------------------------- the CLI, without workers
@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--nproc", "0"], {}, "--nproc=0 is invalid"),
        (["--worker-timeout", "0"], {}, "--worker-timeout=0.0 is invalid"),
        (["--nproc", "2"], {"WORLD_SIZE": "2"}, "under torchrun (WORLD_SIZE is set)"),
        (["--nproc", "2", "--lr", "-1"], {}, "lr"),  # checked once, before any worker starts
    ],
)
def test_cli_worker_flags_bad_input_is_one_line(capsys, monkeypatch, tmp_path, argv, env, needle):
    from metagrad_rl.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metagrad-rl: error:") and needle in err[0], err
    assert not (tmp_path / "r").exists()


def test_nproc_is_left_out_of_the_workers_command_line():
    from metagrad_rl.trainers.launch import without_flag

    argv = ["train", "--nproc", "2", "--out", "x", "--nproc=3", "--seed", "1"]
    assert without_flag(argv, "--nproc") == ["train", "--out", "x", "--seed", "1"]


def test_cli_resume_takes_the_number_of_workers_from_the_run(tmp_path):
    """``--resume`` without ``--nproc`` starts as many workers as the run was trained with."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "metagrad_rl", "train", "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("WORLD_SIZE", None)
    first = base + ["--algo", "ppo", "--env", "InvertedPendulum-v5", "--num-steps", "64"]
    first += ["--num-minibatches", "2", "--update-epochs", "1", "--total-steps", "128"]
    r = subprocess.run(
        first + ["--nproc", "2"], capture_output=True, text=True, env=env, timeout=180
    )
    assert r.returncode == 0, r.stderr
    again = base + ["--resume", "--total-steps", "256"]
    r = subprocess.run(again, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "checkpoint.pt")["num_workers"] == 2
    assert [int(x["global_step"]) for x in _rows(out)] == [64, 128, 192, 256]
