"""Memory of an unroll: measure what the autograd graph holds, and refuse a too-long unroll.

Reverse-mode differentiation through ``n`` inner steps keeps every step's activations and
updates alive until the backward pass, so memory grows linearly in ``n``.
:func:`check_unroll_memory` runs the first inner step once under
:class:`GraphMemoryMeter`, multiplies by the number of steps and stops with
:class:`MemoryBudgetError` -- saying how many steps fit -- instead of letting the process be
killed mid-unroll.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError

GIB = 1024**3


class MemoryBudgetError(ConfigError):
    """The unroll is estimated to need more memory than its budget."""


class GraphMemoryMeter:
    """Counts the bytes of distinct tensor storages saved for backward inside a ``with`` block.

    A storage saved by several nodes is counted once. Parameters and inputs that exist
    anyway are counted too, so this is an upper bound on what the graph adds. The graph built
    inside must be freed by a backward pass (without ``retain_graph``): the hook keeps each
    saved tensor itself, and for a node's own output that is a cycle only a backward breaks.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._seen: set[tuple[int, int]] = set()
        self.peak_bytes = 0
        self._ctx: Any = None

    def _pack(self, t: Tensor) -> Tensor:
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.peak_bytes += s.nbytes()
        return t

    def __enter__(self) -> GraphMemoryMeter:
        if self.enabled:
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (Linux), else ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_budget_bytes() -> int | None:
    """``METAGRAD_MEMORY_BUDGET_GIB`` if set, else 80% of the available memory."""
    env = os.environ.get("METAGRAD_MEMORY_BUDGET_GIB")
    if env:
        try:
            return int(float(env) * GIB)
        except ValueError:
            raise ConfigError(
                f"METAGRAD_MEMORY_BUDGET_GIB={env!r} is invalid: expected a number of GiB"
            ) from None
    avail = available_memory_bytes()
    return None if avail is None else int(0.8 * avail)


def probe_bytes(
    problem: Any,
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rnd: Any,
    opt_state: Any,
    surrogate: Any,
) -> tuple[int, int]:
    """Graph bytes of one round's ``prepare`` and of one differentiable inner step."""
    from metagrad_rl.flat import FLAT_KEY, FlatLayout
    from metagrad_rl.unroll import _take, check_prepared, inner_step, prepare_round

    theta_k = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    eta_ = {k: v.detach().requires_grad_(True) for k, v in eta.items()}
    with GraphMemoryMeter() as m_prep:
        data = prepare_round(problem, rnd.batch, theta_k, eta_, eta_, surrogate)
    check_prepared(data, 0, rnd)
    mb = _take(data, rnd.minibatches[0])
    layout = FlatLayout(theta_k)
    x = {FLAT_KEY: layout.flatten(theta_k).detach().requires_grad_(True)}
    state = tx.init(x) if opt_state is None else layout.flatten_state(opt_state)
    with GraphMemoryMeter() as m_step:
        x1, _ = inner_step(
            problem, tx, x, state, mb, eta_, True, lambda p: layout.unflatten(p[FLAT_KEY])
        )
    # A saved-tensor hook that returns the tensor it was given makes a reference cycle
    # (output -> its grad_fn -> the saved output) that Python's GC cannot see. A backward pass
    # frees the saved tensors and so breaks the cycles; without it every probe would leak.
    outs = [v for v in (*data.values(), x1[FLAT_KEY]) if v.requires_grad]
    leaves = [*theta_k.values(), *eta_.values(), x[FLAT_KEY]]
    torch.autograd.grad([o.sum() for o in outs], leaves, allow_unused=True)
    return m_prep.peak_bytes, m_step.peak_bytes


def check_unroll_memory(
    problem: Any,
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Any],
    opt_state: Any,
    surrogate: Any,
    budget_bytes: int | None,
) -> int:
    """Estimate the unroll's graph bytes; raise :class:`MemoryBudgetError` over the budget.

    Returns the estimate: ``prepare`` bytes per round plus bytes per step times the
    steps. ``budget_bytes=None`` uses :func:`default_budget_bytes`; a
    non-positive budget is a :class:`ConfigError`.
    """
    if budget_bytes is not None and budget_bytes <= 0:
        raise ConfigError(f"memory_budget_bytes={budget_bytes} is invalid: expected > 0")
    budget = default_budget_bytes() if budget_bytes is None else budget_bytes
    steps = sum(len(r.minibatches) for r in rounds)
    if budget is None:
        return -1
    per_round, per_step = probe_bytes(problem, tx, theta, eta, rounds[0], opt_state, surrogate)
    estimate = per_round * len(rounds) + per_step * steps
    if estimate > budget:
        fit = max(0, (budget - per_round * len(rounds)) // max(per_step, 1))
        raise MemoryBudgetError(
            f"unrolling {steps} inner steps needs about {estimate / 2**20:.0f} MiB "
            f"({per_step / 2**20:.2f} MiB per step), over the budget of "
            f"{budget / 2**20:.0f} MiB: about {fit} steps fit; unroll fewer epochs, "
            "minibatches or rounds, or raise the budget"
        )
    return estimate
