"""Our PPO against Stable-Baselines3's PPO on the same task, budget and hyperparameters.

Both run in this one process, one after the other (order alternated per seed), with the same
torch thread count, one env, observation/reward normalisation (clip 10), 2048 steps per rollout,
minibatches of 64 (32 per epoch), 10 epochs, lr 3e-4 annealed linearly, gamma 0.99, lambda
0.95, clip 0.2 (also for the value function), entropy 0, vf 0.5, max-grad-norm 0.5, Adam eps
1e-5, 64-64 tanh networks with orthogonal init and a state-independent log-std.

Usage (needs the ``bench`` extra: ``EXTRAS=test,bench bash scripts/setup.sh``)::

    .venv/bin/python benchmarks/ppo_baseline.py --env Hopper-v5 --total-steps 50000 --seeds 1

Prints a table (steps/s of each, their ratio, mean return of the last 20 episodes) and writes
``results.csv`` and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from termbench.common import write_rows

from metagrad_rl.trainers.ppo import PPOConfig, train


def run_ours(env: str, total_steps: int, seed: int, threads: int) -> dict[str, Any]:
    cfg = PPOConfig(
        env=env, total_steps=total_steps, seed=seed, torch_threads=threads, checkpoint_every=0
    )
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        summary = train(cfg, d)
        wall = time.perf_counter() - t0
    return {
        "impl": "metagrad_rl",
        "steps": summary["global_step"],
        "wall_s": wall,
        "steps_per_sec": summary["global_step"] / wall,
        "final_return": summary["mean_return_last_20_episodes"],
    }


#: SB3's PPO with our defaults (CleanRL's): the same budget and hyperparameters as ours.
SB3_PPO = dict(
    n_steps=2048,
    batch_size=64,
    n_epochs=10,
    gamma=0.99,
    gae_lambda=0.95,
    clip_range=0.2,
    clip_range_vf=0.2,
    ent_coef=0.0,
    vf_coef=0.5,
    max_grad_norm=0.5,
)


def _sb3_model(env: str, seed: int) -> tuple[Any, Any]:
    """The normalised SB3 vec env and its PPO model, configured as our trainer is."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    venv = VecNormalize(
        make_vec_env(env, n_envs=1, seed=seed),
        norm_obs=True,
        norm_reward=True,
        clip_obs=10.0,
        clip_reward=10.0,
        gamma=0.99,
    )
    policy_kwargs = dict(
        net_arch=dict(pi=[64, 64], vf=[64, 64]),
        activation_fn=torch.nn.Tanh,
        ortho_init=True,
        log_std_init=0.0,
    )
    model = PPO(
        "MlpPolicy",
        venv,
        learning_rate=lambda frac: 3e-4 * frac,
        policy_kwargs=policy_kwargs,
        seed=seed,
        device="cpu",
        verbose=0,
        **SB3_PPO,
    )
    return venv, model


def run_sb3(env: str, total_steps: int, seed: int, threads: int) -> dict[str, Any]:
    try:
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError:
        sys.exit(
            "ppo_baseline: error: stable-baselines3 is not installed: run "
            "`EXTRAS=test,bench bash scripts/setup.sh`"
        )

    class Returns(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.returns: list[float] = []

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                if "episode" in info:
                    self.returns.append(float(info["episode"]["r"]))
            return True

    venv, model = _sb3_model(env, seed)
    cb = Returns()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model.learn(total_timesteps=total_steps, callback=cb)
    wall = time.perf_counter() - t0
    steps = int(model.num_timesteps)
    venv.close()
    return {
        "impl": "stable-baselines3",
        "steps": steps,
        "wall_s": wall,
        "steps_per_sec": steps / wall,
        "final_return": float(np.mean(cb.returns[-20:])) if cb.returns else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--total-steps", type=int, default=50_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=1, help="torch threads for both")
    p.add_argument("--out", default="bench_out/ppo_baseline")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    for i, seed in enumerate(args.seeds):
        runners = [run_ours, run_sb3] if i % 2 == 0 else [run_sb3, run_ours]
        for run in runners:
            r = run(args.env, args.total_steps, seed, args.threads)
            r.update(env=args.env, seed=seed, threads=args.threads)
            rows.append(r)
            print(
                f"  {r['impl']:<18} seed {seed}: {r['steps_per_sec']:7.0f} steps/s, "
                f"final return {r['final_return']}",
                flush=True,
            )

    def agg(impl: str, key: str) -> float:
        vals = [r[key] for r in rows if r["impl"] == impl and r[key] is not None]
        return float(np.mean(vals)) if vals else float("nan")

    ours, sb3 = "metagrad_rl", "stable-baselines3"
    summary = {
        "env": args.env,
        "total_steps": args.total_steps,
        "seeds": args.seeds,
        "threads": args.threads,
        "torch": torch.__version__,
        "steps_per_sec": {ours: agg(ours, "steps_per_sec"), sb3: agg(sb3, "steps_per_sec")},
        "final_return": {ours: agg(ours, "final_return"), sb3: agg(sb3, "final_return")},
    }
    summary["ratio"] = summary["steps_per_sec"][ours] / summary["steps_per_sec"][sb3]
    print(f"\n{args.env}, {args.total_steps} steps, seeds {args.seeds}, {args.threads} thread(s)")
    print("| impl | steps/s | final return (last 20 episodes, mean over seeds) |")
    print("|---|---|---|")
    for impl in (ours, sb3):
        print(
            f"| {impl} | {summary['steps_per_sec'][impl]:.0f} | "
            f"{summary['final_return'][impl]:.1f} |"
        )
    print(f"ratio (ours / SB3): {summary['ratio']:.2f}x")

    write_rows(out, "results", rows, {"summary": summary})  # rows: the runs
    print(f"wrote {out / 'results.csv'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
