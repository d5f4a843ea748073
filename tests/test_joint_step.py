"""The plain round's one optimizer step on ``[theta, critics]``: ``clip_grad_norm(segments=)``
clips each part by its own norm, and ``join_states``/``split_state`` move the optimizer states
between the two forms. One joint step must equal two separate steps."""

from __future__ import annotations

import pytest
import torch

from metagrad_rl.errors import ConfigError
from metagrad_rl.optim import clip_counts, clip_grad_norm, join_states, split_state
from metagrad_rl.trainers.common import make_optimizer


def _parts(gen, scale_a=5.0, scale_b=0.01):
    return torch.randn(7, generator=gen, dtype=torch.float64) * scale_a, torch.randn(
        4, generator=gen, dtype=torch.float64
    ) * scale_b


@pytest.mark.parametrize("inplace", [False, True])
def test_segment_clip_equals_one_clip_per_part(inplace):
    a, b = _parts(torch.Generator().manual_seed(0))  # the first part fires, the second not
    one = clip_grad_norm(1.0)
    seg = clip_grad_norm(1.0, segments=(7, 4))
    (ua,), _ = one.update((a.clone(),), one.init((a,)), inplace=inplace)
    (ub,), _ = one.update((b.clone(),), one.init((b,)), inplace=inplace)
    (u,), state = seg.update((torch.cat([a, b]),), seg.init((torch.cat([a, b]),)), inplace=inplace)
    torch.testing.assert_close(u, torch.cat([ua, ub]), rtol=0, atol=1e-15)
    assert state.fired.tolist() == [1, 0] and state.steps.tolist() == [1, 1]
    assert clip_counts(state) == (1, 2)


def test_segment_clip_is_differentiable_with_one_part_clipped():
    a, b = _parts(torch.Generator().manual_seed(1))
    seg = clip_grad_norm(1.0, segments=(7, 4))
    state = seg.init((torch.cat([a, b]),))

    def f(g):
        return seg.update((g,), state, inplace=False)[0][0]

    g = torch.cat([a, b]).requires_grad_()
    assert torch.autograd.gradcheck(f, (g,))
    assert torch.autograd.gradgradcheck(f, (g,))


def test_segment_clip_refuses_a_vector_of_another_size():
    seg = clip_grad_norm(1.0, segments=(3, 2))
    with pytest.raises(ConfigError, match="one flat vector of 5 entries"):
        seg.update((torch.zeros(6),), seg.init((torch.zeros(6),)))
    with pytest.raises(ConfigError, match="segments"):
        clip_grad_norm(1.0, segments=(3, 0))


def test_joint_steps_equal_separate_steps_and_states_round_trip():
    gen = torch.Generator().manual_seed(2)
    n_a, n_b = 7, 4
    kw = dict(lr=0.1, updates_per_iteration=3, num_iterations=4, max_grad_norm=1.0, eps_root=1e-8)
    tx_a, tx_b = make_optimizer(**kw), make_optimizer(**kw)
    joint_tx = make_optimizer(**kw, segments=(n_a, n_b))
    pa, pb = torch.randn(n_a, dtype=torch.float64), torch.randn(n_b, dtype=torch.float64)
    sa, sb = tx_a.init((pa,)), tx_b.init((pb,))
    joint, sj = torch.cat([pa, pb]), None
    for step in range(6):
        ga, gb = _parts(gen, scale_a=3.0 if step % 2 else 0.1, scale_b=2.0)
        if step == 2:  # switch to the joint form halfway, as a plain round does
            sj = join_states(sa, sb)
        if sj is None:
            ua, sa = tx_a.update((ga,), sa, params=(pa,), inplace=False)
            ub, sb = tx_b.update((gb,), sb, params=(pb,), inplace=False)
            pa, pb = pa + ua[0], pb + ub[0]
            joint = torch.cat([pa, pb])
        else:
            u, sj = joint_tx.update((torch.cat([ga, gb]),), sj, params=(joint,), inplace=False)
            joint = joint + u[0]
        # the reference keeps stepping apart all along
        if sj is not None:
            ua, sa = tx_a.update((ga,), sa, params=(pa,), inplace=False)
            ub, sb = tx_b.update((gb,), sb, params=(pb,), inplace=False)
            pa, pb = pa + ua[0], pb + ub[0]
    torch.testing.assert_close(joint, torch.cat([pa, pb]), rtol=0, atol=1e-14)
    back_a, back_b = split_state(sj, n_a)
    for x, y in zip(torch.utils._pytree.tree_leaves(back_a), torch.utils._pytree.tree_leaves(sa)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-14)
    for x, y in zip(torch.utils._pytree.tree_leaves(back_b), torch.utils._pytree.tree_leaves(sb)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-14)
    assert clip_counts(back_a) == clip_counts(sa) and clip_counts(back_a)[0] > 0


def test_join_refuses_states_at_different_counts():
    tx = make_optimizer(0.1, 3, 4, max_grad_norm=1.0)
    p = torch.zeros(3)
    s0 = tx.init((p,))
    _, s1 = tx.update((torch.ones(3),), s0, params=(p,), inplace=False)
    with pytest.raises(ConfigError, match="different counts"):
        join_states(s0, s1)


def test_permuted_state_steps_like_the_permuted_vector():
    from metagrad_rl.optim import permute_state

    tx = make_optimizer(0.1, 3, 4, max_grad_norm=1.0, eps_root=1e-8)
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(6, generator=gen, dtype=torch.float64)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    s = tx.init((p,))
    g = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(3)]
    u, s = tx.update((g[0],), s, params=(p,), inplace=False)
    p = p + u[0]
    sp, pp = permute_state(s, order), p[order]  # from here on, the permuted problem
    for gi in g[1:]:
        u, s = tx.update((gi,), s, params=(p,), inplace=False)
        p = p + u[0]
        up, sp = tx.update((gi[order],), sp, params=(pp,), inplace=False)
        pp = pp + up[0]
    torch.testing.assert_close(pp, p[order], rtol=0, atol=1e-15)
    back = permute_state(sp, torch.argsort(order))
    for x, y in zip(torch.utils._pytree.tree_leaves(back), torch.utils._pytree.tree_leaves(s)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-15)
