"""Learn per-example data weights for an ``nn.Module`` by differentiating through its training.

``theta`` is a small network's parameters (an ``nn.Module`` called functionally with
``torch.func.functional_call``), ``eta`` one logit per training example. The inner loss is the
weighted training error, the outer loss the error on clean validation data; a quarter of the
training labels are corrupted, and the meta-gradient lowers their weights.

Run it: ``.venv/bin/python docs/examples/data_weights.py``.

``eta`` enters ``inner_loss`` only (``eta_policy``), so the meta-gradient is all Eq 12. The
minibatch carries each example's index (``prepare`` adds it), which is how ``inner_loss``
finds the example's weight.
"""

from __future__ import annotations

import torch
import torchopt
from torch import nn
from torch.func import functional_call

from metagrad_rl import MetaProblem, Round, meta_gradient, minibatch_indices, verify_meta_gradient

N, D = 32, 4
MODEL = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def make_data(seed: int = 0):
    """Training data with every fourth label flipped in sign and scaled; clean validation data."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(2 * N, D, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ w)
    train = {"x": x[:N], "y": y[:N].clone()}
    corrupt = torch.arange(N) % 4 == 0
    train["y"][corrupt] = -3.0 * train["y"][corrupt]
    return train, {"x": x[N:], "y": y[N:]}, corrupt


def predict(theta, x):
    return functional_call(MODEL, theta, (x,)).squeeze(-1)


def prepare(batch, *, eta_reward, theta_old, eta_policy_old):
    """The training set with each example's index, so that a minibatch knows its weights."""
    return {"x": batch["x"], "y": batch["y"], "i": torch.arange(len(batch["y"]))}


def inner_loss(theta, mb, *, eta_policy):
    """The training error, example ``i`` weighted by ``2 sigmoid(eta_i)`` (1 at eta = 0)."""
    weight = 2 * torch.sigmoid(eta_policy["logit"][mb["i"]])
    return (weight * (predict(theta, mb["x"]) - mb["y"]).square()).mean()


def outer_loss(theta, batch, *, eta_policy, theta_den, eta_den):
    """The validation error of the trained network."""
    return (predict(theta, batch["x"]) - batch["y"]).square().mean()


PROBLEM = MetaProblem(prepare, inner_loss, outer_loss)


def main(outer_steps: int = 15, epochs: int = 5, verbose: bool = True) -> dict:
    train, val, corrupt = make_data()
    torch.manual_seed(0)
    theta0 = {k: v.detach().clone() for k, v in MODEL.named_parameters()}
    eta = {"logit": torch.zeros(N, dtype=torch.float64)}
    g = torch.Generator().manual_seed(1)
    rounds = [Round(train, minibatch_indices(N, epochs=epochs, num_minibatches=4, generator=g))]
    inner = torchopt.adam(0.05, eps_root=1e-8)
    meta_opt = torchopt.adam(0.3)
    meta_state = meta_opt.init(eta)
    losses = []
    for k in range(outer_steps):
        res = meta_gradient(PROBLEM, inner, theta0, eta, rounds, val)
        losses.append(res.outer_loss)
        upd, meta_state = meta_opt.update(res.total, meta_state, inplace=False)
        eta = torchopt.apply_updates(eta, upd, inplace=False)
        if verbose and k % 5 == 0:
            print(f"outer step {k:2d}  validation loss {res.outer_loss:.4f}")
    weights = 2 * torch.sigmoid(eta["logit"])
    report = verify_meta_gradient(PROBLEM, inner, theta0, eta, rounds, val, directions=1)
    if verbose:
        print(f"mean weight: corrupted {weights[corrupt].mean():.3f}, clean "
              f"{weights[~corrupt].mean():.3f}")  # fmt: skip
        print(report)
    return {
        "val_losses": losses,
        "weight_corrupted": float(weights[corrupt].mean()),
        "weight_clean": float(weights[~corrupt].mean()),
        "verification_passed": report.passed,
    }


if __name__ == "__main__":
    main()
