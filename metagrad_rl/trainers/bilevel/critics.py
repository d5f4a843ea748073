"""The critics' round: ``V_mix`` (mixed returns) and ``V_ex`` (extrinsic returns) regress on
``tau_k``'s minibatches, as one stacked network (one batched pass per minibatch)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torchopt
from torch import Tensor

from metagrad_rl.ppo import value_loss
from metagrad_rl.pytree import Params, clone_state
from metagrad_rl.rollout import stack_params, stacked_critic_values
from metagrad_rl.trainers.bilevel.settings import StepSettings
from metagrad_rl.trainers.bilevel.state import BilevelState, Collected, Parts
from metagrad_rl.trainers.common import explained_variance


def critic_round(
    parts: Parts, state: BilevelState, data: Collected, adv_mix: Tensor
) -> tuple[BilevelState, dict[str, float]]:
    """Value regression of both critics on the round's minibatches (clipped value loss).

    Returns the state with the new critics and their optimizer state (both copies: ``state``
    is left as it was) and the critic columns."""
    v = value_targets(parts.settings, data, adv_mix)
    mbs = state.pending.minibatches if state.pending is not None else []
    critics, critic_state = state.critics.copy(), clone_state(state.critic_state)
    total = 0.0
    for idx in mbs:
        c = critics.leaves()
        loss = value_losses(parts, stack_params([c["v_mix"], c["v_ex"]]), v, idx)
        grad = critics.flat_grad(loss)
        critic_state = optimizer_step(parts.critic_tx, (grad,), critic_state, (critics.flat,))
        total += float(loss.detach())
    new = replace(state, critics=critics, critic_state=critic_state)
    return new, critic_stats(v, total, len(mbs))


def critic_stats(v: dict[str, Any], total_loss: float, steps: int) -> dict[str, float]:
    """The critic columns: mean value loss over the round's steps and ``V_ex``'s explained
    variance (its old values against its returns, row 1 of ``v``)."""
    return {
        "v_loss": total_loss / max(steps, 1),
        "explained_variance": explained_variance(v["old"][1], v["ret"][1]),
    }


def value_targets(hp: StepSettings, data: Collected, adv_mix: Tensor) -> dict[str, Any]:
    """Flat observations, returns and old values of ``V_mix`` (mixed) and ``V_ex`` (extrinsic);
    ``ret`` and ``old`` stack both critics' (``[2, T*N]``, ``V_mix`` first)."""
    b = data.batch
    ret_mix, ret_ex = (adv_mix + b.values).reshape(-1), (data.adv_ex + data.ex_v).reshape(-1)
    old_mix, old_ex = b.values.reshape(-1), data.ex_v.reshape(-1)
    return {
        "obs": b.obs.reshape(-1, b.obs.shape[-1]),
        "ret": torch.stack([ret_mix, ret_ex]),
        "old": torch.stack([old_mix, old_ex]),
        "clip": hp.clip_coef if hp.clip_vloss else None,
    }


def value_losses(parts: Parts, critics: Params, v: dict[str, Any], idx: Tensor) -> Tensor:
    """Both critics' (clipped) value losses on minibatch ``idx``, summed, in one batched pass
    (:func:`~metagrad_rl.rollout.stacked_critic_values`); ``critics`` is
    ``stack_params([V_mix's params, V_ex's])``."""
    values = stacked_critic_values(parts.v_mix, critics, v["obs"][idx])
    # value_loss averages over both rows: twice that is the sum of the two critics' losses
    return 2.0 * value_loss(values, v["ret"][:, idx], v["old"][:, idx], v["clip"])


def optimizer_step(tx: Any, grads: Any, opt_state: Any, params: Any) -> Any:
    """One in-place optimizer step (TorchOpt's ``update`` then ``apply_updates``)."""
    updates, opt_state = tx.update(grads, opt_state, params=params, inplace=True)
    torchopt.apply_updates(params, updates, inplace=True)
    return opt_state
