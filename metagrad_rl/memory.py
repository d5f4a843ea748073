"""Memory of an unroll: measure what the autograd graph holds, and refuse a too-long unroll.

Reverse-mode differentiation through ``n`` inner steps keeps every step's activations and
updates alive until the backward pass, so memory grows linearly in ``n``; the checkpointed
pass (:mod:`metagrad_rl.recompute`) keeps about ``sqrt(n)`` steps' graph instead.
:func:`check_unroll_memory` runs the first inner step once under
:class:`GraphMemoryMeter`, estimates both modes (:func:`estimate_unroll_bytes`) and stops with
:class:`MemoryBudgetError` -- giving both estimates and which fits -- instead of letting the
process be killed mid-unroll.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError
from metagrad_rl.flat import FLAT_KEY, FlatLayout
from metagrad_rl.inputs import check_prepared
from metagrad_rl.meta_problem import minibatch_of, round_extras
from metagrad_rl.options import segment_length
from metagrad_rl.unroll import inner_step, prepare_round

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


def tree_bytes(tree: Any) -> int:
    """Bytes of the tensors in a pytree (dicts, lists, optimizer states)."""
    leaves, _ = torchopt.pytree.tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, Tensor))


def probe_bytes(
    problem: Any,
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rnd: Any,
    opt_state: Any,
    surrogate: Any,
) -> tuple[int, int, int, int]:
    """Graph bytes of one round's ``prepare`` and of one differentiable inner step, and the
    bytes of one checkpoint (parameters and optimizer state)
    and of one round's stored prepared data and round start."""
    theta_k = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    eta_ = {k: v.detach().requires_grad_(True) for k, v in eta.items()}
    with GraphMemoryMeter() as m_prep:
        data = prepare_round(problem, rnd.batch, theta_k, eta_, eta_, surrogate)
    check_prepared(data, 0, rnd)
    mb = minibatch_of(data, rnd.minibatches, 0, round_extras(problem, data, rnd.minibatches))
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
    x_bytes = tree_bytes(x)
    per_checkpoint = x_bytes + tree_bytes(state)
    per_round_stored = tree_bytes(dict(data)) + x_bytes
    return m_prep.peak_bytes, m_step.peak_bytes, per_checkpoint, per_round_stored


def estimate_unroll_bytes(
    problem: Any,
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Any],
    opt_state: Any,
    surrogate: Any,
    checkpoint_every: int | str = "auto",
) -> dict[str, int]:
    """Estimated bytes of the unroll kept whole (``"stored"``) and checkpointed every ``k``
    steps (``"checkpointed"``, ``k`` as ``checkpoint_every``; also returned as ``"k"``).

    Stored: ``prepare``'s graph per round plus one step's graph per step. Checkpointed: one
    round's ``prepare`` graph and ``k`` steps' graph at a time, plus the checkpoints (every
    ``k`` steps and each round start) and each round's stored prepared data.
    """
    steps = sum(len(r.minibatches) for r in rounds)
    per_round, per_step, per_ckpt, per_data = probe_bytes(
        problem, tx, theta, eta, rounds[0], opt_state, surrogate
    )
    k = segment_length(checkpoint_every, steps)
    n_ckpt = sum(-(-len(r.minibatches) // k) for r in rounds)
    return {
        "stored": per_round * len(rounds) + per_step * steps,
        "checkpointed": per_round
        + per_step * min(k, steps)
        + per_ckpt * n_ckpt
        + per_data * len(rounds),
        "k": k,
        "per_step": per_step,
        "per_round": per_round,
    }


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.0f} MiB"


def check_unroll_memory(
    problem: Any,
    tx: torchopt.base.GradientTransformation,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Any],
    opt_state: Any,
    surrogate: Any,
    budget_bytes: int | None,
    checkpoint_every: int | str | None = None,
) -> int:
    """Estimate the unroll's bytes; raise :class:`MemoryBudgetError` over the budget.

    Returns the estimate of the chosen mode (``checkpoint_every=None``: the stored graph,
    else the checkpointed pass; :func:`estimate_unroll_bytes`). The error gives both, and
    says which fits. ``budget_bytes=None`` uses :func:`default_budget_bytes`; a non-positive
    budget is a :class:`ConfigError`.
    """
    if budget_bytes is not None and budget_bytes <= 0:
        raise ConfigError(f"memory_budget_bytes={budget_bytes} is invalid: expected > 0")
    budget = default_budget_bytes() if budget_bytes is None else budget_bytes
    steps = sum(len(r.minibatches) for r in rounds)
    if budget is None:
        return -1
    mode = "auto" if checkpoint_every is None else checkpoint_every
    est = estimate_unroll_bytes(problem, tx, theta, eta, rounds, opt_state, surrogate, mode)
    stored, ckpt = est["stored"], est["checkpointed"]
    estimate = stored if checkpoint_every is None else ckpt
    if estimate <= budget:
        return estimate
    rounds_txt = f"{len(rounds)} round{'s' if len(rounds) > 1 else ''} ({steps} inner steps)"
    both = (
        f"{rounds_txt} need about {_gib(stored)} stored ({est['per_step'] / 2**20:.2f} MiB per "
        f"step), {_gib(ckpt)} with checkpoint_every={mode!r}; the budget is {_gib(budget)}"
    )
    fit = max(0, (budget - est["per_round"] * len(rounds)) // max(est["per_step"], 1))
    both += f" (about {fit} steps fit stored)"
    if checkpoint_every is None and ckpt <= budget:
        hint = f": pass checkpoint_every={mode!r} (the same numbers, recomputed)"
    else:
        hint = ": unroll fewer epochs, minibatches or rounds, or raise the budget"
    raise MemoryBudgetError(both + hint)
