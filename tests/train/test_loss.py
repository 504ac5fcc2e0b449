import math

import torch

from tuneforge.train.loss import nll_sum, trained_tokens


def test_nll_sum_matches_hand_computed_value():
    # vocab 2, uniform logits -> every trained position costs log(2)
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[-100, 1, -100, 0]])
    assert trained_tokens(labels) == 2
    assert math.isclose(float(nll_sum(logits, labels)), 2 * math.log(2), rel_tol=1e-6)


def test_step_loss_is_token_weighted_not_mean_of_micro_batch_means():
    torch.manual_seed(0)
    a_logits, a_labels = torch.randn(1, 5, 7), torch.tensor([[0, 1, 2, 3, 4]])        # 4 trained tokens
    b_logits, b_labels = torch.randn(1, 5, 7), torch.tensor([[0, -100, -100, -100, 6]])  # 1 trained token
    total = nll_sum(a_logits, a_labels) + nll_sum(b_logits, b_labels)
    step_loss = total / (trained_tokens(a_labels) + trained_tokens(b_labels))
    flat = torch.nn.functional.cross_entropy(
        torch.cat([a_logits[0, :-1], b_logits[0, :-1]]), torch.cat([a_labels[0, 1:], b_labels[0, 1:]]), ignore_index=-100)
    assert torch.allclose(step_loss, flat, atol=1e-6)
    mean_of_means = (nll_sum(a_logits, a_labels) / 4 + nll_sum(b_logits, b_labels) / 1) / 2
    assert not torch.allclose(step_loss, mean_of_means, atol=1e-3)
