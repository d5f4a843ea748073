"""Time, as the ``cost`` section measures it: interleaved repetitions, medians of ratios.

:func:`interleaved_times` runs each computation once per repetition in a fresh random order (so
that drift of the machine's speed hits all alike); :func:`ratio_median` is the median of the
per-repetition ratios; :func:`eq12_product_times` times Eq 12's mixed second-order product
against one inner-loss gradient.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from metagrad_rl.explicit import mixed_second_order_product
from termbench.cost_setup import CostSetup


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]],
    reps: int,
    seed: int,
    desc: str,
    progress: bool = True,
    warmup: bool = True,
) -> dict[str, list[float]]:
    """Each function once per repetition, in a fresh random order (after one warm-up call)."""
    for fn in fns.values() if warmup else ():
        fn()
    rng = np.random.default_rng(seed)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in tqdm(range(reps), desc=desc, disable=not progress):
        for i in rng.permutation(len(names)):
            t0 = time.perf_counter()
            fns[names[i]]()
            times[names[i]].append(time.perf_counter() - t0)
    return times


def ratio_median(times: Mapping[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of ``t_a / t_b`` measured in the same repetition."""
    return float(np.median(np.array(times[a]) / np.array(times[b])))


def eq12_product_times(
    s: CostSetup, reps: int, seed: int, calls: int = 50
) -> dict[str, list[float]]:
    """Eq 12's ``D_eta(v^T grad_theta L_in)`` against one inner-loss gradient (one minibatch)."""
    from torch.func import grad

    f, _ = s.inner_loss_fn()
    theta, eta = s.theta, s.eta
    v = {k: torch.randn_like(t) for k, t in theta.items()}
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in theta.items()}

    def autograd_grad() -> Any:
        return torch.autograd.grad(f(leaves, eta), list(leaves.values()))

    def func_grad() -> Any:
        return grad(f)(theta, eta)

    def product() -> Any:  # the default: reverse-over-reverse with torch.autograd
        return mixed_second_order_product(f, theta, eta, v)

    def product_jvp() -> Any:  # forward-over-reverse with torch.func
        return mixed_second_order_product(f, theta, eta, v, method="jvp")

    def many(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            for _ in range(calls):
                fn()

        return run

    fns = {
        "grad_autograd": many(autograd_grad),
        "grad_func": many(func_grad),
        "eq12_product": many(product),
        "eq12_product_jvp": many(product_jvp),
    }
    t = interleaved_times(fns, reps, seed, "cost: Eq 12 product", progress=False)
    return {k: [x / calls for x in v_] for k, v_ in t.items()}
