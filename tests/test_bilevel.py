"""CLN and LIRPG trainers end to end on a real MuJoCo task (small budgets).

Each --algo/--meta-grad combination runs a few rounds and must move eta; the exact mode's
applied gradient is recomputed independently by the engine; the validation round's
denominator is the documented one.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metagrad_rl.advantages import normalize
from metagrad_rl.errors import ConfigError
from metagrad_rl.metagrad import eq17_gradient, meta_gradient
from metagrad_rl.networks import GaussianPolicy, IntrinsicReward, cln_condition, gaussian_log_prob
from metagrad_rl.ppo import clipped_surrogate_loss
from metagrad_rl.pytree import flatten
from metagrad_rl.rollout import Batch
from metagrad_rl.trainers import meta_grads
from metagrad_rl.trainers.bilevel import (
    CLNConfig,
    LIRPGConfig,
    StepSettings,
    build,
    build_problem,
    mixed_advantages,
    policy_optimizer,
    train,
)
from metagrad_rl.trainers.common import optimizer_state_from_list
from metagrad_rl.trainers.meta_grads import MetaGrad, Unroll, _eq17, lookahead, real_round
from metagrad_rl.trainers.run import lr_restart_of
from metagrad_rl.unroll import EtaPaths, Round, unroll

SMALL = dict(
    env="InvertedPendulum-v5",
    num_steps=128,
    num_minibatches=4,
    update_epochs=2,
    total_steps=128 * 3,
    checkpoint_every=0,
    eta_lr=1e-2,
)

COMBOS = [
    ("cln", m) for m in ("eq17", "lirpg", "three-term", "exact", "sampling-aware", "dice")
] + [("lirpg", m) for m in ("lirpg", "exact", "sampling-aware")]


def _config(algo, **kw):
    cls = CLNConfig if algo == "cln" else LIRPGConfig
    return cls(**{**SMALL, **kw})


def _log_prob(policy, theta, eta, batch):
    mean, log_std = functional_call(policy, theta, (batch["obs"], cln_condition(eta)))
    return gaussian_log_prob(mean, log_std, batch["act"])


def _grad(loss, leaves):
    if not loss.requires_grad:  # an unconditioned policy: the loss does not see eta
        return {k: torch.zeros_like(v) for k, v in leaves.items()}
    gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, retain_graph=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), gs)}


def _lookahead_terms(cfg, s):
    """Eq 12, Eq 13 (a fresh one-step full-batch look-ahead from the stored theta_k, with eta
    on the policy and the reward paths as separate leaves) and Eq 17 at the trainer's
    theta_{k+1}, by autograd on the problem's own losses."""
    policy, reward = _nets(cfg)
    problem, tx, rec = build_problem(cfg, policy, reward), policy_optimizer(cfg), s.round
    fixed = {k: v.detach() for k, v in rec.eta.items()}
    pol, rew, out = ({k: v.clone().requires_grad_(True) for k, v in fixed.items()} for _ in "abc")
    state = optimizer_state_from_list(tx.init(rec.theta), rec.opt_state)
    full = torch.arange(rec.batch["r_ex"].numel())
    res = unroll(
        problem, tx, rec.theta, EtaPaths(fixed, pol, rew, fixed), [Round(rec.batch, [full])], state
    )
    den = {k: v.detach() for k, v in rec.theta.items()}
    loss = problem.outer_loss(res.theta, s.outer, eta_policy=fixed, theta_den=den, eta_den=fixed)
    g12, g13 = _grad(loss, pol), _grad(loss, rew)
    nxt = {k: v.detach() for k, v in s.theta_next.items()}
    loss17 = problem.outer_loss(nxt, s.outer, eta_policy=out, theta_den=den, eta_den=fixed)
    return g12, g13, _grad(loss17, out)


def test_lirpg_applies_eq13_of_its_one_step_lookahead(tmp_path):
    steps = []
    cfg = _config("cln", meta_grad="lirpg")
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    for s in steps:
        g12, g13, _ = _lookahead_terms(cfg, s)
        torch.testing.assert_close(flatten(s.grad), flatten(g13), rtol=1e-4, atol=1e-7)
        assert flatten(g12).norm() > 1e-3 * flatten(g13).norm()  # Eq 12 exists and is left out


def test_three_term_applies_eq17_plus_eq12_plus_eq13_of_its_lookahead(tmp_path):
    steps = []
    cfg = _config("cln", meta_grad="three-term")
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    for s in steps:
        g12, g13, g17 = _lookahead_terms(cfg, s)
        want = flatten(g17) + flatten(g12) + flatten(g13)
        torch.testing.assert_close(flatten(s.grad), want, rtol=1e-4, atol=1e-7)
        assert min(flatten(g).norm() for g in (g12, g13, g17)) > 0


def test_a_toy_estimator_is_one_registry_entry(tmp_path):
    """Half of Eq 13 of the look-ahead, registered without touching the trainer."""

    def half_eq13(ctx):
        g = {k: 0.5 * v for k, v in ctx.result.eq13.items()}
        return g, {"half_eq13": g}

    entry = MetaGrad(
        "half-eq13", "half of Eq 13", half_eq13, lookahead(), log_keys=("norm_half_eq13",)
    )
    meta_grads.register(entry)
    try:
        steps = []
        cfg = _config("lirpg", meta_grad="half-eq13")
        train(cfg, tmp_path / "run", on_meta_step=steps.append)
        _, g13, _ = _lookahead_terms(cfg, steps[-1])
        torch.testing.assert_close(
            flatten(steps[-1].grad), 0.5 * flatten(g13), rtol=1e-4, atol=1e-8
        )
        last = (tmp_path / "run" / "progress.csv").read_text().splitlines()
        row = dict(zip(last[0].split(","), last[-1].split(",")))
        assert float(row["norm_half_eq13"]) == pytest.approx(
            float(flatten(steps[-1].grad).norm()), rel=1e-4
        )
    finally:
        meta_grads.unregister("half-eq13")
    with pytest.raises(ConfigError, match="meta_grad='half-eq13' is invalid"):
        _config("lirpg", meta_grad="half-eq13")


def test_a_new_kind_of_unroll_is_one_piece_without_touching_the_trainer(tmp_path):
    """A kind of unroll the registry does not have -- the real round's first epoch only, as a
    look-ahead beside the real round -- is one :class:`Unroll`; its applied total equals the
    engine's total through exactly those minibatches."""

    def first_epoch(rec, past, lookahead_steps):
        half = rec.minibatches[: len(rec.minibatches) // 2]
        return [Round(rec.batch, half)]

    entry = MetaGrad(
        "first-epoch",
        "the total through the real round's first epoch",
        lambda ctx: (ctx.result.total, {"total": ctx.result.total}),
        Unroll("first epoch", first_epoch),
        log_keys=("norm_total",),
    )
    meta_grads.register(entry)
    try:
        cfg = _config("cln", meta_grad="first-epoch", update_epochs=2)
        steps = []
        train(cfg, tmp_path / "run", on_meta_step=steps.append)
        assert "| `first-epoch` |" in meta_grads.markdown_table()
    finally:
        meta_grads.unregister("first-epoch")
    policy, reward = _nets(cfg)
    problem, tx = build_problem(cfg, policy, reward), policy_optimizer(cfg)
    s = steps[-1]
    state = optimizer_state_from_list(tx.init(s.round.theta), s.round.opt_state)
    half = s.round.minibatches[: len(s.round.minibatches) // 2]
    ref = meta_gradient(
        problem,
        tx,
        s.round.theta,
        s.round.eta,
        [Round(s.round.batch, half)],
        s.outer,
        opt_state=state,
        terms=True,
    )
    torch.testing.assert_close(flatten(s.grad), flatten(ref.total), rtol=1e-5, atol=1e-8)
    assert flatten(s.grad).norm() > 0


def test_a_new_kind_of_estimator_starts_and_finishes_itself(tmp_path):
    """A kind the registry does not have -- the exact total with its second-order products
    taken forward-over-reverse (``torch.func.jvp``) in a checkpointed reverse pass -- is one
    :class:`Unroll` whose ``start`` calls the engine its own way; nothing in the trainer
    changes. Its applied meta-gradients equal the ``exact`` entry's (float32 round-off)."""
    from dataclasses import dataclass

    from metagrad_rl.metagrad import start_meta_gradient

    @dataclass(frozen=True)
    class ForwardOverReverse(Unroll):
        def start(self, rec, history, inputs):
            tx, opt_state = inputs.optimizer_at(rec)
            rounds = self.rounds(rec, (), inputs.lookahead_steps)
            return start_meta_gradient(
                inputs.problem,
                tx,
                rec.theta,
                rec.eta,
                rounds,
                opt_state=opt_state,
                surrogate=inputs.surrogate,
                checkpoint_every="auto",
                second_order="forward",
            )

    exact = meta_grads.get("exact")
    entry = MetaGrad(
        "exact-fwd",
        "the total through the real round, forward-over-reverse",
        exact.apply,
        ForwardOverReverse("round (forward-over-reverse)", exact.unroll.rounds, continues=True),
        log_keys=exact.log_keys,
    )
    meta_grads.register(entry)
    try:
        runs = {}
        for name in ("exact", "exact-fwd"):
            runs[name] = []
            train(_config("cln", meta_grad=name), tmp_path / name, on_meta_step=runs[name].append)
    finally:
        meta_grads.unregister("exact-fwd")
    assert len(runs["exact"]) == len(runs["exact-fwd"]) == 2
    for a, b in zip(runs["exact"], runs["exact-fwd"]):
        assert flatten(a.grad).norm() > 0
        torch.testing.assert_close(flatten(b.grad), flatten(a.grad), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            flatten(b.theta_next), flatten(a.theta_next), rtol=1e-5, atol=1e-7
        )


def _nets(cfg):
    reward = IntrinsicReward(4, 1, cfg.reward_hidden, cfg.bottleneck)
    policy = GaussianPolicy(
        4, 1, cfg.hidden, conditioning=cfg.conditioning, cond_dim=reward.condition_dim
    )
    return policy, reward


@pytest.mark.parametrize("algo,meta_grad", COMBOS)
def test_each_algo_and_estimator_runs_and_moves_eta(tmp_path, algo, meta_grad):
    cfg = _config(algo, meta_grad=meta_grad)
    steps = []
    summary = train(cfg, tmp_path / "run", on_meta_step=steps.append)
    assert summary["finished"] and summary["global_step"] == 3 * 128
    assert len(steps) == 2  # the first round's meta-gradient is finished on the second batch
    for s in steps:
        g = flatten(s.grad)
        assert torch.isfinite(g).all() and g.norm() > 0
    eta0, eta1 = steps[0].round.eta, steps[1].round.eta
    assert (flatten(eta0) - flatten(eta1)).abs().max() > 0  # eta changed between rounds
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (flatten(ckpt["eta"]) - flatten(eta1)).abs().max() > 0
    rows = (tmp_path / "run" / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(",")))
    # PPO's columns, the intrinsic reward's statistics and every term the estimator computes
    # (Eq 11-14 for the split ones, the score term for sampling-aware/dice) are filled
    mg = meta_grads.get(meta_grad)
    cols = ["pg_loss", "entropy", "approx_kl", "clip_frac", "lr", "v_loss", "grad_clip_share"]
    cols += ["intrinsic_reward_mean", "intrinsic_reward_std", "norm_applied", *mg.log_keys]
    for col in cols:
        assert last[col] != "", col
    assert float(last["norm_applied"]) == pytest.approx(float(flatten(steps[-1].grad).norm()), 1e-5)
    if mg.unroll is not None and mg.unroll.terms:
        assert float(last["norm_eq13"]) > 0 and "norm_eq14" in header
    if mg.score is not None:
        assert "norm_score" in header and "score_weight" in header


def _engine_on_the_stored_round(cfg):
    """``engine(step, **kw)``: ``meta_gradient`` (all terms) recomputed on the round a meta-step
    stored, with the trainer's problem and optimizer."""
    policy, reward = _nets(cfg)
    problem, tx = build_problem(cfg, policy, reward), policy_optimizer(cfg)

    def engine(s, **kw):
        inp = s.round
        state = optimizer_state_from_list(tx.init(inp.theta), inp.opt_state)
        rounds = [Round(inp.batch, inp.minibatches)]
        return meta_gradient(
            problem, tx, inp.theta, inp.eta, rounds, s.outer, opt_state=state, terms=True, **kw
        )

    return engine


def test_exact_mode_applies_the_engines_total(tmp_path):
    cfg = _config("cln", meta_grad="exact")
    steps = []
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    engine = _engine_on_the_stored_round(cfg)
    for s in steps:
        ref = engine(s)
        torch.testing.assert_close(flatten(s.grad), flatten(ref.total), rtol=1e-4, atol=1e-7)
        # the policy the trainer continued with is the unroll's theta_{k+1}
        torch.testing.assert_close(
            flatten(s.theta_next), flatten(ref.theta_next), rtol=0, atol=1e-6
        )
        assert flatten(ref.eq12).norm() > 0 and flatten(ref.eq13).norm() > 0


@pytest.mark.parametrize("inner_opt", ["sgd", "momentum", "rmsprop"])
def test_each_inner_optimizer_is_differentiated_exactly(tmp_path, inner_opt):
    """``--inner-opt``: the exact estimator through clip + sgd / momentum / rmsprop applies the
    engine's total through the same chain, and theta_{k+1} is that chain's unroll."""
    cfg = _config("cln", meta_grad="exact", inner_opt=inner_opt, lr=1e-3)
    steps = []
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    engine = _engine_on_the_stored_round(cfg)
    for s in steps:
        ref = engine(s)
        torch.testing.assert_close(flatten(s.grad), flatten(ref.total), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            flatten(s.theta_next), flatten(ref.theta_next), rtol=0, atol=1e-6
        )
        assert torch.isfinite(flatten(s.grad)).all() and flatten(ref.eq13).norm() > 0
    with pytest.raises(ConfigError, match="inner_opt='lbfgs' is invalid"):
        _config("cln", inner_opt="lbfgs")


def test_multi_round_mode_applies_the_engines_total_through_the_stored_rounds(tmp_path):
    """exact-r3: the stored-graph engine's total through the last (up to) 3 stored rounds,
    re-simulated from the oldest one's theta at the current eta; the trainer's own policy is
    the plain round's (it does not follow the re-simulation)."""
    cfg = _config("cln", meta_grad="exact-r3", total_steps=128 * 5)
    steps = []
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    assert len(steps) == 4
    policy, reward = _nets(cfg)
    problem, tx = build_problem(cfg, policy, reward), policy_optimizer(cfg)
    for i, s in enumerate(steps):
        recs = [t.round for t in steps[max(0, i - 2) : i + 1]]
        state = optimizer_state_from_list(tx.init(recs[0].theta), recs[0].opt_state)
        rounds = [Round(r.batch, r.minibatches) for r in recs]
        ref = meta_gradient(
            problem, tx, recs[0].theta, s.round.eta, rounds, s.outer, opt_state=state
        )
        torch.testing.assert_close(flatten(s.grad), flatten(ref.total), rtol=1e-4, atol=1e-7)
        assert s.diagnostics["inner_steps"] == sum(len(r.minibatches) for r in recs)
        if len(recs) > 1:  # Eq 14 through the earlier rounds is there
            assert s.diagnostics["norm_eq14"] > 0
    # resumed in the middle: the history comes back from the checkpoint
    part = []
    train(cfg, tmp_path / "b", stop_at_step=128 * 3, on_meta_step=part.append)
    train(cfg, tmp_path / "b", resume=True, on_meta_step=part.append)
    assert len(part) == 4
    for a, b in zip(steps, part):
        torch.testing.assert_close(flatten(a.grad), flatten(b.grad), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("meta_grad", ["truncated-k1", "terms-eq12+eq13"])
def test_truncated_and_partial_modes_apply_the_engines_numbers(tmp_path, meta_grad):
    """truncated-k1: the engine's total with truncate=1; terms-eq12+eq13: Eq 12 + Eq 13."""
    cfg = _config("cln", meta_grad=meta_grad)
    steps = []
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    engine = _engine_on_the_stored_round(cfg)
    for s in steps:
        full = engine(s)
        if meta_grad == "truncated-k1":
            want = flatten(engine(s, truncate=1).total)
            assert (want - flatten(full.total)).norm() > 1e-3 * flatten(full.total).norm()
        else:
            want = flatten(full.eq12) + flatten(full.eq13)
        torch.testing.assert_close(flatten(s.grad), want, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            flatten(s.theta_next), flatten(full.theta_next), rtol=0, atol=1e-6
        )


def test_sampling_aware_mode_applies_total_plus_score(tmp_path):
    from metagrad_rl.metagrad import start_meta_gradient

    cfg = _config("cln", meta_grad="sampling-aware", total_steps=128 * 4)
    steps = []
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    policy, reward = _nets(cfg)
    problem, tx = build_problem(cfg, policy, reward), policy_optimizer(cfg)
    weights = [s.diagnostics["score_weight"] for s in steps]
    assert any(w != 0.0 for w in weights)
    for s in steps:
        inp = s.round
        state = optimizer_state_from_list(tx.init(inp.theta), inp.opt_state)
        w = s.diagnostics["score_weight"] or None
        pending = start_meta_gradient(
            problem,
            tx,
            inp.theta,
            inp.eta,
            [Round(inp.batch, inp.minibatches)],
            opt_state=state,
        )
        ref = pending.finish(s.outer, score_weight=w)
        want = flatten(ref.total) + (0 if ref.score is None else flatten(ref.score))
        torch.testing.assert_close(flatten(s.grad), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("denominator", ["theta_k", "theta_k+1"])
def test_validation_round_uses_the_documented_denominator(tmp_path, denominator):
    cfg = _config("cln", meta_grad="eq17", denominator=denominator)
    steps = []
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    policy, reward = _nets(cfg)
    problem = build_problem(cfg, policy, reward)
    s = steps[-1]
    theta_k, theta_k1, eta = s.round.theta, s.theta_next, s.round.eta
    want_den = theta_k if denominator == "theta_k" else theta_k1
    other_den = theta_k1 if denominator == "theta_k" else theta_k
    ref = eq17_gradient(problem, theta_k1, eta, s.outer, want_den, eta)
    other = eq17_gradient(problem, theta_k1, eta, s.outer, other_den, eta)
    torch.testing.assert_close(flatten(s.grad), flatten(ref), rtol=1e-5, atol=1e-8)
    assert (flatten(ref) - flatten(other)).norm() > 1e-3 * flatten(ref).norm()
    # and by hand: the clipped surrogate of pi_{theta_k+1, eta} / pi_{theta_den, eta_i}
    # (denominator a constant), differentiated w.r.t. the numerator's eta only
    leaf = {k: v.detach().clone().requires_grad_(True) for k, v in eta.items()}
    logp = _log_prob(policy, theta_k1, leaf, s.outer)
    old = _log_prob(policy, want_den, eta, s.outer).detach()
    adv = normalize(s.outer["adv_ex"])
    loss = clipped_surrogate_loss(logp, old, adv, cfg.clip_coef)
    by_hand = _grad(loss, leaf)
    torch.testing.assert_close(flatten(s.grad), flatten(by_hand), rtol=1e-5, atol=1e-8)


def test_bilevel_resume_continues_exactly(tmp_path):
    cfg = _config("cln", meta_grad="exact", total_steps=128 * 4)
    full = []
    train(cfg, tmp_path / "a", on_meta_step=full.append)
    part = []
    train(cfg, tmp_path / "b", stop_at_step=256, on_meta_step=part.append)
    train(cfg, tmp_path / "b", resume=True, on_meta_step=part.append)
    assert len(full) == len(part) == 3
    for a, b in zip(full, part):
        torch.testing.assert_close(flatten(a.grad), flatten(b.grad), rtol=1e-6, atol=1e-9)


def test_bad_bilevel_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="meta_grad='fast'.*eq17"):
        _config("cln", meta_grad="fast")
    with pytest.raises(ConfigError, match="needs a CLN policy"):
        _config("lirpg", meta_grad="eq17")
    with pytest.raises(ConfigError, match="eta_lr=-0.001.*>= 0"):
        _config("cln", eta_lr=-1e-3)
    with pytest.raises(ConfigError, match="r_ex_coef=0.0 with r_in_coef=0.0"):
        _config("lirpg", r_in_coef=0.0)


def test_eta_lr_zero_freezes_the_seeded_reward(tmp_path):
    """The fixed-random-reward ablation: eta stays bit for bit at its seeded initialisation,
    while the meta-gradient is still computed (and nonzero)."""
    cfg = _config("cln", eta_lr=0.0)
    steps = []
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    torch.manual_seed(cfg.seed)  # as the trainer seeds before it builds
    _, fresh = build(cfg, lr_restart_of(None, cfg))  # the seeded initialisation
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert len(steps) == 2 and all(flatten(s.grad).norm() > 0 for s in steps)
    assert fresh.eta.keys() == ckpt["eta"].keys()
    for k, v in fresh.eta.items():
        assert torch.equal(ckpt["eta"][k], v), k


def test_r_in_coef_zero_is_the_conditioned_architecture_alone(tmp_path):
    """r_in_coef = 0: the policy's advantages do not depend on the intrinsic reward, while
    eq17 still moves eta through the CLN condition."""
    cfg = _config("cln", r_in_coef=0.0)
    steps = []
    train(cfg, tmp_path / "run", on_meta_step=steps.append)
    assert (flatten(steps[0].round.eta) - flatten(steps[1].round.eta)).abs().max() > 0
    g = torch.Generator().manual_seed(0)
    t, n = 16, 2
    b = Batch(
        *(torch.randn(t, n, 3, generator=g) for _ in range(2)),
        torch.randn(t, n, generator=g),
        *(torch.randn(t, n, generator=g) for _ in range(2)),
        torch.randn(t, n, 3, generator=g),
        torch.rand(t, n, generator=g) < 0.1,
        torch.rand(t, n, generator=g) < 0.2,
        *(torch.randn(t, n, generator=g) for _ in range(2)),
    )
    hp = StepSettings.of(cfg)
    a1 = mixed_advantages(hp, b, torch.randn(t, n, generator=g))
    a2 = mixed_advantages(hp, b, torch.randn(t, n, generator=g))
    assert torch.equal(a1, a2)
    cln = StepSettings.of(_config("cln"))
    assert not torch.equal(a1, mixed_advantages(cln, b, torch.randn(t, n, generator=g)))


def test_docs_table_and_cli_choices_read_the_registry(capsys):
    from pathlib import Path

    from metagrad_rl.cli import build_parser

    docs = (Path(__file__).resolve().parents[1] / "docs" / "equations.md").read_text()
    assert meta_grads.markdown_table() in docs
    with pytest.raises(SystemExit):
        build_parser("cln").parse_args(["train", "--algo", "cln", "--help"])
    assert "--meta-grad {" + ",".join(meta_grads.META_GRADS) + "}" in capsys.readouterr().out


def test_fused_round_equals_the_differentiable_rounds(tmp_path):
    """eq17 takes the fused round (policy and critics in one pass); the same estimator
    registered with unroll="round" takes the engine's differentiable unroll then the critic
    round. Both runs must end at the same theta, critics and eta."""
    entry = MetaGrad("eq17-round", "Eq 17 after a differentiable round", _eq17, real_round(False))
    meta_grads.register(entry)
    try:
        train(_config("cln", meta_grad="eq17"), tmp_path / "plain")
        train(_config("cln", meta_grad="eq17-round"), tmp_path / "round")
    finally:
        meta_grads.unregister("eq17-round")
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "round" / "checkpoint.pt", weights_only=True)
    for key in ("theta", "eta"):
        torch.testing.assert_close(flatten(a[key]), flatten(b[key]), rtol=1e-4, atol=1e-6)
    for g in ("v_mix", "v_ex"):
        torch.testing.assert_close(
            flatten(a["critics"][g]), flatten(b["critics"][g]), rtol=1e-4, atol=1e-6
        )
    assert (flatten(a["theta"]) - flatten(b["theta"])).abs().max() < 1e-5


def test_intrinsic_episode_returns_sum_r_in_over_each_finished_episode():
    from metagrad_rl.trainers.bilevel import intrinsic_episode_returns

    r = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    ends = torch.tensor([[False, False], [True, False], [False, True], [True, False]])
    # env 0: episodes 1+2 and 3+4; env 1: 10+20+30, then 40 is unfinished
    assert intrinsic_episode_returns(r, ends) == [3.0, 7.0, 60.0]
    assert intrinsic_episode_returns(r[:, :1].reshape(-1), ends[:, 0]) == [3.0, 7.0]


@pytest.mark.parametrize("eta_lr", [1e-2, 0.0])
def test_a_non_finite_meta_gradient_skips_eta_step_and_is_counted(tmp_path, monkeypatch, eta_lr):
    """One NaN in the meta-gradient would make eta NaN through Adam's moments (even at
    ``eta_lr = 0``: ``0 * NaN``), which is how three 1M-step Hopper runs died. The trainer
    skips that step -- eta and its optimizer state unchanged, bit for bit -- counts it in the
    log, the checkpoint and the summary, and goes on."""
    from metagrad_rl.trainers.bilevel import validation
    from metagrad_rl.trainers.common import optimizer_state_to_list

    real, seen = validation.meta_step, []

    def poisoned(parts, state, rec, data):
        step = real(parts, state, rec, data)
        if not seen:  # the first meta-step: one NaN entry
            k = next(iter(step.grad))
            step.grad[k] = (
                step.grad[k]
                .clone()
                .view(-1)
                .index_fill(0, torch.tensor([0]), torch.nan)
                .view_as(step.grad[k])
            )
        seen.append(
            (
                {k: v.clone() for k, v in state.eta.items()},
                [t.clone() for t in optimizer_state_to_list(state.eta_state)],
            )
        )
        return step

    monkeypatch.setattr(validation, "meta_step", poisoned)
    etas = []
    summary = train(
        _config("cln", eta_lr=eta_lr, total_steps=128 * 4),
        tmp_path / "run",
        on_meta_step=lambda s: etas.append({k: v.clone() for k, v in s.round.eta.items()}),
    )
    assert summary["meta_steps_skipped"] == 1
    # the eta after the poisoned step (the round after it ran with it) is the eta before it
    eta_before, state_before = seen[0]
    eta_after, state_after = seen[1]
    for k in eta_before:
        assert torch.equal(eta_before[k], eta_after[k]), k
    for a, b in zip(state_before, state_after):
        assert torch.equal(a, b)
    # a finite step later does move eta (when eta_lr > 0)
    moved = any(not torch.equal(etas[-1][k], eta_after[k]) for k in eta_after)
    assert moved == (eta_lr > 0)
    rows = (tmp_path / "run" / "progress.csv").read_text().splitlines()
    col = rows[0].split(",").index("meta_steps_skipped")
    assert [r.split(",")[col] for r in rows[1:]] == ["", "1", "1", "1"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["meta_steps_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["eta"].values())


def test_a_diverged_policy_round_is_a_divergence_error_not_bad_input(tmp_path, monkeypatch, capsys):
    """theta turning NaN in training is reported as divergence (where, what to do), one line
    and exit 2 from the CLI -- not as "expected finite input"."""
    from dataclasses import replace

    from metagrad_rl import cli
    from metagrad_rl.errors import DivergenceError
    from metagrad_rl.trainers.bilevel import fused

    real = fused.fused_round

    def diverging(parts, state, data, adv_mix):
        state, log = real(parts, state, data, adv_mix)
        if state.iteration == 1:
            nan = torch.full_like(state.theta["log_std"], torch.nan)
            state = replace(state, theta={**state.theta, "log_std": nan})
        return state, log

    monkeypatch.setattr(fused, "fused_round", diverging)
    with pytest.raises(DivergenceError, match=r"diverged at iteration 2 \(step 256\).*log_std"):
        train(_config("cln"), tmp_path / "a")
    argv = [
        "train",
        "--algo",
        "cln",
        "--env",
        "InvertedPendulum-v5",
        "--num-steps",
        "128",
        "--total-steps",
        "384",
        "--out",
        str(tmp_path / "b"),
        "--no-progress",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("metagrad-rl: error: training diverged at iteration 2")


@pytest.mark.parametrize("meta_grad", ["eq17", "exact"])
def test_the_rounds_return_what_they_change_and_leave_their_input_state(meta_grad):
    """The policy, critic and fused rounds return a new state; the one they were given keeps
    its theta, critics and optimizer states bit for bit (no step writes into it)."""
    from metagrad_rl.trainers.bilevel import collect, intrinsic_rewards, record_round
    from metagrad_rl.trainers.bilevel.critics import critic_round
    from metagrad_rl.trainers.bilevel.fused import fused_round
    from metagrad_rl.trainers.bilevel.policy import policy_round
    from metagrad_rl.trainers.common import optimizer_state_to_list

    cfg = _config("cln", meta_grad=meta_grad)
    parts, s = build(cfg)
    try:
        s, data = collect(parts, s)
        adv = mixed_advantages(parts.settings, data.batch, intrinsic_rewards(parts, s, data))
        s = record_round(parts, s, data)

        def snapshot(st):
            states = [st.theta_state, st.critic_state]
            return [
                flatten(st.theta).clone(),
                st.critics.flat.clone(),
                *[t.clone() for x in states for t in optimizer_state_to_list(x)],
            ]

        before = snapshot(s)
        if parts.meta_grad.continues_from_unroll:
            new, _ = policy_round(s)
            new, _ = critic_round(parts, new, data, adv)
        else:
            new, _ = fused_round(parts, s, data, adv)
        after = snapshot(s)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        moved = snapshot(new)
        assert not torch.equal(moved[0], before[0]) and not torch.equal(moved[1], before[1])
    finally:
        parts.collector.envs.close()


def test_unroll_inputs_default_surrogate_is_one_the_engine_accepts():
    from metagrad_rl.options import MetaGradOptions
    from metagrad_rl.trainers.meta_grads import UnrollInputs

    inputs = UnrollInputs(problem=None, optimizer_at=lambda rec: (None, None))  # type: ignore[arg-type]
    assert MetaGradOptions(surrogate=inputs.surrogate).surrogate == CLNConfig().surrogate
