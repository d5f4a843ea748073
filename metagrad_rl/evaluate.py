"""Running a saved policy: ``metagrad-rl evaluate CHECKPOINT``.

The policy acts with its mean action (or samples, ``deterministic=False``) on fresh env copies,
with the observation normaliser frozen at the checkpoint's statistics. Returns are the raw
extrinsic returns of the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from metagrad_rl.checkpoint import load_checkpoint
from metagrad_rl.config import positive_int
from metagrad_rl.envs import ObsNormalizer, make_env
from metagrad_rl.errors import ConfigError
from metagrad_rl.networks import POLICIES, Sampler


def load_policy(snapshot: dict[str, Any]) -> tuple[Sampler, ObsNormalizer]:
    """Rebuilds the policy's sampler and the frozen normaliser from a checkpoint's ``"policy"``
    entry; the policy is rebuilt by its factory in :data:`~metagrad_rl.networks.POLICIES`."""
    cond, kind = snapshot.get("cond"), snapshot.get("kind", "gaussian")
    if kind not in POLICIES:
        raise ConfigError(
            f"this checkpoint's policy {kind!r} is not registered: expected one of "
            f"{', '.join(POLICIES)} (add its factory to metagrad_rl.networks.POLICIES)"
        )
    policy = POLICIES[kind](
        snapshot["obs_dim"],
        snapshot["act_dim"],
        tuple(snapshot["hidden"]),
        snapshot["conditioning"],
        None if cond is None else int(cond.numel()),
    )
    theta = dict(snapshot["theta"])
    want = {k: tuple(v.shape) for k, v in policy.named_parameters()}
    got = {k: tuple(v.shape) for k, v in theta.items()}
    if want != got:
        raise ConfigError(f"checkpoint policy does not match its spec: {got} vs {want}")
    obs_norm = ObsNormalizer(
        snapshot["obs_dim"], clip=snapshot["obs_clip"], enabled=snapshot["obs_norm_enabled"]
    )
    obs_norm.load_state_dict(snapshot["obs_norm"])
    return policy.sampler(theta, cond), obs_norm


def evaluate_checkpoint(
    path: str | Path, episodes: int = 10, seed: int = 0, deterministic: bool = True
) -> list[float]:
    """Raw returns of ``episodes`` episodes of the checkpoint's policy (env seeded ``seed``).

    ``path`` is a ``checkpoint.pt`` or a run directory (``train --out``) holding one.
    """
    positive_int("episodes", episodes)
    if Path(path).is_dir() and (Path(path) / "checkpoint.pt").is_file():
        path = Path(path) / "checkpoint.pt"  # a run directory (train --out): its checkpoint
    ckpt = load_checkpoint(path)
    snap = ckpt.get("policy")
    if not isinstance(snap, dict):
        raise ConfigError(
            f"checkpoint {str(path)!r} holds no policy: expected a training checkpoint"
        )
    pnp, obs_norm = load_policy(snap)
    env = make_env(snap["env_id"])
    rng = np.random.default_rng(seed)
    space: Any = env.action_space
    low, high = space.low, space.high
    returns = []
    for ep in range(episodes):
        raw, _ = env.reset(seed=seed + ep)
        total, done = 0.0, False
        while not done:
            obs = obs_norm(np.asarray(raw, dtype=np.float64).reshape(1, -1), update=False)
            act = pnp.mean(obs)[0]
            if not deterministic:
                act = act + pnp.std * rng.standard_normal(act.shape)
            raw, r, term, trunc, _ = env.step(np.clip(act, low, high).reshape(space.shape))
            total += float(r)
            done = bool(term or trunc)
        returns.append(total)
    env.close()
    return returns
