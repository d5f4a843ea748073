"""Environments: ``N`` seeded Gymnasium copies, action clipping, and PPO's running normalisers.

PPO on MuJoCo relies on three environment-side details (CleanRL's ``ppo_continuous_action``):
``ClipAction``, ``NormalizeObservation`` (clip +-10) and ``NormalizeReward`` (scaling by the
standard deviation of a discounted return, clip +-10). We implement them here as small numpy
objects instead of Gymnasium wrappers, so that their state is plain data that checkpoints save
and restore exactly, and so that ``N = 1`` pays no wrapper or vector-env overhead.

:class:`VecEnv` steps ``N`` copies and resets a copy in the same step its episode ends
(Gymnasium's ``autoreset_mode=SAME_STEP``), returning the real final observation separately:
``final_obs[i]`` is ``s_{t+1}`` of the finished episode, needed to bootstrap on truncation.
"""

from __future__ import annotations

import json
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.error import Error as GymError

from metagrad_rl.errors import ConfigError

EXAMPLE_ENV = "Hopper-v5"


def check_env_id(env_id: str) -> gym.envs.registration.EnvSpec:
    """The registered spec of ``env_id``, or a :class:`ConfigError` naming it."""
    try:
        return gym.spec(env_id)
    except (GymError, ValueError, TypeError) as err:
        raise ConfigError(
            f"unknown env id {env_id!r}: expected a registered Gymnasium id such as {EXAMPLE_ENV}"
        ) from err


def make_env(env_id: str, max_episode_steps: int | None = None) -> gym.Env:
    """One Gymnasium env with a Box action space (the passive checker is off: it costs time)."""
    check_env_id(env_id)
    try:
        env = gym.make(env_id, disable_env_checker=True, max_episode_steps=max_episode_steps)
    except (GymError, ImportError, ModuleNotFoundError) as err:
        raise ConfigError(f"env id {env_id!r} cannot be made: {err}") from err
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        env.close()
        raise ConfigError(
            f"env {env_id!r} has a {type(space).__name__} action space: expected a continuous "
            f"Box action space (e.g. {EXAMPLE_ENV})"
        )
    if not isinstance(env.observation_space, gym.spaces.Box):
        env.close()
        raise ConfigError(
            f"env {env_id!r} has a {type(env.observation_space).__name__} observation space: "
            "expected a Box observation space"
        )
    return env


def _time_limit(env: gym.Env) -> Any:
    e: Any = env
    while e is not None:
        if isinstance(e, gym.wrappers.TimeLimit):
            return e
        e = getattr(e, "env", None)
    return None


class VecEnv:
    """``N`` copies of one env, each seeded ``seed + i``, with ``ClipAction`` and same-step reset.

    :meth:`step` returns ``(obs, reward, terminated, truncated, final_obs)`` as numpy arrays;
    where an episode ended, ``obs[i]`` is already the first observation of the next episode and
    ``final_obs[i]`` the real last observation of the finished one (elsewhere ``final_obs[i]``
    equals ``obs[i]``).
    """

    def __init__(
        self, env_id: str, num_envs: int, seed: int, max_episode_steps: int | None = None
    ) -> None:
        if not isinstance(num_envs, int) or num_envs <= 0:
            raise ConfigError(f"num_envs={num_envs!r} is invalid: expected a positive int")
        self.env_id = env_id
        self.envs = [make_env(env_id, max_episode_steps) for _ in range(num_envs)]
        self.num_envs = num_envs
        self.seed = seed
        space: Any = self.envs[0].action_space
        obs_space: Any = self.envs[0].observation_space
        self.act_low = np.asarray(space.low, dtype=np.float64)
        self.act_high = np.asarray(space.high, dtype=np.float64)
        self.obs_dim = int(np.prod(obs_space.shape))
        self.act_dim = int(np.prod(space.shape))
        self._act_shape = space.shape

    def reset(self) -> np.ndarray:
        """First observations ``[N, obs_dim]``; copy ``i`` is seeded ``seed + i``."""
        return np.stack(
            [
                np.asarray(env.reset(seed=self.seed + i)[0], dtype=np.float64).reshape(-1)
                for i, env in enumerate(self.envs)
            ]
        )

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Steps every copy with ``clip(actions, low, high)``; see the class docstring."""
        n = self.num_envs
        clipped = _clip(actions, self.act_low, self.act_high)
        obs = np.empty((n, self.obs_dim))
        final_obs = np.empty((n, self.obs_dim))
        rew = np.empty(n)
        term = np.zeros(n, dtype=bool)
        trunc = np.zeros(n, dtype=bool)
        for i, env in enumerate(self.envs):
            o, r, te, tr, _ = env.step(clipped[i].reshape(self._act_shape))
            final_obs[i] = np.asarray(o).reshape(-1)
            rew[i] = r
            term[i] = te
            trunc[i] = tr
            if te or tr:
                o = env.reset()[0]
            obs[i] = np.asarray(o).reshape(-1)
        return obs, rew, term, trunc, final_obs

    def close(self) -> None:
        for env in self.envs:
            env.close()

    # -- exact save/restore (MuJoCo physics, env RNGs, time limits) ----------------------------
    def get_state(self) -> list[dict[str, Any]]:
        """Per copy: its RNG state, elapsed steps and, for MuJoCo envs, the full physics state.

        Plain data (tensors and strings) so that ``torch.load(weights_only=True)`` reads it.
        For non-MuJoCo envs only the RNG and step count are saved; their episodes restart on
        resume (see :meth:`set_state`).
        """
        states = []
        for env in self.envs:
            u: Any = env.unwrapped
            tl = _time_limit(env)
            st: dict[str, Any] = {
                "np_random": json.dumps(u.np_random.bit_generator.state),
                "elapsed_steps": int(tl._elapsed_steps or 0) if tl is not None else 0,
            }
            physics = _mujoco_state(u)
            if physics is not None:
                st["mujoco"] = torch.from_numpy(physics)
            states.append(st)
        return states

    def set_state(self, states: list[dict[str, Any]]) -> bool:
        """Restores :meth:`get_state`; returns whether the restore is exact (MuJoCo envs)."""
        if len(states) != self.num_envs:
            raise ConfigError(
                f"checkpoint holds {len(states)} env states: expected num_envs={self.num_envs}"
            )
        exact = True
        for env, st in zip(self.envs, states):
            u: Any = env.unwrapped
            if "mujoco" in st and _mujoco_state(u) is not None:
                _set_mujoco_state(u, st["mujoco"].numpy())
            else:
                exact = False
            u.np_random.bit_generator.state = json.loads(st["np_random"])
            tl = _time_limit(env)
            if tl is not None:
                tl._elapsed_steps = st["elapsed_steps"]
        return exact


def _mujoco_state(u: Any) -> np.ndarray | None:
    if not (hasattr(u, "model") and hasattr(u, "data")):
        return None
    try:
        import mujoco
    except ImportError:  # pragma: no cover - mujoco is a dependency
        return None
    if not isinstance(u.model, mujoco.MjModel):
        return None
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    out = np.empty(mujoco.mj_stateSize(u.model, spec))
    mujoco.mj_getState(u.model, u.data, out, spec)
    return out


def _set_mujoco_state(u: Any, state: np.ndarray) -> None:
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    mujoco.mj_setState(u.model, u.data, np.ascontiguousarray(state, dtype=np.float64), spec)
    mujoco.mj_forward(u.model, u.data)


def _clip(x: np.ndarray, low: Any, high: Any) -> np.ndarray:
    """``np.clip(x, low, high)`` (the same values, NaN kept) at a fifth of its call overhead,
    which dominates for the per-step arrays of a few numbers."""
    return np.minimum(np.maximum(x, low), high)


class RunningMeanStd:
    """Running mean and (population) variance of a stream of batches (Chan et al. 1979).

    Starts from ``count = epsilon`` with mean 0 and variance 1, as Gymnasium's and SB3's do.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        self.mean = np.zeros(shape, dtype=np.float64)
        self.var = np.ones(shape, dtype=np.float64)
        self.count = float(epsilon)

    def update(self, x: np.ndarray) -> None:
        """Adds a batch ``x`` of shape ``[B, *shape]``."""
        b = x.shape[0]
        # one row (one env copy, every step of a rollout): its mean is itself, its variance 0
        batch_mean = x[0] if b == 1 else x.mean(axis=0)
        batch_var = x.var(axis=0) if b > 1 else 0.0
        delta = batch_mean - self.mean
        total = self.count + b
        self.mean = self.mean + delta * (b / total)
        m2 = self.var * self.count + batch_var * b + delta * delta * (self.count * b / total)
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": torch.from_numpy(np.array(self.mean, dtype=np.float64)),
            "var": torch.from_numpy(np.array(self.var, dtype=np.float64)),
            "count": float(self.count),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = state["mean"].numpy().astype(np.float64)
        if mean.shape != self.mean.shape:
            raise ConfigError(
                f"normaliser state has shape {tuple(mean.shape)}: expected {self.mean.shape}"
            )
        self.mean = mean
        self.var = state["var"].numpy().astype(np.float64)
        self.count = float(state["count"])


class ObsNormalizer:
    """``clip((o - mean) / sqrt(var + eps), -clip, clip)`` with running statistics.

    ``enabled=False`` passes observations through (as float32) and never updates.
    """

    def __init__(
        self, obs_dim: int, clip: float = 10.0, eps: float = 1e-8, enabled: bool = True
    ) -> None:
        self.rms = RunningMeanStd((obs_dim,))
        self.clip = clip
        self.eps = eps
        self.enabled = enabled

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        """Normalises a batch ``[B, obs_dim]``, first adding it to the statistics if ``update``."""
        if not self.enabled:
            return obs.astype(np.float32)
        if update:
            self.rms.update(obs)
        z = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.eps)
        return _clip(z, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return self.rms.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rms.load_state_dict(state)


class RewardScaler:
    """``clip(r_t / sqrt(Var[R] + eps), -clip, clip)`` with ``R_t = gamma R_{t-1} + r_t``.

    ``R`` is the running discounted return of each env copy, reset to 0 after its episode ends
    (terminated or truncated; SB3's ``VecNormalize`` convention). Rewards are scaled, never
    shifted, so the sign of every reward is kept.
    """

    def __init__(
        self,
        num_envs: int,
        gamma: float,
        clip: float = 10.0,
        eps: float = 1e-8,
        enabled: bool = True,
    ) -> None:
        self.rms = RunningMeanStd(())
        self.ret = np.zeros(num_envs)
        self.gamma = gamma
        self.clip = clip
        self.eps = eps
        self.enabled = enabled

    def __call__(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Scales rewards ``[N]``; ``done[i]`` ends copy ``i``'s discounted return."""
        if not self.enabled:
            return reward.astype(np.float32)
        self.ret = self.ret * self.gamma + reward
        self.rms.update(self.ret)
        scaled = _clip(reward / np.sqrt(self.rms.var + self.eps), -self.clip, self.clip)
        self.ret = np.where(done, 0.0, self.ret)
        return scaled.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"rms": self.rms.state_dict(), "ret": torch.from_numpy(self.ret.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rms.load_state_dict(state["rms"])
        ret = state["ret"].numpy().astype(np.float64)
        if ret.shape != self.ret.shape:
            raise ConfigError(
                f"reward scaler state has {ret.shape} returns: expected {self.ret.shape}"
            )
        self.ret = ret
