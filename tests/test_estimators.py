"""The generic estimator surrogates, by hand and against an exact categorical expectation."""

from __future__ import annotations

import pytest
import torch

from metagrad_rl.score_function import (
    dice_surrogate,
    leave_one_out_baseline,
    magic_box,
    sampling_aware_surrogate,
    score_function_term,
    total_log_prob,
)


def test_magic_box_is_one_with_the_gradient_of_its_argument():
    x = torch.tensor([0.3, -2.0], dtype=torch.float64, requires_grad=True)
    box = magic_box(x**2)
    assert torch.equal(box.detach(), torch.ones(2, dtype=torch.float64))
    (g,) = torch.autograd.grad(box.sum(), x)
    torch.testing.assert_close(g, 2 * x.detach())


def test_total_log_prob_sequence_and_tensor_agree():
    logp = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(total_log_prob(logp), total_log_prob(list(logp.unbind(-1))))


def test_score_function_term_expectation_on_a_categorical():
    """``E_x[(f(x) - b) grad log p(x)] = grad E_x[f(x)]``, ``x ~ softmax(phi)``, summed exactly."""
    phi = torch.tensor([0.2, -0.4, 1.1], dtype=torch.float64, requires_grad=True)
    f = torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64)
    log_p = torch.log_softmax(phi, -1)
    (truth,) = torch.autograd.grad((log_p.exp() * f).sum(), phi, retain_graph=True)
    for baseline in (0.0, 1.7):
        per_x = score_function_term(f, [log_p], baseline)  # one draw per outcome x
        weights = log_p.exp().detach()
        grads = torch.stack(
            [torch.autograd.grad(per_x[x], phi, retain_graph=True)[0] for x in range(3)]
        )
        torch.testing.assert_close(weights @ grads, truth, rtol=0, atol=1e-15)


def test_dice_value_and_first_derivative():
    eta = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    objective = (eta**2).sum() + 1.0
    logp = [eta[0] * 0.3, eta[1] * eta[0]]
    for baseline in (0.0, 0.4):
        dice = dice_surrogate(objective, logp, baseline)
        assert dice.item() == pytest.approx(objective.item(), abs=1e-15)
        (g_dice,) = torch.autograd.grad(dice, eta, retain_graph=True)
        sa = sampling_aware_surrogate(objective, logp, baseline)
        (g_sa,) = torch.autograd.grad(sa, eta, retain_graph=True)
        by_hand = 2 * eta.detach() + (objective.item() - baseline) * torch.tensor(
            [0.3 + eta[1].item(), eta[0].item()], dtype=torch.float64
        )
        torch.testing.assert_close(g_dice, by_hand, rtol=0, atol=1e-14)
        torch.testing.assert_close(g_sa, by_hand, rtol=0, atol=1e-14)


def test_leave_one_out_baseline():
    v = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64, requires_grad=True)
    b = leave_one_out_baseline(v)
    torch.testing.assert_close(b, torch.tensor([4.0, 3.5, 1.5], dtype=torch.float64))
    assert not b.requires_grad
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_baseline(v[:1])
