"""The engine's input checks: each bad argument of :func:`~metagrad_rl.metagrad.meta_gradient`
and its relatives is one :class:`~metagrad_rl.errors.ConfigError` line naming the value and
what is accepted, raised before any work; a problem's ``prepare`` output is checked as each
round produces it (:func:`check_prepared`). The settings' own checks are
:class:`~metagrad_rl.options.MetaGradOptions`'s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchopt
from torch import Tensor

from metagrad_rl.errors import ConfigError
from metagrad_rl.meta_problem import MetaProblem, Round
from metagrad_rl.optim import check_differentiable
from metagrad_rl.options import MetaGradOptions
from metagrad_rl.pytree import BatchDict


def check_params(
    name: str, params: Any, reference: Mapping[str, tuple[int, ...]] | None = None
) -> None:
    """A dict of floating tensors; with ``reference`` (name -> shape), the same names and shapes."""
    if not isinstance(params, Mapping) or len(params) == 0:
        raise ConfigError(
            f"{name} must be a non-empty dict of tensors, got {type(params).__name__}"
        )
    for k, v in params.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise ConfigError(
                f"{name}[{k!r}] must be a floating-point tensor, got {type(v).__name__}"
            )
        if not bool(torch.isfinite(v.detach()).all()):
            n_bad = int((~torch.isfinite(v.detach())).sum())
            raise ConfigError(
                f"{name}[{k!r}] has {n_bad} NaN/inf values of {v.numel()}: expected finite input"
            )
    if reference is None:
        return
    missing = sorted(set(reference) - set(params))
    extra = sorted(set(params) - set(reference))
    if missing or extra:
        raise ConfigError(
            f"{name} names do not match: missing {missing}, unexpected {extra}; "
            f"expected {sorted(reference)}"
        )
    for k, v in params.items():
        if tuple(v.shape) != tuple(reference[k]):
            raise ConfigError(
                f"{name}[{k!r}] has shape {tuple(v.shape)}, expected {tuple(reference[k])}"
            )


def check_batch(name: str, batch: Any) -> None:
    """A non-empty dict of tensors with no NaN or inf."""
    if not isinstance(batch, Mapping) or len(batch) == 0:
        raise ConfigError(f"{name} must be a non-empty dict of tensors, got {batch!r:.80}")
    for k, v in batch.items():
        if not isinstance(v, Tensor):
            raise ConfigError(f"{name}[{k!r}] must be a tensor, got {type(v).__name__}")
        if v.numel() == 0:
            raise ConfigError(f"{name}[{k!r}] is empty (shape {tuple(v.shape)}): expected data")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            n_bad = int((~torch.isfinite(v)).sum())
            raise ConfigError(f"{name}[{k!r}] has {n_bad} NaN/inf values: expected finite data")


def check_optimizer(tx: Any) -> None:
    """A TorchOpt ``GradientTransformation`` (``torchopt.sgd``, ``torchopt.adam``, ...)."""
    if not isinstance(tx, torchopt.base.GradientTransformation):
        raise ConfigError(
            f"optimizer {type(tx).__name__} is not a TorchOpt GradientTransformation: "
            "expected e.g. torchopt.sgd(lr) or torchopt.adam(lr) (not a torch.optim optimizer)"
        )


def _as_index(idx: Any, where: str) -> Tensor:
    """A minibatch as a 1-d integer tensor (a list or range of ints is accepted)."""
    if not isinstance(idx, Tensor):
        try:
            idx = torch.as_tensor(list(idx))
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(
                f"{where} is a {type(idx).__name__}: expected a 1-d tensor or list of int indices"
            ) from None
    if idx.numel() == 0:
        raise ConfigError(f"{where} is empty: expected indices")
    if idx.dtype in (torch.bool, torch.uint8) or idx.is_floating_point() or idx.dim() != 1:
        raise ConfigError(
            f"{where} has dtype {idx.dtype} and shape {tuple(idx.shape)}: expected a 1-d "
            "integer tensor or list of int indices"
        )
    if bool((idx < 0).any()):
        bad = int(idx[idx < 0][0])
        raise ConfigError(
            f"{where} holds the negative index {bad}: expected indices 0 .. n-1 into the "
            "round's samples (a negative index would wrap to the end of the batch)"
        )
    if idx.unique().numel() != idx.numel():
        values, counts = idx.unique(return_counts=True)
        bad = int(values[counts > 1][0])
        raise ConfigError(
            f"{where} holds the index {bad} more than once: expected each sample at most once "
            "per minibatch (to weight samples, put the weights in the batch)"
        )
    return idx


def check_rounds(rounds: Any) -> list[Round]:
    """At least one round, each with at least one non-empty minibatch of distinct indices >= 0.

    Returns the rounds with every minibatch as a 1-d integer tensor (lists of ints are
    accepted).
    """
    if not isinstance(rounds, Sequence) or len(rounds) == 0:
        raise ConfigError("rounds is empty: expected at least one Round(batch, minibatches)")
    out = []
    for r, rnd in enumerate(rounds):
        if not isinstance(rnd, Round):
            raise ConfigError(f"rounds[{r}] is a {type(rnd).__name__}: expected a Round")
        check_batch(f"rounds[{r}].batch", rnd.batch)
        if len(rnd.minibatches) == 0:
            raise ConfigError(f"rounds[{r}] has no minibatches: expected at least one step")
        mbs = [
            _as_index(idx, f"rounds[{r}].minibatches[{j}]") for j, idx in enumerate(rnd.minibatches)
        ]
        out.append(Round(rnd.batch, mbs))
    return out


def check_outer_batch(outer_batch: BatchDict | None) -> BatchDict:
    """The outer batch, or ``{}`` when none is given (an ``outer_loss`` that reads no data)."""
    if outer_batch is None or (isinstance(outer_batch, Mapping) and len(outer_batch) == 0):
        return {}
    check_batch("outer_batch", outer_batch)
    return outer_batch


def check_outer_loss(loss: Any) -> None:
    """The outer loss is one finite number."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ConfigError(f"outer_loss returned {shape}: expected a scalar tensor")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ConfigError(
            f"outer_loss returned {float(loss.detach())} at theta_(k+1): the outer loss itself "
            "is not finite (every inner step was)"
        )


def check_start_inputs(
    problem: MetaProblem,
    optimizer: Any,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    opt_state: Any,
    options: MetaGradOptions,
) -> list[str]:
    """One :class:`ConfigError` for the first bad argument of :func:`start_meta_gradient`;
    returns the optimizer's graph cuts allowed by ``options.allow_graph_cuts``."""
    check_optimizer(optimizer)
    cuts = check_differentiable(optimizer, options.allow_graph_cuts)
    check_params("theta", theta, problem.theta_spec)
    check_params("eta", eta, problem.eta_spec)
    if opt_state is not None and not isinstance(opt_state, tuple):
        raise ConfigError(
            f"opt_state is a {type(opt_state).__name__}: expected optimizer.init(theta)"
        )
    return cuts


def check_prepared(data: Any, r: int, rnd: Round) -> None:
    """``prepare``'s output: a dict of finite tensors whose leading dimension the indices fit.

    A 0-d tensor is a per-round quantity shared by every minibatch; anything else must have
    the minibatch index as its leading dimension.
    """
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"prepare returned a {kind} for round {r}: expected a dict of tensors")
    need = 1 + max(int(idx.max()) for idx in rnd.minibatches)
    for k, v in data.items():
        if not isinstance(v, Tensor):
            raise ConfigError(
                f"prepare returned {type(v).__name__} for {k!r} (round {r}): expected a tensor"
            )
        if v.dim() > 0 and v.shape[0] < need:
            raise ConfigError(
                f"prepare returned {k!r} with shape {tuple(v.shape)} for round {r}, but the "
                f"minibatch indices reach {need - 1}: per-sample quantities need the sample "
                "index as their leading dimension (a 0-d tensor is shared by every minibatch)"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v.detach()).all()):
            raise ConfigError(
                f"prepare returned non-finite values in {k!r} for round {r} "
                f"({int((~torch.isfinite(v.detach())).sum())} of {v.numel()})"
            )
