"""Where an unroll's values stopped being finite: :class:`StepTrace`.

The unroll (:func:`metagrad_rl.unroll.unroll`) and the checkpointed forward sweep
(:func:`metagrad_rl.recompute.forward_sweep`) record, per inner step, whether the loss, its
gradient and the updated ``theta`` were finite, as tensors (one device sync per round, not one
per step); :meth:`StepTrace.check` then names the first bad step -- a
:class:`~metagrad_rl.errors.DivergenceError` when the updates ran away, a
:class:`~metagrad_rl.errors.ConfigError` when the loss or its derivative is itself not finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metagrad_rl.errors import ConfigError, DivergenceError
from metagrad_rl.pytree import Params


class StepTrace:
    """Per inner step, flags kept as tensors (one sync per round, not one per step).

    ``loss finite``, ``gradient finite``, ``theta finite after the step``, ``gradient has an
    exact zero``, and ``max |theta|`` before the step; :meth:`check` names the first step at
    which a value stopped being finite, and whether ``theta`` had run away before it.
    """

    #: ``max |theta|`` above which a non-finite value is blamed on a diverging optimizer.
    RUNAWAY = 1e15

    def __init__(self) -> None:
        self.flags: list[Tensor] = []
        self.sizes: list[Tensor] = []
        self.where: list[tuple[int, int]] = []
        self.losses: list[Tensor] = []

    def record(
        self, r: int, j: int, loss: Tensor, grads: Sequence[Tensor], before: Params, x: Params
    ) -> None:
        self.where.append((r, j))
        self.losses.append(loss.detach())
        self.sizes.append(torch.stack([v.detach().abs().max() for v in before.values()]).max())
        self.flags.append(
            torch.stack(
                [
                    torch.isfinite(loss.detach()),
                    torch.stack([torch.isfinite(g.detach()).all() for g in grads]).all(),
                    torch.stack([torch.isfinite(v.detach()).all() for v in x.values()]).all(),
                    torch.stack([(g.detach() == 0).any() for g in grads]).any(),
                ]
            )
        )

    def check(self) -> bool:
        """Raise at the first non-finite value (:class:`DivergenceError` when the updates ran away,
        :class:`ConfigError` when the loss or its derivative is itself not finite); return
        ``saw_zero``."""
        if not self.flags:
            return False
        flags = torch.stack(self.flags).cpu()
        ok = flags[:, :3].all(dim=1)
        if bool(ok.all()):
            return bool(flags[:, 3].any())
        i = int((~ok).nonzero()[0])
        (r, j), loss, size = self.where[i], float(self.losses[i]), float(self.sizes[i])
        at = f"round {r}, inner step {j}"
        if size > self.RUNAWAY or not bool(flags[i, 2]) and bool(flags[i, :2].all()):
            raise DivergenceError(
                f"theta became non-finite at {at}: the optimizer's updates diverged (max |theta| "
                f"was {size:.3g} before this step, its loss {loss:.6g}); lower the step size"
            )
        if not bool(flags[i, 0]):
            raise ConfigError(
                f"inner_loss returned {loss} at {at}: the inner loss itself is not finite "
                f"(max |theta| {size:.3g}; check the loss for log/sqrt/division of invalid values)"
            )
        raise ConfigError(
            f"the inner gradient at {at} is not finite although the loss is ({loss:.6g}): the "
            "inner loss has an infinite derivative there (e.g. sqrt or log at 0)"
        )
