r"""Eq 11-14 as the paper writes them, for SGD inner steps, with ``torch.func`` -- matrix-free.

This is the *independent* computation the autograd terms of :mod:`metagrad_rl.metagrad` are
checked against. For SGD, ``theta_{j+1} = theta_j - alpha grad_theta L_in(theta_j, ...)``, and
with ``L_in = -E[ratio A^IN]`` the paper's one-step terms read

.. math::

    \text{Eq 12} = \frac{\partial L_{out}}{\partial \theta_{k+1}}
        \Big(-\alpha\,\frac{\partial^2 L_{in}}{\partial\theta\,\partial\eta}\Big)
        = \frac{\partial L_{out}}{\partial \theta_{k+1}}
        \Big(\alpha\,\mathbb{E}\Big[\sum_t \frac{\partial^2 \log\pi}
        {\partial\theta\,\partial\eta}\hat A^{IN}_t\Big]\Big)

    \text{Eq 14} = \frac{\partial L_{out}}{\partial \theta_{k+1}}
        \Big(I + \alpha\,\mathbb{E}\Big[\sum_t \frac{\partial^2\log\pi}{\partial\theta^2}
        \hat A^{IN}_t\Big]\Big)\frac{d\theta_k}{d\eta}

For many steps and rounds the same products are chained backwards: an adjoint
``a_j = dL_out/dtheta_j`` is carried by the ``(I - alpha H_j)`` recursion
(:func:`second_derivative_products`, forward-over-reverse ``jvp(grad)``), and each step adds
``-alpha D_eta(a^T grad_theta L_in)`` to the term of the path it belongs to. Nothing here
materialises a Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp

from metagrad_rl.errors import ConfigError
from metagrad_rl.meta_problem import InnerSurrogate, MetaProblem, Round, minibatch_of, round_extras
from metagrad_rl.pytree import BatchDict, Params

Tree = Any


def _zeros(p: Mapping[str, Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in p.items()}


def _axpy(alpha: float, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Params:
    """``y + alpha x``."""
    return {k: y[k] + alpha * x[k] for k in y}


def second_derivative_products(
    f: Callable[..., Tensor], args: tuple[Tree, ...], v: Tree
) -> tuple[Tree, ...]:
    """``D_x (v^T grad_{x_0} f)`` for every argument ``x`` of ``f``, matrix-free.

    Forward-over-reverse: the JVP of ``grad(f, argnums=all)`` along ``(v, 0, ..., 0)``. The
    first output is the Hessian-vector product ``H_{x_0 x_0} v``; the others are the mixed
    second-derivative products ``(d^2 f / dx_0 dx_i)^T v``.
    """
    argnums = tuple(range(len(args)))

    def g(x0: Tree) -> tuple[Tree, ...]:
        return grad(f, argnums=argnums)(x0, *args[1:])

    out = jvp(g, (args[0],), (v,))
    return out[1]


def mixed_second_order_product(
    f: Callable[[Params, Params], Tensor],
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    v: Mapping[str, Tensor],
    method: str = "reverse",
) -> Params:
    """Eq 12's primitive: ``D_eta (v^T grad_theta f(theta, eta))``, matrix-free.

    ``method="reverse"`` (default): reverse-over-reverse with ``torch.autograd`` -- the
    gradient of ``v . grad_theta f`` (built with ``create_graph``) w.r.t. ``eta``;
    ``"jvp"``: forward-over-reverse with ``torch.func`` (``jvp`` of ``grad_eta f`` along
    ``v``). Same numbers; on the small networks of RL the first is about 2.3x faster
    (``benchmarks/compare_terms.py`` measures both against one gradient).
    """
    if method == "jvp":
        return jvp(lambda th: grad(f, argnums=1)(th, dict(eta)), (dict(theta),), (dict(v),))[1]
    if method != "reverse":
        raise ConfigError(f"method={method!r} is invalid: expected 'reverse' or 'jvp'")
    th = {k: t.detach().requires_grad_(True) for k, t in theta.items()}
    et = {k: t.detach().requires_grad_(True) for k, t in eta.items()}
    g = torch.autograd.grad(f(th, et), list(th.values()), create_graph=True)
    dot = torch.stack([(gi * v[k]).sum() for gi, k in zip(g, th)]).sum()
    if not dot.requires_grad:
        return _zeros(et)
    out = torch.autograd.grad(dot, list(et.values()), allow_unused=True)
    return {k: torch.zeros_like(et[k]) if o is None else o for k, o in zip(et, out)}


def _inner_fn(
    problem: MetaProblem, batch: BatchDict, minibatches: Sequence[Tensor], j: int
) -> Callable[..., Tensor]:
    """``L_in(theta, theta_old, eta_pol, eta_old, eta_rew)`` on minibatch ``j``."""

    def f(
        theta: Params, theta_old: Params, eta_pol: Params, eta_old: Params, eta_rew: Params
    ) -> Tensor:
        data = problem.prepare(
            batch, eta_reward=eta_rew, theta_old=theta_old, eta_policy_old=eta_old
        )
        mb = minibatch_of(data, minibatches, j, round_extras(problem, data, minibatches))
        return problem.inner_loss(theta, mb, eta_policy=eta_pol)

    return f


def _sgd_trajectory(
    problem: MetaProblem,
    lr: float,
    theta: Mapping[str, Tensor],
    eta: Params,
    rounds: Sequence[Round],
) -> tuple[list[Params], list[list[Params]], Params]:
    """The SGD trajectory, no graph kept: each round's start, each step's ``theta_j`` (per
    round) and the end ``theta_{k+1}``."""
    starts: list[Params] = []
    thetas: list[list[Params]] = []
    th = {k: v.detach() for k, v in theta.items()}
    for rnd in rounds:
        starts.append(th)
        seq = []
        for j in range(len(rnd.minibatches)):
            seq.append(th)
            g = grad(_inner_fn(problem, rnd.batch, rnd.minibatches, j))(
                th, starts[-1], eta, eta, eta
            )
            th = _axpy(-lr, g, th)
        thetas.append(seq)
    return starts, thetas, th


def explicit_sgd_terms(
    problem: MetaProblem,
    lr: float,
    theta: Mapping[str, Tensor],
    eta: Mapping[str, Tensor],
    rounds: Sequence[Round],
    outer_batch: BatchDict,
    surrogate: InnerSurrogate | str = InnerSurrogate.PAPER,
    denominator: str = "theta_k",
) -> dict[str, Params]:
    """Eq 11-14 and their total for plain SGD (``torchopt.sgd(lr)``) by the explicit formulas.

    Returns ``{"eq11", "eq12", "eq13", "eq14", "total"}``, gradients of ``L_out`` w.r.t.
    ``eta``, to be compared with :func:`metagrad_rl.metagrad.meta_gradient`.
    """
    surrogate = InnerSurrogate(surrogate)
    paper = surrogate is InnerSurrogate.PAPER
    eta = {k: v.detach() for k, v in eta.items()}
    starts, thetas, theta_next = _sgd_trajectory(problem, lr, theta, eta, rounds)
    theta_den = starts[-1] if denominator == "theta_k" else theta_next

    # ---- outer loss: Eq 11 and the adjoint dL_out/dtheta_{k+1}
    def outer(theta_: Params, eta_: Params) -> Tensor:
        return problem.outer_loss(
            theta_, outer_batch, eta_policy=eta_, theta_den=theta_den, eta_den=eta
        )

    a, eq11 = grad(outer, argnums=(0, 1))(theta_next, eta)
    terms = {"eq11": eq11, "eq12": _zeros(eta), "eq13": _zeros(eta), "eq14": _zeros(eta)}

    # ---- backward over rounds and steps: the (I - alpha H) recursion
    for r in range(len(rounds) - 1, -1, -1):
        last = r == len(rounds) - 1
        a_start = _zeros(a)  # contributions to dL/dtheta_k through the ratio's denominator
        for j in range(len(rounds[r].minibatches) - 1, -1, -1):
            f = _inner_fn(problem, rounds[r].batch, rounds[r].minibatches, j)
            h, h_old, d_pol, d_old, d_rew = second_derivative_products(
                f, (thetas[r][j], starts[r], eta, eta, eta), a
            )
            policy_part = _axpy(1.0, d_old, d_pol) if paper else d_pol
            if last:
                terms["eq12"] = _axpy(-lr, policy_part, terms["eq12"])
                terms["eq13"] = _axpy(-lr, d_rew, terms["eq13"])
            else:
                terms["eq14"] = _axpy(-lr, _axpy(1.0, d_rew, policy_part), terms["eq14"])
            if paper:
                a_start = _axpy(-lr, h_old, a_start)
            a = _axpy(-lr, h, a)
        a = _axpy(1.0, a_start, a)
    terms["total"] = {
        k: terms["eq11"][k] + terms["eq12"][k] + terms["eq13"][k] + terms["eq14"][k] for k in eta
    }
    return terms
