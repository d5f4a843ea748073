r"""One inner step's adjoint pullback in mixed mode: first-order optimizer, forward-over-reverse
Hessian products (``second_order="forward"`` of the checkpointed reverse pass).

An inner step is ``x_{j+1}, s_{j+1} = apply(x_j, update(g_j, s_j, x_j))`` with
``g_j = grad_x L(x_j, eta, d)`` (``L`` the inner loss on one minibatch of the round's prepared
data ``d``). Given the adjoints ``(a_x', a_s')`` of the step's outputs, the pullback is

1. **through the optimizer, first order**: one ``torch.autograd.grad`` of the update
   (clip, Adam, ...) at the stored ``g_j`` gives ``a_g`` (the adjoint of the gradient),
   ``a_s`` and the direct part ``a_x^opt`` of the parameters' adjoint;
2. **through the gradient, forward-over-reverse**: the joint Hessian of ``L`` in
   ``z = (x, eta, d)`` is symmetric, so the products every path needs come out of one
   ``torch.func.jvp`` of ``grad_z L`` along ``(a_g, 0, 0)``
   (:func:`metagrad_rl.explicit.second_derivative_products`):

   .. math:: a_x = a_x^{opt} + H_{xx} a_g, \qquad
             \bar\eta \mathrel{+}= H_{\eta x} a_g, \qquad \bar d \mathrel{+}= H_{d x} a_g.

This is what MixFlow-MG (Kemaev et al. 2025) does for truncated unrolls; here it replaces the
reverse-over-reverse pullback of a recomputed segment (:mod:`metagrad_rl.recompute`), which
re-runs the segment with ``create_graph=True`` and differentiates its gradient again. The
segment's graph is then never built: what is kept is each step's ``x_j``, ``s_j`` and ``g_j``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torchopt
from torch import Tensor

from metagrad_rl.explicit import second_derivative_products
from metagrad_rl.meta_problem import MetaProblem, minibatch_of, round_extras
from metagrad_rl.pytree import Params

View = Callable[[Params], Params] | None


def inner_gradient(
    problem: MetaProblem, x: Params, minibatch: Mapping[str, Tensor], eta: Params, view: View
) -> Params:
    """``g_j = grad_x L(x_j, eta, minibatch)``, first order (no graph kept)."""
    xl = {k: v.detach().requires_grad_(True) for k, v in x.items()}
    theta = xl if view is None else view(xl)
    loss = problem.inner_loss(theta, minibatch, eta_policy=eta)
    names = list(xl)
    return dict(zip(names, torch.autograd.grad(loss, [xl[n] for n in names])))


def optimizer_step(
    tx: torchopt.base.GradientTransformation, x: Params, state: Any, grads: Params
) -> tuple[Params, Any]:
    """``x_{j+1}, s_{j+1}`` from ``g_j``: the update of :func:`metagrad_rl.unroll.inner_step`."""
    updates, state = tx.update(grads, state, params=x, inplace=False)
    return torchopt.apply_updates(x, updates, inplace=False), state


class OptimizerPullback:
    """The optimizer's part of step ``j`` on fresh leaves, for first-order pullbacks.

    :meth:`pull` takes the adjoints of ``x_{j+1}`` (by name) and of ``s_{j+1}`` (by state-leaf
    index; ``None`` or missing = 0) and returns ``(a_g, a_x^opt, a_s)``.
    """

    def __init__(
        self, tx: torchopt.base.GradientTransformation, x: Params, state: Any, grads: Params
    ) -> None:
        self.names = list(x)
        self.x0 = {k: _leaf(v) for k, v in x.items()}
        self.g0 = {k: _leaf(grads[k]) for k in self.names}
        s_leaves, spec = torchopt.pytree.tree_flatten(state)
        self.s0 = [_leaf(t) for t in s_leaves]
        x1, s1 = optimizer_step(tx, self.x0, torchopt.pytree.tree_unflatten(spec, self.s0), self.g0)
        self.x1 = x1
        self.s1 = torchopt.pytree.tree_flatten(s1)[0]
        self.in_s = [i for i, t in enumerate(self.s0) if _differentiable(t)]
        self.out_s = [i for i, t in enumerate(self.s1) if _differentiable(t)]

    def pull(
        self, gx: Mapping[str, Tensor], gstate: Mapping[int, Tensor], retain_graph: bool
    ) -> tuple[Params, Params, dict[int, Tensor]]:
        outs = [self.x1[k] for k in self.names] + [self.s1[i] for i in self.out_s]
        cots = [gx.get(k) for k in self.names] + [gstate.get(i) for i in self.out_s]
        pairs = [(o, c) for o, c in zip(outs, cots) if c is not None and o.requires_grad]
        inputs = (
            [self.g0[k] for k in self.names]
            + [self.x0[k] for k in self.names]
            + [self.s0[i] for i in self.in_s]
        )
        gs = _vjp(pairs, inputs, retain_graph)
        n = len(self.names)
        a_g = dict(zip(self.names, gs[:n]))
        a_x = dict(zip(self.names, gs[n : 2 * n]))
        a_s = dict(zip(self.in_s, gs[2 * n :]))
        return a_g, a_x, a_s


def gradient_products(
    problem: MetaProblem,
    x: Params,
    eta: Params,
    data: Mapping[str, Tensor],
    wrt: Sequence[str],
    step: tuple[Sequence[Tensor], int],
    a_g: Params,
    view: View,
) -> tuple[Params, Params, Params]:
    """``(H_xx a_g, H_eta,x a_g, H_d,x a_g)`` of the inner loss on minibatch ``j`` of
    ``data`` (``step = (minibatches, j)``: the round's order and the step), by one
    ``torch.func.jvp`` of its joint gradient; ``d`` is ``data``'s tensors named in ``wrt`` (the
    rest are constants), ``H_d,x a_g`` is shaped like them (whole round). The problem's
    ``minibatch_data`` is taken inside, so its dependence on ``d`` is differentiated too.
    """
    const = {k: v.detach() for k, v in data.items() if k not in wrt}
    d = {k: data[k].detach() for k in wrt}
    minibatches, j = step

    def loss(x_: Params, eta_: Params, d_: Params) -> Tensor:
        theta = x_ if view is None else view(x_)
        full = {**const, **d_}
        mb = minibatch_of(full, minibatches, j, round_extras(problem, full, minibatches))
        return problem.inner_loss(theta, mb, eta_policy=eta_)

    primal = ({k: v.detach() for k, v in x.items()}, {k: v.detach() for k, v in eta.items()}, d)
    h_x, h_eta, h_d = second_derivative_products(loss, primal, {k: a_g[k] for k in x})
    return h_x, h_eta, h_d


def _differentiable(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


def _leaf(t: Any) -> Any:
    return t.detach().requires_grad_(True) if _differentiable(t) else t


def _vjp(
    pairs: Sequence[tuple[Tensor, Tensor]], inputs: list[Tensor], retain_graph: bool
) -> list[Tensor]:
    """``sum_i <cotangent_i, d output_i / d input>`` for each input (zeros where unused)."""
    if not pairs or not inputs:
        return [torch.zeros_like(t) for t in inputs]
    raw = torch.autograd.grad(
        [o for o, _ in pairs],
        inputs,
        grad_outputs=[g for _, g in pairs],
        allow_unused=True,
        retain_graph=retain_graph,
    )
    return [torch.zeros_like(t) if g is None else g for g, t in zip(raw, inputs)]
