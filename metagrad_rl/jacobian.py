r"""How strongly one policy round amplifies a change of its start: ``||d theta_{k+1}/d theta_k||``.

With ``R`` rounds the Eq 14 path of the meta-gradient carries ``d theta_k / d eta`` through the
last round's Jacobian ``J = d theta_{k+1} / d theta_k`` (and ``R`` rounds chain ``R - 1`` such
Jacobians), so the spectral norm of ``J`` bounds how much the recursion can grow per round.

:func:`round_map` is the function that is differentiated: one policy round ``tau_k`` (its batch
and ordered minibatches) run from a flat ``theta_k`` with ``eta`` and the optimizer state at the
round start held as constants,

.. math:: F(\theta_k) = \theta_{k+1} = U_{S}\circ\dots\circ U_{1}(\theta_k;\,
          \mathrm{prep}(\tau_k, \theta_k, \eta)),

where ``U_j`` is the optimizer's differentiable step on minibatch ``j`` (exactly
:func:`metagrad_rl.unroll.inner_step`) and ``prep`` is the problem's ``prepare``. With
``InnerSurrogate.PAPER`` (the default, the engine's semantics for Eq 12 and Eq 14) the PPO
ratio's denominator ``log pi_{theta_k, eta}(a|s)`` is a *function of* ``theta_k``: a stop-gradient
for each inner step's gradient, but it moves with ``theta_k`` when ``F`` is differentiated (so at
the round start the ratio is identically 1 in ``theta_k``). With ``InnerSurrogate.DETACHED`` the
denominator is a constant: its value at the ``theta_k`` the map was built at, also when ``F`` is
evaluated elsewhere (as :class:`metagrad_rl.unroll.Anchor` freezes it for finite differences).
The optimizer state inside the round (Adam's moments, the step count of the lr schedule) evolves
with the steps and is differentiated; only its value at the round start is a constant.

:func:`spectral_norm` estimates ``sigma_max(J)`` matrix-free by power iteration on ``J^T J``:
``J^T w`` is one reverse pass through the round (``torch.autograd.grad``), ``J v`` the
double-backward trick (``J v = d/du <J^T u, v>``, the reverse pass of the reverse pass), so the
unrolled round is built once and each iteration costs two backward passes; ``J`` is never formed.

:func:`adam_frozen_second_moment` is Adam with the same values whose second moment is a constant
for differentiation: its round Jacobian is the preconditioned dynamics without the derivative of
Adam's normalisation ``1 / sqrt(v)`` (``benchmarks/jacobian_spectrum.py`` compares the two).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor
from torchopt.typing import ScalarOrSchedule, Schedule

from metagrad_rl.errors import ConfigError
from metagrad_rl.flat import FLAT_KEY, FlatLayout
from metagrad_rl.meta_problem import InnerSurrogate, MetaProblem, Round
from metagrad_rl.pytree import Params, detach, detach_state, take
from metagrad_rl.unroll import inner_step, prepare_round


def round_map(
    problem: MetaProblem,
    tx: torchopt.base.GradientTransformation,
    theta_like: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rnd: Round,
    opt_state: Any = None,
    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER,
) -> tuple[Callable[[Tensor], Tensor], FlatLayout]:
    """``F: flat theta_k -> flat theta_{k+1}`` of one round (see the module doc) and its layout.

    ``theta_like`` gives the names and shapes; ``opt_state`` is the per-tensor optimizer state
    at the round start (``tx.init`` when None), detached and held constant; ``eta`` is detached.
    ``F`` keeps its graph (``create_graph=True`` in every step), so it can be differentiated
    twice.
    """
    layout = FlatLayout(theta_like)
    eta_c = detach(eta)
    x0 = {FLAT_KEY: layout.flatten(theta_like).detach()}
    state0 = tx.init(x0) if opt_state is None else layout.flatten_state(opt_state)
    state0 = detach_state(state0)
    sur = InnerSurrogate(surrogate)

    def view(x: Params) -> Params:
        return layout.unflatten(x[FLAT_KEY])

    # DETACHED: the denominator is a constant, its value at the given theta_k (not at F's input)
    frozen = (detach(theta_like), eta_c)

    def F(theta_flat: Tensor) -> Tensor:
        if not theta_flat.requires_grad:  # the inner steps differentiate w.r.t. it
            theta_flat = theta_flat.detach().requires_grad_(True)
        x = {FLAT_KEY: theta_flat}
        data = prepare_round(problem, rnd.batch, view(x), eta_c, eta_c, sur, frozen)
        # the inner gradient must not reach the denominator computed from theta_k (as in
        # metagrad_rl.unroll.unroll): the first step gets its own node, equal in value
        x = {k: v.view_as(v) for k, v in x.items()}
        state = state0
        for idx in rnd.minibatches:
            mb = take(data, idx)
            x, state = inner_step(problem, tx, x, state, mb, eta_c, True, view)
        return x[FLAT_KEY]

    return F, layout


class SpectralNorm(NamedTuple):
    """Result of :func:`spectral_norm`.

    ``sigma`` is ``||J v||`` for the final unit vector ``v`` (a lower bound on ``sigma_max``
    that power iteration raises monotonically); ``residual`` is
    ``||J^T J v - sigma^2 v|| / sigma^2`` (0 at an exact top singular vector: the convergence
    measure); ``rel_change`` the relative change of ``sigma`` in the last iteration;
    ``history`` every iteration's ``sigma``; ``vector`` the next iterate
    ``J^T J v / ||J^T J v||`` (the best estimate of the top right singular vector; a warm
    start for another call).
    """

    sigma: float
    iterations: int
    residual: float
    rel_change: float
    converged: bool
    history: list[float]
    vector: Tensor


def spectral_norm(
    F: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    iters: int = 30,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SpectralNorm:
    r"""Largest singular value of ``J = dF/dx`` at ``x0`` by power iteration on ``J^T J``.

    Each iteration: ``w = J v`` (double backward), ``z = J^T w`` (backward),
    ``sigma = ||w||``, ``v <- z / ||z||``. Stops after ``iters`` iterations or once the residual
    ``||z - sigma^2 v|| / sigma^2`` is below ``tol``. Power iteration converges like
    ``(sigma_2 / sigma_1)^{2t}``; the residual bounds the error of ``sigma^2`` as an eigenvalue
    of ``J^T J`` (not which one), so read it together with ``history``.
    """
    if iters < 1:
        raise ConfigError(f"iters={iters} is invalid: expected >= 1")
    x = x0.detach().clone().requires_grad_(True)
    y = F(x)
    if y.shape != x.shape:
        raise ConfigError(f"F maps shape {tuple(x.shape)} to {tuple(y.shape)}: expected square J")
    u = torch.zeros_like(y, requires_grad=True)
    (jt_u,) = torch.autograd.grad(y, x, u, create_graph=True)

    def jvp(v: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
        return out

    def vjp(w: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(y, x, w, retain_graph=True)
        return out

    if v0 is None:
        v0 = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    v = v0.detach() / v0.norm()
    history: list[float] = []
    residual = rel_change = math.inf
    sigma = 0.0
    it = 0
    while it < iters:
        it += 1
        w = jvp(v)
        z = vjp(w)
        sq = float(w @ w)
        sigma_new = math.sqrt(sq)
        rel_change = abs(sigma_new - sigma) / sigma_new if sigma_new > 0 else 0.0
        sigma = sigma_new
        history.append(sigma)
        nz = float(z.norm())
        if sq == 0.0 or nz == 0.0:  # J v = 0: J is 0 on this vector (and v is not improved)
            residual = 0.0 if nz == 0.0 else math.inf
            break
        residual = float((z - sq * v).norm()) / sq
        v = (z / nz).detach()
        if residual < tol:
            break
    return SpectralNorm(sigma, it, residual, rel_change, residual < tol, history, v)


def round_spectral_norm(
    problem: MetaProblem,
    tx: torchopt.base.GradientTransformation,
    theta_k: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rnd: Round,
    opt_state: Any = None,
    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER,
    **power: Any,
) -> SpectralNorm:
    """``||d theta_{k+1} / d theta_k||_2`` of one round (:func:`round_map`, then
    :func:`spectral_norm` with ``power`` as its keywords)."""
    F, layout = round_map(problem, tx, theta_k, eta, rnd, opt_state, surrogate)
    return spectral_norm(F, layout.flatten(theta_k), **power)


def adam_frozen_second_moment(
    lr: ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> torchopt.base.GradientTransformation:
    r"""``torchopt.adam`` in value, with ``v`` built from detached gradients.

    The update is Adam's,
    ``-lr_t m_hat_t / (sqrt(v_hat_t + eps_root) + eps)`` with ``m_t = b1 m_{t-1} + (1 - b1) g_t``
    and ``v_t = b2 v_{t-1} + (1 - b2) stopgrad(g_t)^2``, so differentiating an unroll through it
    gives the Jacobian of the preconditioned steps ``diag(1 / (sqrt(v_hat) + eps))`` with the
    preconditioner held at its values: the part of Adam's derivative that comes from
    ``d(1 / sqrt(v)) / d theta`` is left out, the momentum's and the curvature's are kept.
    ``init`` and the state are ``torchopt.adam``'s (a state saved from one loads in the other);
    ``lr`` is a number or a schedule of the step count, as in ``torchopt.adam``.
    """
    ref = torchopt.adam(lr, betas=(b1, b2), eps=eps, eps_root=eps_root)
    lr_fn: Schedule = lr if callable(lr) else (lambda _count: lr)

    def update_fn(
        updates: Any, state: Any, *, params: Any = None, inplace: bool = True
    ) -> tuple[Any, Any]:
        del params, inplace  # never in place: the update keeps its graph
        adam, sched = state  # sched: ScaleByScheduleState(count) or EmptyState (constant lr)
        grads, treedef = torchopt.pytree.tree_flatten(updates)
        mu = [b1 * m + (1 - b1) * g for m, g in zip(adam.mu, grads)]
        nu = [b2 * v + (1 - b2) * g.detach().square() for v, g in zip(adam.nu, grads)]
        count = [c + 1 for c in adam.count]
        scheduled = "count" in getattr(sched, "_fields", ())  # (EmptyState has tuple.count)
        lr_count = list(sched.count) if scheduled else count
        out = [
            -lr_fn(s) * (m / (1 - b1**c)) / ((v / (1 - b2**c) + eps_root).sqrt() + eps)
            for m, v, c, s in zip(mu, nu, count, lr_count)
        ]
        if scheduled:
            sched = type(sched)(count=[s + 1 for s in sched.count])
        new_state = (type(adam)(mu=mu, nu=nu, count=count), sched)
        return torchopt.pytree.tree_unflatten(treedef, out), new_state

    return torchopt.base.GradientTransformation(ref.init, update_fn)
