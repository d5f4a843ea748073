"""Union sums for the advantage statistics of a plain round, without a collective per step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def plain_sum(x: Tensor) -> Tensor:
    """``x`` summed over the workers by a plain all-reduce (a copy, off the graph)."""
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


class RoundSums:
    """``sum_over_workers`` for :func:`~metagrad_rl.advantages.normalize` in a plain round,
    without a collective per minibatch.

    ``normalize`` asks for two union sums per minibatch: ``[sum x, count]``, then
    ``sum (x - mean)^2``. The advantages are constants during a plain round, so
    :meth:`prepare` takes every minibatch's first sums in one all-reduce, then every second
    sum in another, with the same arithmetic; the calls during the round get them back in
    order. Without prepared sums (or once they are used up) a call is a plain all-reduce.
    """

    def __init__(self) -> None:
        self.queue: list[Tensor] = []

    def prepare(self, advantages: Sequence[Tensor]) -> None:
        firsts = []
        for x in advantages:
            count = torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)
            firsts.append(torch.stack([x.sum(), count]))
        first = plain_sum(torch.stack(firsts))
        means = first[:, 0] / first[:, 1]
        seconds = [(x - m).square().sum() for x, m in zip(advantages, means, strict=True)]
        second = plain_sum(torch.stack(seconds))
        self.queue = [t for pair in zip(first.unbind(), second.unbind()) for t in pair]
        self.queue.reverse()

    def __call__(self, x: Tensor) -> Tensor:
        if self.queue:
            return self.queue.pop()
        return plain_sum(x)
