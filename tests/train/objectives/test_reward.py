"""Bradley-Terry reward loss equals TRL 1.16's RewardTrainer.compute_loss; the reward model built on a causal LM's
backbone saves as a directory that AutoModelForSequenceClassification loads with the same scores."""

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from tests.train.objectives.trl_stand_ins import trl_reward
from tuneforge.data.collate import FlatCollator, PaddedCollator
from tuneforge.train.objectives.reward import reward_loss, reward_model_from_causal_lm, sequence_rewards


@pytest.mark.parametrize("margin", [None, "per-pair"])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_equals_trl(margin, center):
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_()
    rejected = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_()
    margins = torch.rand(6, dtype=torch.float64, generator=g) if margin else None
    trl_loss, trl_metrics = trl_reward(chosen, rejected, margins, center)
    trl_grads = torch.autograd.grad(trl_loss, (chosen, rejected))
    losses, metrics = reward_loss(chosen, rejected, margins, center or 0.0)
    grads = torch.autograd.grad(losses.mean(), (chosen, rejected))
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(grads, trl_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    assert float(metrics["rewards/margins"].mean()) == pytest.approx(trl_metrics["margin"], rel=1e-12)
    assert float(metrics["rewards/accuracies"].mean()) == pytest.approx(trl_metrics["accuracy"], rel=1e-7)


def test_reward_loss_known_values():
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    losses, metrics = reward_loss(t(1.0, 0.0), t(0.0, 0.0))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log(2)], rel=1e-14)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    with_margin, _ = reward_loss(t(1.0), t(0.0), margin=0.5)
    assert float(with_margin) == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-14)


def tiny_causal_lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).double()


ROWS = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
    {"input_ids": [5, 6, 11], "labels": [-100, -100, 11]},
    {"input_ids": [12, 13, 14, 15], "labels": [-100, 13, 14, 15]},
]


def test_reward_model_shares_the_backbone_and_loads_with_auto_class(tmp_path):
    causal = tiny_causal_lm()
    reward = reward_model_from_causal_lm(causal)
    assert reward.model is causal.model  # shared, not a copy
    assert reward.config.num_labels == 1 and reward.score.weight.shape == (1, 32)
    with torch.no_grad():
        padded = sequence_rewards(reward, PaddedCollator(0)(ROWS))
        flat = sequence_rewards(reward, FlatCollator(0)(ROWS))
    torch.testing.assert_close(flat, padded, rtol=1e-10, atol=1e-12)
    reward.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(loaded).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        alone = torch.stack([loaded(input_ids=torch.tensor([r["input_ids"]])).logits[0, 0] for r in ROWS])
        batched = loaded(**{k: v for k, v in PaddedCollator(0)(ROWS).items() if k in ("input_ids", "attention_mask")})
    torch.testing.assert_close(alone, padded, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched.logits[:, 0], padded, rtol=1e-10, atol=1e-12)


def test_sequence_rewards_train_the_backbone_and_the_head():
    causal = tiny_causal_lm()
    reward = reward_model_from_causal_lm(causal)
    scores = sequence_rewards(reward, FlatCollator(0)(ROWS))
    losses, _ = reward_loss(scores[:1], scores[1:2])
    losses.mean().backward()
    assert reward.score.weight.grad is not None and causal.model.embed_tokens.weight.grad.abs().sum() > 0
