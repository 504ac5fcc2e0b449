"""DPO, IPO, SimPO and ORPO equal TRL 1.16's own loss code (trl_stand_ins.py) in fp64, losses and gradients, and
known values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.train.objectives.trl_stand_ins import trl_batch_logps, trl_cpo_loss, trl_dpo, trl_orpo
from tuneforge.train.objectives import OBJECTIVES
from tuneforge.train.objectives.preference import dpo_loss, ipo_loss, orpo_loss, simpo_loss

N_PAIRS, WIDTH = 5, 12


def token_logps(seed=0, n_rows=2 * N_PAIRS, width=WIDTH):
    """Per-token log-probs (rows, width - 1) zero outside each row's completion, as a leaf to differentiate, and
    the completion mask (rows, width): a prompt of 1..4 tokens, then 1..7 completion tokens, then padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n_rows, width, dtype=torch.long)
    for i in range(n_rows):
        prompt = int(torch.randint(1, 5, (1,), generator=g))
        mask[i, prompt : prompt + int(torch.randint(1, 8, (1,), generator=g))] = 1
    raw = (-3 * torch.rand(n_rows, width - 1, generator=g, dtype=torch.float64)).requires_grad_()
    return raw, mask


def per_token(raw, mask):
    return raw * mask[:, 1:]


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_dpo_equals_trl_sigmoid_loss_and_gradients(beta):
    raw, mask = token_logps(seed=int(beta * 100))
    ref = -3 * torch.rand(2 * N_PAIRS, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4
    trl_loss, trl_metrics = trl_dpo(per_token(raw, mask), mask, ref[:N_PAIRS], ref[N_PAIRS:], "sigmoid", beta)
    (trl_grad,) = torch.autograd.grad(trl_loss, raw)
    logps = per_token(raw, mask).sum(1)
    losses, metrics = dpo_loss(logps[:N_PAIRS], logps[N_PAIRS:], ref[:N_PAIRS], ref[N_PAIRS:], beta=beta)
    (grad,) = torch.autograd.grad(losses.mean(), raw)
    assert losses.shape == (N_PAIRS,)
    assert_close(losses.mean(), trl_loss)
    assert_close(grad, trl_grad)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert float(metrics[key].mean()) == pytest.approx(trl_metrics[key], rel=1e-12, abs=1e-12)
    # TRL averages the accuracies in fp32 (`.float()`)
    assert float(metrics["rewards/accuracies"].mean()) == pytest.approx(trl_metrics["rewards/accuracies"], rel=1e-7)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.1), (0.5, 0.25), (2.0, 0.4)])
def test_dpo_label_smoothing_equals_trl_conservative_form(beta, eps):
    """TRL 1.16's "sigmoid" DPO has no label smoothing; its cDPO form lives in loss_type="aot", which sorts the
    log-ratios over the batch: on one pair at a time the sort changes nothing and it is exactly cDPO."""
    raw, mask = token_logps(seed=3)
    ref = -10 * torch.rand(2 * N_PAIRS, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logps = per_token(raw, mask).sum(1)
    losses, _ = dpo_loss(logps[:N_PAIRS], logps[N_PAIRS:], ref[:N_PAIRS], ref[N_PAIRS:], beta, eps)
    for i in range(N_PAIRS):
        rows = [i, N_PAIRS + i]
        trl_loss, _ = trl_dpo(
            per_token(raw, mask)[rows], mask[rows], ref[i : i + 1], ref[N_PAIRS + i :][:1], "aot", beta, eps
        )
        assert_close(losses[i], trl_loss)
        assert_close(torch.autograd.grad(losses[i], raw, retain_graph=True)[0], torch.autograd.grad(trl_loss, raw)[0])


def test_dpo_known_values():
    z = torch.zeros(3, dtype=torch.float64)
    losses, metrics = dpo_loss(z - 4.0, z - 7.0, z - 4.0, z - 7.0, beta=0.1)  # policy == reference
    assert_close(losses, torch.full((3,), math.log(2), dtype=torch.float64))
    assert metrics["rewards/accuracies"].tolist() == [0.0, 0.0, 0.0]
    one = torch.tensor([0.0], dtype=torch.float64)
    # h = (-1 - -3) - (-5 - -4) = 3; beta 0.5: -log sigma(1.5) = log(1 + e^-1.5)
    losses, metrics = dpo_loss(one - 1, one - 5, one - 3, one - 4, beta=0.5)
    assert float(losses) == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-14)
    assert float(metrics["rewards/chosen"]) == pytest.approx(1.0) and float(metrics["rewards/rejected"]) == -0.5
    assert float(metrics["rewards/margins"]) == pytest.approx(1.5) and float(metrics["rewards/accuracies"]) == 1.0
    smoothed, _ = dpo_loss(one - 1, one - 5, one - 3, one - 4, beta=0.5, label_smoothing=0.1)
    assert float(smoothed) == pytest.approx(0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5)))


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 1.0])
def test_ipo_equals_trl_with_per_token_averaged_log_ratios(beta):
    raw, mask = token_logps(seed=11 + int(10 * beta))
    ref = -8 * torch.rand(2 * N_PAIRS, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    trl_loss, _ = trl_dpo(per_token(raw, mask), mask, ref[:N_PAIRS], ref[N_PAIRS:], "ipo", beta)
    (trl_grad,) = torch.autograd.grad(trl_loss, raw)
    logps, tokens = per_token(raw, mask).sum(1), mask.sum(1)
    losses, _ = ipo_loss(
        logps[:N_PAIRS], logps[N_PAIRS:], ref[:N_PAIRS], ref[N_PAIRS:], tokens[:N_PAIRS], tokens[N_PAIRS:], beta
    )
    assert_close(losses.mean(), trl_loss)
    assert_close(torch.autograd.grad(losses.mean(), raw)[0], trl_grad)


def test_ipo_known_value():
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    # chosen log-ratio 2 over 4 tokens, rejected -1 over 2: h = 0.5 + 0.5 = 1; beta 0.25: (1 - 2)^2 = 1
    losses, _ = ipo_loss(t(-1.0), t(-6.0), t(-3.0), t(-5.0), torch.tensor([4]), torch.tensor([2]), beta=0.25)
    assert float(losses) == pytest.approx(1.0, rel=1e-14)


def logits_and_labels(seed, n_rows=2 * N_PAIRS, width=WIDTH, vocab=11):
    """Random logits (a leaf) and labels with -100 on a prompt of 1..4 tokens and on right padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, width, vocab, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, vocab, (n_rows, width), generator=g)
    attention = torch.zeros(n_rows, width, dtype=torch.long)
    for i in range(n_rows):
        prompt, completion = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        attention[i, : prompt + completion] = 1
        labels[i, :prompt] = -100
        labels[i, prompt + completion :] = -100
    return logits, labels, attention


def plain_sequence_logps(logits, labels):
    """Sum of log_softmax gathered at the (shifted) trained labels, and their count, per row."""
    targets, trained = labels[:, 1:], labels[:, 1:] != -100
    logps = logits[:, :-1].log_softmax(-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (logps * trained).sum(1), trained.sum(1)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (10.0, 3.0, 0.1), (0.5, 0.0, 0.3)])
def test_simpo_equals_trl_cpo_simpo_loss(beta, gamma, eps):
    logits, labels, _ = logits_and_labels(seed=int(beta * 10 + gamma))
    average = trl_batch_logps(logits, labels, average=True)  # TRL's length normalisation (CPOTrainer, simpo)
    trl_losses, trl_chosen_rewards, _ = trl_cpo_loss(average[:N_PAIRS], average[N_PAIRS:], "simpo", beta, gamma, eps)
    trl_loss = trl_losses.mean()  # cpo_alpha = 0: SimPO has no NLL term
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    logps, tokens = plain_sequence_logps(logits, labels)
    losses, metrics = simpo_loss(
        logps[:N_PAIRS],
        logps[N_PAIRS:],
        tokens[:N_PAIRS],
        tokens[N_PAIRS:],
        beta=beta,
        gamma=gamma,
        label_smoothing=eps,
    )
    assert_close(losses, trl_losses)
    assert_close(torch.autograd.grad(losses.mean(), logits)[0], trl_grad)
    assert_close(metrics["rewards/chosen"], trl_chosen_rewards)


def test_simpo_known_value():
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    # -2 over 4 tokens vs -3 over 2: 2 * (-0.5 - -1.5) - 1 = 1 -> log(1 + e^-1)
    losses, _ = simpo_loss(t(-2.0), t(-3.0), torch.tensor([4]), torch.tensor([2]), beta=2.0, gamma=1.0)
    assert float(losses) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-14)


def orpo_batch(seed):
    """A batch as ORPOTrainer takes it (chosen_*/rejected_* tensors) and the logits its model returns."""
    logits, labels, attention = logits_and_labels(seed)
    ids = labels.clamp(min=0)
    batch = {}
    for name, rows in (("chosen", slice(0, N_PAIRS)), ("rejected", slice(N_PAIRS, None))):
        batch.update(
            {f"{name}_input_ids": ids[rows], f"{name}_attention_mask": attention[rows], f"{name}_labels": labels[rows]}
        )
    return logits, labels, attention, batch


@pytest.mark.parametrize("orpo_lambda", [0.05, 0.1, 0.5, 1.0])
def test_orpo_equals_trl_orpo_loss(orpo_lambda):
    logits, labels, attention, batch = orpo_batch(seed=int(orpo_lambda * 100))
    trl_loss, trl_metrics = trl_orpo(logits, batch, orpo_lambda)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    logps, tokens = plain_sequence_logps(logits, labels)
    # TRL's NLL covers the chosen prompt too (labels = input_ids wherever attended): pass that NLL and its tokens
    nll_labels = torch.where(attention == 1, labels.clamp(min=0), -100)[:N_PAIRS]
    nll_logps, nll_tokens = plain_sequence_logps(logits[:N_PAIRS], nll_labels)
    losses, metrics = orpo_loss(
        logps[:N_PAIRS],
        logps[N_PAIRS:],
        tokens[:N_PAIRS],
        tokens[N_PAIRS:],
        orpo_lambda,
        chosen_nll=-nll_logps,
        mean_nll_tokens=nll_tokens.double().mean(),
    )
    # TRL's odds_ratio_loss computes in fp32 (`.float()`), so it agrees to fp32 precision ...
    ours = losses.mean()
    (grad,) = torch.autograd.grad(ours, logits)
    torch.testing.assert_close(ours, trl_loss.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-7)
    assert float(metrics["log_odds_chosen"].mean()) == pytest.approx(trl_metrics["log_odds_chosen"], abs=1e-6)
    assert float(metrics["nll_loss"].mean()) == pytest.approx(trl_metrics["nll_loss"], rel=1e-12)
    # ... and to fp64 precision with the same formula in fp64 (trl/experimental/orpo/orpo_trainer.py, trl 1.16:
    # odds_ratio_loss and log1mexp, and the chosen cross-entropy of concatenated_forward)
    average = trl_batch_logps(logits, labels, average=True)
    c, r = average[:N_PAIRS], average[N_PAIRS:]

    def trl_log1mexp(x):
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    log_odds = (c - r) - (trl_log1mexp(c) - trl_log1mexp(r))
    nll = F.cross_entropy(logits[:N_PAIRS, :-1].reshape(-1, logits.shape[-1]), nll_labels[:, 1:].reshape(-1))
    reference = nll - (orpo_lambda * F.logsigmoid(log_odds)).mean()
    assert_close(ours, reference)
    assert_close(grad, torch.autograd.grad(reference, logits)[0])


def test_orpo_known_value():
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    # per-token p_c = 1/2, p_r = 1/4 (2 tokens each): log_odds = log(1) - log(1/3) = log 3, log sigma = log(3/4);
    # NLL of the chosen = 2 ln 2 over 2 tokens = ln 2
    two = torch.tensor([2])
    losses, metrics = orpo_loss(t(2 * math.log(0.5)), t(2 * math.log(0.25)), two, two, orpo_lambda=0.1)
    assert float(losses) == pytest.approx(math.log(2) - 0.1 * math.log(0.75), rel=1e-14)
    assert float(metrics["log_odds_chosen"]) == pytest.approx(math.log(3), rel=1e-14)


def test_registry_names_the_objectives_and_their_references():
    assert set(OBJECTIVES) == {"dpo", "ipo", "simpo", "orpo", "kto", "reward"}
    assert {n for n, o in OBJECTIVES.items() if o.needs_reference} == {"dpo", "ipo", "kto"}
    assert {n for n, o in OBJECTIVES.items() if not o.paired} == {"kto"}
    assert OBJECTIVES["dpo"].loss is dpo_loss and OBJECTIVES["reward"].scores == "rewards"


def test_registry_maps_config_keys_to_loss_arguments():
    import inspect
    from types import SimpleNamespace

    section = SimpleNamespace(
        beta=None,
        label_smoothing=0.1,
        simpo_gamma=0.7,
        orpo_lambda=0.2,
        kto_desirable_weight=1.5,
        kto_undesirable_weight=0.5,
        reward_margin=0.0,
    )
    assert OBJECTIVES["simpo"].loss_arguments(section) == {"label_smoothing": 0.1, "gamma": 0.7}  # beta: default
    assert OBJECTIVES["kto"].loss_arguments(section) == {"desirable_weight": 1.5, "undesirable_weight": 0.5}
    for objective in OBJECTIVES.values():
        arguments = inspect.signature(objective.loss).parameters
        assert set(objective.parameters.values()) <= set(arguments), objective.name
