"""A preference pair's prompt computed once (train/pair_batches.py share_prompt, model/attention.py Segment):
the attention of a segment that continues a shared prompt equals a dense mask of what it may see, on the CPU flash
path and the generic SDPA path, outputs and gradients; and on a tiny Llama (fp64) the shared layout gives the
two separate sequences' log-probs, rewards and gradients."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from tests.model.test_lm_loss import tiny_llama
from tuneforge.model.attention import Segment, packed_sdpa_forward, runs_per_sample, segments, use_packed_sdpa
from tuneforge.model.lm_loss import sequence_logps
from tuneforge.train.objectives.reward import reward_model_from_causal_lm, sequence_rewards
from tuneforge.train.pair_batches import PairBatches


def test_segments_read_shared_prompts_from_the_positions():
    pos = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 4, 0, 1, 2, 1, 2, 0, 1, 5, 6]])
    assert segments(pos) == [
        [
            Segment(0, 5),
            Segment(5, 8, 0, 2),  # attends to tokens 0-1, then itself
            Segment(8, 11),
            Segment(11, 13, 8, 1),
            Segment(13, 15),
            Segment(15, 17),  # position 5 > the 2 tokens of the sample before it: a sample of its own
        ]
    ]


def dense_mask(position_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(rows, length, length) bool: what each token may see, written out from the segments."""
    rows, length = position_ids.shape
    mask = torch.zeros(rows, length, length, dtype=torch.bool)
    for b, row in enumerate(segments(position_ids)):
        for g in row:
            for i in range(g.start, g.end):
                mask[b, i, g.start : i + 1] = True
                mask[b, i, g.prefix_start : g.prefix_start + g.prefix_len] = True
    if window is not None:
        pos = position_ids
        mask &= (pos[:, :, None] - pos[:, None, :]) < window
    return mask


@pytest.mark.parametrize("window", [None, 4], ids=["cpu-flash", "sdpa-windowed"])
def test_attention_of_shared_prompts_equals_a_dense_mask(window):
    # two rows: pairs (prompt 4, chosen 3, rejected 2) and (prompt 1, chosen 2, rejected 3), then one plain sample
    pos = torch.tensor(
        [
            [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 0, 1, 2, 0, 1, 2, 3],
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5, 6, 0, 1, 2],
        ]
    )
    g = torch.Generator().manual_seed(5)
    length = pos.shape[1]
    q, k, v = (torch.randn(2, h, length, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    kwargs = {"sliding_window": window} if window else {}
    out, _ = packed_sdpa_forward(None, q, k, v, None, position_ids=pos, **kwargs)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]
    ref_out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(pos, window)[:, None], enable_gqa=True)
    ref_out = ref_out.transpose(1, 2)
    ref = [ref_out.detach(), *torch.autograd.grad(ref_out, (q, k, v), grad_out)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # a rejected completion sees nothing of the chosen one before it
    k2 = k.detach().clone()
    k2[0, :, 4:7] += 1.0  # chosen tokens of the first pair
    again, _ = packed_sdpa_forward(None, q.detach(), k2, v.detach(), None, position_ids=pos, **kwargs)
    assert torch.equal(again[0, 7:10], out[0, 7:10].detach()) and not torch.equal(again[0, 4:7], out[0, 4:7].detach())


def pair_rows(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)

    def tokens(lo, hi):
        return torch.randint(3, 60, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    rows = [{"prompt_ids": tokens(1, 9), "chosen_ids": tokens(1, 8), "rejected_ids": tokens(1, 8)} for _ in range(n)]
    rows[0]["prompt_ids"] = rows[0]["prompt_ids"][:1]  # a one-token prompt: its rejected completion starts anew
    return rows


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "labels", "position_ids")}


@pytest.mark.parametrize("chunked", [False, True])
def test_shared_prompt_pairs_give_the_separate_sequences_logps_and_gradients(chunked):
    model = tiny_llama(lora=True)
    assert use_packed_sdpa(model) and runs_per_sample(model)
    rows = pair_rows()
    shared = PairBatches(0, padding_free=True, share_prompt=True)(rows)
    apart = PairBatches(0, padding_free=True)(rows)
    saved = sum(len(r["prompt_ids"]) - 1 for r in rows)  # each prompt once, its last token twice
    assert shared["input_ids"].shape[1] == apart["input_ids"].shape[1] - saved
    results = []
    for batch in (shared, apart):
        model.zero_grad()
        logps, tokens = sequence_logps(model, model_inputs(batch), chunked=chunked)
        (logps * torch.linspace(0.5, 1.5, logps.numel(), dtype=logps.dtype)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), tokens, grads))
    (a, ta, ga), (b, tb, gb) = results
    assert a.shape == (8,) and torch.equal(ta, tb)
    assert ta[0::2].tolist() == [len(r["chosen_ids"]) for r in rows]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert ga.keys() == gb.keys() and len(ga) > 0
    # Llama's RMSNorm computes in fp32 even in an fp64 model, and the shared layout runs its backward once on the
    # prompt's summed gradient where the separate sequences run it on each copy: fp32 rounding, not more
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-6, atol=1e-7, msg=name)


def test_shared_prompt_pairs_give_the_separate_sequences_rewards():
    causal = tiny_llama()
    causal.config.pad_token_id = 0
    reward = get_peft_model(
        reward_model_from_causal_lm(causal).double(),
        LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False),
    )
    assert use_packed_sdpa(reward)
    rows = pair_rows(seed=4)
    scores = [
        sequence_rewards(reward, model_inputs(PairBatches(0, padding_free=True, share_prompt=share)(rows)))
        for share in (True, False)
    ]
    assert scores[0].shape == (8,)
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=1e-12)


def test_share_prompt_needs_padding_free_batches():
    rows = pair_rows()
    padded = PairBatches(0, padding_free=False, share_prompt=True)(rows)
    assert padded["input_ids"].shape[0] == 8 and "position_ids" not in padded
