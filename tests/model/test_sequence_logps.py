"""sequence_logps: per-sequence sums of trained-token log-probs, padded and padding-free, vs a full-logits gather."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tuneforge.data.collate import FlatCollator, PaddedCollator
from tuneforge.model.attention import use_packed_sdpa
from tuneforge.model.lm_loss import linear_token_logps, output_layer, sequence_logps, token_logps


def tiny_llama(lora=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).double()
    if lora:
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
        )
    return model


def pair_rows(n_pairs=4, seed=7):
    """chosen/rejected rows sharing a prompt (as a preference batch lays them out), prompts of varying length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_pairs):
        prompt = torch.randint(3, 60, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(2):
            completion = torch.randint(3, 60, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
            rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return rows


def full_logits_reference(model, rows):
    """Each sequence alone, full logits, log_softmax, gather the trained labels: the plain definition."""
    sums, counts = [], []
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        labels = torch.tensor(r["labels"][1:])
        logps = model(input_ids=ids, use_cache=False).logits[0, :-1].log_softmax(-1)
        trained = labels != -100
        sums.append(logps[trained].gather(1, labels[trained][:, None]).sum())
        counts.append(int(trained.sum()))
    return torch.stack(sums), torch.tensor(counts)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunked", [False, True], ids=["unfused", "chunked"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("per_sample_sdpa", [False, True])
def test_sequence_logps_equal_full_logits_gather_padded_and_padding_free(lora, per_sample_sdpa, chunked):
    model = tiny_llama(lora)
    if per_sample_sdpa:
        assert use_packed_sdpa(model)
    rows = pair_rows()
    weights = torch.linspace(-1.0, 2.0, len(rows), dtype=torch.float64)  # a loss that weighs each sequence
    ref_sum, ref_n = full_logits_reference(model, rows)
    g_ref = grads(model, (weights * ref_sum).sum())
    padded, flat = PaddedCollator(0)(rows), FlatCollator(0)(rows)
    assert flat["input_ids"].shape[0] == 1
    for batch in (padded, flat):
        logp_sum, n_tokens = sequence_logps(model, batch, chunked=chunked)
        assert logp_sum.dtype == torch.float64 and logp_sum.shape == (len(rows),)
        torch.testing.assert_close(n_tokens, ref_n, rtol=0, atol=0)
        torch.testing.assert_close(logp_sum, ref_sum, rtol=1e-10, atol=1e-10)
        g = grads(model, (weights * logp_sum).sum())
        assert g.keys() == g_ref.keys() and len(g) > 0
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-10)


def test_token_logps_and_entropies_chunked_equal_unfused():
    """GRPO's per-token view: each trained token's log-prob, its sequence and its entropy, the same both ways."""
    model = tiny_llama(lora=True)
    flat = FlatCollator(0)(pair_rows())
    logps, owner, entropy, n_seq = token_logps(model, flat, chunked=False, entropy=True)
    c_logps, c_owner, c_entropy, c_n = token_logps(model, flat, chunked=True, entropy=True)
    assert n_seq == c_n == 8 and owner.tolist() == c_owner.tolist() == sorted(owner.tolist())
    torch.testing.assert_close(c_logps, logps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_entropy, entropy, rtol=1e-12, atol=1e-12)
    assert float(entropy.min()) > 0 and float(entropy.max()) < torch.log(torch.tensor(64.0))
    ref_sum, _ = full_logits_reference(model, pair_rows())
    torch.testing.assert_close(torch.zeros(8, dtype=torch.float64).index_add(0, c_owner, c_logps), ref_sum)


def test_lm_head_sees_only_trained_positions():
    model = tiny_llama()
    rows = pair_rows()
    seen = []
    handle = output_layer(model).register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    _, n_tokens = sequence_logps(model, FlatCollator(0)(rows))
    sequence_logps(model, FlatCollator(0)(rows), chunked=True)
    sequence_logps(model, FlatCollator(0)(rows), chunked=True)
    handle.remove()
    # unfused: trained positions only; chunked: one row to check the head on the first call, then none at all
    assert seen == [(int(n_tokens.sum()), 64), (1, 64), (0, 64)]
    assert int(n_tokens.sum()) < sum(len(r["input_ids"]) for r in rows)


@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["moderate", "far-targets"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_linear_token_logps_in_chunks_equal_log_softmax_gather(bias, frozen_head, scale):
    """far-targets: logits spread so widely that some targets' probabilities underflow (below TINY)."""
    g = torch.Generator().manual_seed(0)
    hidden = (scale * torch.randn(11, 8, dtype=torch.float64, generator=g)).requires_grad_()
    weight = torch.randn(13, 8, dtype=torch.float64, generator=g).requires_grad_(not frozen_head)
    b = torch.randn(13, dtype=torch.float64, generator=g).requires_grad_(not frozen_head) if bias else None
    targets = torch.randint(0, 13, (11,), generator=g)
    targets[0] = int(F.linear(hidden[:1], weight, b).argmin())  # an unlikely target too
    upstream = torch.randn(11, dtype=torch.float64, generator=g)  # a different gradient for every row
    leaves = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    ref = F.linear(hidden, weight, b).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    if scale > 1:
        assert float(ref.min()) < -100  # some probability below 1e-30
    ref_grads = torch.autograd.grad((ref * upstream).sum(), leaves)
    for rows in (3, 4, 11, 128):
        ours = linear_token_logps(hidden, weight, b, targets, rows=rows)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(torch.autograd.grad((ours * upstream).sum(), leaves), ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # with the entropies (GRPO's metric): the same log-probs and gradients, and -sum p log p per row, detached
    logp_all = F.linear(hidden, weight, b).log_softmax(-1)
    want_entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    ours, entropy = linear_token_logps(hidden, weight, b, targets, rows=4, entropy=True)
    assert not entropy.requires_grad and entropy.shape == (11,)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad((ours * upstream).sum(), leaves), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_known_value_uniform_model():
    """A head of zeros gives every token log(1/64): the sum is -n log 64."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]},
    ]
    logp_sum, n_tokens = sequence_logps(model, FlatCollator(0)(rows))
    assert n_tokens.tolist() == [2, 2]
    torch.testing.assert_close(logp_sum, -2 * torch.log(torch.tensor([64.0, 64.0], dtype=torch.float64)))


def test_sequence_without_trained_tokens_sums_to_zero():
    model = tiny_llama()
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}, {"input_ids": [9, 10], "labels": [-100, 10]}]
    for batch in (PaddedCollator(0)(rows), FlatCollator(0)(rows)):
        logp_sum, n_tokens = sequence_logps(model, batch)
        assert n_tokens.tolist() == [0, 1] and float(logp_sum[0]) == 0.0
