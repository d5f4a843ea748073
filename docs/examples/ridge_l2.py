"""Learn the L2 weight of ridge regression by differentiating through the solver's SGD steps.

A complete, non-RL use of the engine: ``theta`` is the regression weight ``w``, ``eta`` the
log of the L2 coefficient. The inner loss is the regularised training error, the outer loss
the validation error; the meta-gradient ``d L_val / d log_l2`` is taken through all ``K``
inner steps (a clipped SGD, as the trainers clip theirs) and checked against finite
differences by :func:`metagrad_rl.verify_meta_gradient`.

Run it: ``.venv/bin/python docs/examples/ridge_l2.py``.

``eta`` enters only ``inner_loss`` (the ``eta_policy`` keyword), so all of the meta-gradient
is Eq 12 -- the "mixed second-order" path: ``eta`` changes the inner gradient, which changes
``w``. Had it entered ``prepare`` (``eta_reward``) it would land in Eq 13, ``outer_loss``
(``eta_policy`` there) in Eq 11, and any round before the last in Eq 14 (docs/engine.md).
"""

from __future__ import annotations

import torch
import torchopt

from metagrad_rl import MetaProblem, Round, clip_grad_norm, meta_gradient, verify_meta_gradient


def make_data(seed: int = 0, n: int = 20, d: int = 30, noise: float = 1.0):
    """More features than samples: without regularisation the fit overfits."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=torch.float64) / d**0.5
    x = torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    y = x @ w_true + noise * torch.randn(2 * n, generator=g, dtype=torch.float64)
    return {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}


def prepare(batch, *, eta_reward, theta_old, eta_policy_old):
    """Per-round data: the training set itself (eta does not enter here: Eq 13 = 0)."""
    return {"x": batch["x"], "y": batch["y"]}


def inner_loss(theta, mb, *, eta_policy):
    """Training error plus ``exp(log_l2) |w|^2``: eta enters here (Eq 12)."""
    err = mb["x"] @ theta["w"] - mb["y"]
    return err.square().mean() + eta_policy["log_l2"].exp().sum() * theta["w"].square().sum()


def outer_loss(theta, batch, *, eta_policy, theta_den, eta_den):
    """Validation error at the solver's last iterate (eta does not enter here: Eq 11 = 0)."""
    return (batch["x"] @ theta["w"] - batch["y"]).square().mean()


PROBLEM = MetaProblem(
    prepare, inner_loss, outer_loss, theta_spec={"w": (30,)}, eta_spec={"log_l2": (1,)}
)


def main(outer_steps: int = 20, inner_steps: int = 40, verbose: bool = True) -> dict:
    train, val = make_data()
    theta0 = {"w": torch.zeros(30, dtype=torch.float64)}
    eta = {"log_l2": torch.tensor([-6.0], dtype=torch.float64)}
    solver = torchopt.chain(clip_grad_norm(1.0), torchopt.sgd(0.05))  # clipping fires early
    rounds = [Round(train, [torch.arange(20)] * inner_steps)]
    meta_opt = torchopt.adam(0.5)
    meta_state = meta_opt.init(eta)
    val_losses, res = [], None
    for i in range(outer_steps):
        res = meta_gradient(PROBLEM, solver, theta0, eta, rounds, val)
        val_losses.append(res.outer_loss)
        upd, meta_state = meta_opt.update(res.total, meta_state, inplace=False)
        eta = torchopt.apply_updates(eta, upd, inplace=False)
        if verbose and i % 5 == 0:
            l2 = float(eta["log_l2"].exp())
            print(f"outer step {i:2d}  validation loss {res.outer_loss:.4f}  l2 {l2:.4g}")
    report = verify_meta_gradient(PROBLEM, solver, theta0, eta, rounds, val)
    if verbose:
        print(report)
    total = float(torch.cat([g.flatten() for g in res.total.values()]).norm())
    shares = {
        t: float(torch.cat([g.flatten() for g in getattr(res, t).values()]).norm()) / total
        for t in ("eq11", "eq12", "eq13", "eq14")
    }
    return {"val_losses": val_losses, "verification_passed": report.passed, "shares": shares}


if __name__ == "__main__":
    main()
