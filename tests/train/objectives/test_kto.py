"""KTO equals TRL 1.16's KTOTrainer._compute_loss (through trl_stand_ins.py) in fp64, and known values."""

import math

import pytest
import torch

from tests.train.objectives.trl_stand_ins import trl_kto
from tuneforge.train.objectives.kto import kto_kl_estimate, kto_loss, mismatched_completion_index

N_ROWS, WIDTH = 7, 9


def per_token(seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(N_ROWS, WIDTH - 1, generator=g) < 0.7).double()
    return (-scale * torch.rand(N_ROWS, WIDTH - 1, generator=g, dtype=torch.float64) * mask).requires_grad_()


@pytest.mark.parametrize(
    "beta,desirable_weight,undesirable_weight,kl_shift",
    [(0.1, 1.0, 1.0, 0.5), (0.5, 1.33, 1.0, 3.0), (2.0, 1.0, 0.7, -2.0), (1.0, 2.0, 3.0, 0.0)],
)
def test_kto_equals_trl(beta, desirable_weight, undesirable_weight, kl_shift):
    """kl_shift moves the policy's KL log-probs: above the reference (KL > 0) or below (clamped to 0)."""
    logps, kl_logps = per_token(int(beta * 10)), per_token(int(beta * 10) + 1)
    labels = [True, False, True, True, False, False, True]
    g = torch.Generator().manual_seed(5)
    ref = -6 * torch.rand(N_ROWS, dtype=torch.float64, generator=g)
    ref_kl = kl_logps.detach().sum(-1) - kl_shift + 0.3 * torch.randn(N_ROWS, dtype=torch.float64, generator=g)
    weights = (beta, desirable_weight, undesirable_weight)
    trl_loss, trl_metrics = trl_kto(logps, kl_logps, labels, ref, ref_kl, *weights)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    losses, metrics = kto_loss(
        logps.sum(-1),
        ref,
        torch.tensor(labels),
        *weights,
        policy_kl_logps=kl_logps.sum(-1),
        reference_kl_logps=ref_kl,
    )
    (grad,) = torch.autograd.grad(losses.mean(), logps)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-10)
    assert float(metrics["kl"]) == pytest.approx(trl_metrics["kl"], rel=1e-12, abs=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert float(metrics[key].mean()) == pytest.approx(trl_metrics[key], rel=1e-12)
    assert float(metrics["rewards/margins"]) == pytest.approx(trl_metrics["rewards/margins"], rel=1e-12)
    # the same with the KL estimate given (as a loop passes the mean gathered over processes)
    kl = kto_kl_estimate(kl_logps.sum(-1), ref_kl)
    given, _ = kto_loss(logps.sum(-1), ref, torch.tensor(labels), *weights, kl=kl)
    torch.testing.assert_close(given, losses, rtol=0, atol=0)


def test_kto_known_values():
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    # r = [2, -1], kl 0.5, beta 1: desirable 1 - sigma(1.5); undesirable 1 - sigma(0.5 - -1) = 1 - sigma(1.5)
    losses, metrics = kto_loss(t(-1.0, -5.0), t(-3.0, -4.0), torch.tensor([True, False]), 1.0, 2.0, 0.5, kl=t(0.5))
    s = 1 / (1 + math.exp(-1.5))
    assert losses.tolist() == pytest.approx([2.0 * (1 - s), 0.5 * (1 - s)], rel=1e-14)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 1.0]
    assert float(metrics["rewards/margins"]) == pytest.approx(3.0)
    # a negative KL estimate counts as 0; no KL at all is 0 too
    clamped, _ = kto_loss(t(-1.0), t(-3.0), torch.tensor([True]), 1.0, kl=t(-4.0))
    none, _ = kto_loss(t(-1.0), t(-3.0), torch.tensor([True]), 1.0)
    assert float(clamped) == float(none) == pytest.approx(1 - 1 / (1 + math.exp(-2.0)), rel=1e-14)


def test_mismatched_completions_are_the_previous_rows_cyclically():
    assert mismatched_completion_index(4) == [3, 0, 1, 2]
    assert mismatched_completion_index(1) == [0]
