"""What a first-time user of the engine runs into: where a non-finite value came from, and the
edges of the MetaProblem contract (per-round quantities, list minibatches, shapes)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torchopt
from meta_helpers import make_setup

from metagrad_rl.errors import ConfigError, DivergenceError
from metagrad_rl.metagrad import meta_gradient
from metagrad_rl.pytree import TERMS, flatten
from metagrad_rl.unroll import MetaProblem, Round

ROOT = Path(__file__).resolve().parents[1]


def _problem_with(problem, *, inner=None, outer=None, prepare=None):
    return MetaProblem(
        prepare or problem.prepare,
        inner or problem.inner_loss,
        outer or problem.outer_loss,
        theta_spec=problem.theta_spec,
        eta_spec=problem.eta_spec,
    )


# ------------------------------------------------------------------ non-finite values, located


def test_nan_in_eta_is_named_as_the_input():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)
    bad = dict(eta)
    name = next(iter(eta))
    bad[name] = eta[name].clone()
    bad[name].view(-1)[0] = float("nan")
    with pytest.raises(ConfigError, match=rf"eta\['{name}'\] has 1 NaN/inf") as e:
        meta_gradient(problem, torchopt.sgd(0.1), theta, bad, rounds, outer)
    assert "eps_root" not in str(e.value)


def test_a_diverging_sgd_step_is_named_by_round_and_step():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=3)
    with pytest.raises(
        DivergenceError,
        match=r"non-finite at round \d, inner step \d: the optimizer's updates diverged",
    ) as e:
        meta_gradient(problem, torchopt.sgd(1e300), theta, eta, rounds, outer)
    assert "eps_root" not in str(e.value) and "step size" in str(e.value)


def test_a_nan_inner_loss_is_an_error_even_with_a_finite_gradient():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=2)
    marked = {**rounds[1].batch, "obs": rounds[1].batch["obs"] + 100.0}  # round 1, recognisable
    rounds = [rounds[0], Round(marked, rounds[1].minibatches)]

    def inner(theta, mb, *, eta_policy):
        loss = problem.inner_loss(theta, mb, eta_policy=eta_policy)
        nan = float("nan") if float(mb["obs"].max()) > 50 else 0.0
        return loss + torch.tensor(nan, dtype=loss.dtype)  # NaN value, finite gradient

    with pytest.raises(ConfigError, match=r"inner_loss returned nan at round 1, inner step 0"):
        meta_gradient(
            _problem_with(problem, inner=inner), torchopt.sgd(0.1), theta, eta, rounds, outer
        )


def test_sqrt_of_a_negative_in_the_users_loss_is_named():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)

    def inner(theta, mb, *, eta_policy):
        return problem.inner_loss(theta, mb, eta_policy=eta_policy) + torch.sqrt(
            -theta["log_std"].exp().sum()
        )

    with pytest.raises(ConfigError, match="inner_loss returned nan at round 0, inner step 0"):
        meta_gradient(
            _problem_with(problem, inner=inner), torchopt.sgd(0.1), theta, eta, rounds, outer
        )

    def outer_loss(theta, batch, **kw):
        return problem.outer_loss(theta, batch, **kw) + torch.log(-theta["log_std"].exp().sum())

    with pytest.raises(ConfigError, match="outer_loss returned nan"):
        meta_gradient(
            _problem_with(problem, outer=outer_loss), torchopt.sgd(0.1), theta, eta, rounds, outer
        )


def test_a_non_finite_backward_blames_eps_root_only_when_adam_hits_v_zero():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)
    with pytest.raises(ConfigError, match=r"backward pass.*sqrt\(v\) at v = 0.*eps_root"):
        meta_gradient(problem, torchopt.adam(0.01), theta, eta, rounds, outer)

    def outer_loss(theta, batch, *, eta_policy, **kw):
        # finite forward (sqrt(0) = 0), infinite derivative at 0
        zero = (eta_policy[next(iter(eta_policy))] * 0).sum()
        return problem.outer_loss(theta, batch, eta_policy=eta_policy, **kw) + torch.sqrt(zero)

    with pytest.raises(ConfigError, match="backward pass.*although every forward value") as e:
        meta_gradient(
            _problem_with(problem, outer=outer_loss), torchopt.sgd(0.1), theta, eta, rounds, outer
        )
    assert "eps_root" not in str(e.value)


# ------------------------------------------------------------------ the MetaProblem contract


def test_a_per_round_scalar_from_prepare_is_shared_by_every_minibatch():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)

    def prepare(batch, **kw):
        return {
            **problem.prepare(batch, **kw),
            "temperature": torch.tensor(2.0, dtype=torch.float64),
        }

    def inner(theta, mb, *, eta_policy):
        return problem.inner_loss(theta, mb, eta_policy=eta_policy) * mb["temperature"]

    res = meta_gradient(
        _problem_with(problem, prepare=prepare, inner=inner),
        torchopt.sgd(0.05),
        theta,
        eta,
        rounds,
        outer,
    )
    ref = meta_gradient(problem, torchopt.sgd(0.1), theta, eta, rounds, outer)  # 2 * 0.05
    torch.testing.assert_close(flatten(res.total), flatten(ref.total), rtol=1e-12, atol=1e-15)

    def short(batch, **kw):
        return {**problem.prepare(batch, **kw), "w": torch.ones(3, dtype=torch.float64)}

    with pytest.raises(ConfigError, match=r"prepare returned 'w' with shape \(3,\) for round 0"):
        meta_gradient(
            _problem_with(problem, prepare=short), torchopt.sgd(0.1), theta, eta, rounds, outer
        )


def test_minibatches_as_lists_of_ints_equal_index_tensors():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)
    as_lists = [Round(r.batch, [idx.tolist() for idx in r.minibatches]) for r in rounds]
    a = meta_gradient(problem, torchopt.sgd(0.1), theta, eta, as_lists, outer)
    b = meta_gradient(problem, torchopt.sgd(0.1), theta, eta, rounds, outer)
    for t in (*TERMS, "total"):
        torch.testing.assert_close(flatten(getattr(a, t)), flatten(getattr(b, t)), rtol=0, atol=0)
    for bad, msg in (([0.5, 1.5], "dtype torch.float"), ([], "is empty"), ("ab", "expected a 1-d")):
        with pytest.raises(ConfigError, match=msg):
            meta_gradient(
                problem, torchopt.sgd(0.1), theta, eta, [Round(rounds[0].batch, [bad])], outer
            )


def test_a_non_scalar_inner_loss_is_a_config_error():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)

    def inner(theta, mb, *, eta_policy):
        return problem.inner_loss(theta, mb, eta_policy=eta_policy) * torch.ones(
            3, dtype=torch.float64
        )

    with pytest.raises(
        ConfigError, match=r"inner_loss returned \(3,\) at round 0.*expected a scalar"
    ):
        meta_gradient(
            _problem_with(problem, inner=inner), torchopt.sgd(0.1), theta, eta, rounds, outer
        )


def test_outer_batch_is_optional_when_the_outer_loss_reads_none():
    problem, theta, eta, rounds, _ = make_setup(n_rounds=1, steps=2)

    def outer_loss(theta, batch, *, eta_policy, theta_den, eta_den):
        assert dict(batch) == {}
        return sum((v**2).sum() for v in theta.values())

    res = meta_gradient(
        _problem_with(problem, outer=outer_loss), torchopt.sgd(0.1), theta, eta, rounds
    )
    assert float(flatten(res.eq11).norm()) == 0.0 and float(flatten(res.total).norm()) > 0


def test_an_eta_that_would_broadcast_is_caught_by_eta_spec():
    from metagrad_rl.optim import clip_grad_norm

    def inner(theta, mb, *, eta_policy):
        return ((theta["w"] - eta_policy["target"]) ** 2).sum()

    def outer(theta, batch, **kw):
        return (theta["w"] ** 2).sum()

    def prepare(batch, **kw):
        return {"x": batch["x"]}

    spec = MetaProblem(prepare, inner, outer, theta_spec={"w": (5,)}, eta_spec={"target": (5,)})
    theta = {"w": torch.zeros(5, dtype=torch.float64)}
    eta = {"target": torch.ones(5, 1, dtype=torch.float64)}  # broadcasts to (5, 5) silently
    rounds = [Round({"x": torch.zeros(4, dtype=torch.float64)}, [torch.arange(4)])]
    with pytest.raises(ConfigError, match=r"eta\['target'\] has shape \(5, 1\), expected \(5,\)"):
        meta_gradient(
            spec, torchopt.chain(clip_grad_norm(1.0), torchopt.sgd(0.1)), theta, eta, rounds
        )


# ------------------------------------------------------------------ documented examples run


def test_ridge_example_runs_and_its_verification_passes():
    ns = runpy.run_path(str(ROOT / "docs" / "examples" / "ridge_l2.py"), run_name="example")
    out = ns["main"](outer_steps=15, verbose=False)
    assert out["verification_passed"]
    assert out["val_losses"][-1] < 0.9 * out["val_losses"][0]
    # only the inner loss reads eta: all of the meta-gradient is Eq 12
    assert out["shares"]["eq12"] == pytest.approx(1.0, abs=1e-12)
    assert out["shares"]["eq11"] == 0.0 and out["shares"]["eq13"] == 0.0


def test_readme_engine_snippet_runs_as_written():
    text = (ROOT / "README.md").read_text()
    start = text.index("## The meta-gradient engine")
    code = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the snippet is the test
    assert ns["report"].passed
