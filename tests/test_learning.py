"""PPO learns InvertedPendulum-v5 within the suite's budget (~10 s on 2 cores).

Probed over seeds 1-4 at this budget: training return (last 20 episodes) 499-724 and a
deterministic evaluation of 1000 (the maximum) for every seed; the thresholds leave a wide
margin below that.
"""

from __future__ import annotations

from metagrad_rl.evaluate import evaluate_checkpoint
from metagrad_rl.trainers.ppo import PPOConfig, train


def test_ppo_learns_inverted_pendulum(tmp_path):
    cfg = PPOConfig(env="InvertedPendulum-v5", total_steps=15 * 2048, seed=1, checkpoint_every=0)
    summary = train(cfg, tmp_path)
    assert summary["finished"] and summary["global_step"] == 30720
    assert summary["mean_return_last_20_episodes"] >= 200.0, summary
    returns = evaluate_checkpoint(tmp_path / "checkpoint.pt", episodes=5, seed=0)
    assert sum(returns) / len(returns) >= 500.0, returns
