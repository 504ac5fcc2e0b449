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


# ---------------------------------------------------------------------------- LM head only at trained positions
import datasets  # noqa: E402
import pytest  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tuneforge.data.collate import PackedCollator, PaddedCollator, rows_at  # noqa: E402
from tuneforge.data.packing import pack_dataset  # noqa: E402
from tuneforge.train.loss import forward_logits, output_layer, trained_nll_sum  # noqa: E402


def varied_rows(n=10, seed=3):
    """Rows of 3..40 tokens with prompts of varying length (very different trained-token counts)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 40, (1,), generator=g))
        ids = torch.randint(3, 50, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def tiny_llama(lora=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).double()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))
    return model


def batches(rows):
    ds = datasets.Dataset.from_list(rows)
    padded = PaddedCollator(0)(rows_at(ds, list(range(len(ds)))))
    packed_ds, _ = pack_dataset(ds, 48)
    packed = PackedCollator(0)(rows_at(packed_ds, list(range(len(packed_ds)))))
    return {"padded": padded, "packed": packed}


def grads_of(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_selecting_trained_positions_before_the_lm_head_equals_the_full_logit_loss(lora, layout):
    model = tiny_llama(lora)
    batch = batches(varied_rows())[layout]
    full, g_full = grads_of(model, lambda: nll_sum(forward_logits(model, batch), batch["labels"]))
    sel, g_sel = grads_of(model, lambda: trained_nll_sum(model, batch))
    assert sel == pytest.approx(full, rel=1e-12)
    assert g_full.keys() == g_sel.keys() and len(g_full) > 0
    for name in g_full:
        torch.testing.assert_close(g_sel[name], g_full[name], rtol=1e-10, atol=1e-12)


def test_the_lm_head_sees_only_trained_positions():
    model = tiny_llama()
    batch = batches(varied_rows())["padded"]
    seen = []
    handle = output_layer(model).register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    trained_nll_sum(model, batch)
    handle.remove()
    assert seen == [(trained_tokens(batch["labels"]), 64)]
    assert trained_tokens(batch["labels"]) < batch["input_ids"].numel() // 2


def test_packed_sdpa_attention_equals_running_each_sample_alone():
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    rows = varied_rows(8, seed=5)
    packed_ds, _ = pack_dataset(datasets.Dataset.from_list(rows), 48)
    assert any(len(r["seq_lens"]) > 1 for r in packed_ds)  # really packed
    with torch.no_grad():
        for row in packed_ds:
            batch = PackedCollator(0)([row])
            logits = forward_logits(model, batch)[0]
            start = 0
            for n in row["seq_lens"]:
                ids = torch.tensor([row["input_ids"][start:start + n]])
                alone = model(input_ids=ids, use_cache=False).logits[0]
                torch.testing.assert_close(logits[start:start + n], alone, rtol=1e-10, atol=1e-11)
                start += n


# ---------------------------------------------------------------------------- padding-free rows, per-sample SDPA
from tuneforge.data.collate import FlatCollator  # noqa: E402
from tuneforge.model.attention import NAME, packed_calls, segments, use_packed_sdpa  # noqa: E402


def test_segments_start_where_position_ids_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segments(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


@pytest.mark.parametrize("lora", [False, True])
def test_padding_free_rows_with_per_sample_sdpa_give_the_padded_loss_and_gradients(lora):
    rows = varied_rows(10, seed=7)
    ds = datasets.Dataset.from_list(rows)
    padded = PaddedCollator(0)(rows_at(ds, list(range(len(ds)))))
    flat = FlatCollator(0)(rows_at(ds, list(range(len(ds)))))
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))  # not one pad token
    assert trained_tokens(flat["labels"]) == trained_tokens(padded["labels"])
    model = tiny_llama(lora)
    ref, g_ref = grads_of(model, lambda: trained_nll_sum(model, padded))
    assert use_packed_sdpa(model) and model.config._attn_implementation == NAME
    before = packed_calls()
    got, g_got = grads_of(model, lambda: trained_nll_sum(model, flat))
    assert packed_calls() - before == 2  # both layers split the row by sample
    assert got == pytest.approx(ref, rel=1e-10)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-9, atol=1e-12)
    # the same model still takes ordinary padded batches (evaluation, generation): plain SDPA with the mask
    again, _ = grads_of(model, lambda: trained_nll_sum(model, padded))
    assert again == pytest.approx(ref, rel=1e-12)


def test_per_sample_sdpa_on_packed_rows_equals_the_block_mask():
    rows = varied_rows(12, seed=9)
    packed_ds, _ = pack_dataset(datasets.Dataset.from_list(rows), 48)
    batch = PackedCollator(0)(rows_at(packed_ds, list(range(len(packed_ds)))))
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    ref, g_ref = grads_of(model, lambda: trained_nll_sum(model, batch))  # transformers' block-diagonal mask
    use_packed_sdpa(model)
    got, g_got = grads_of(model, lambda: trained_nll_sum(model, batch))
    assert got == pytest.approx(ref, rel=1e-10)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-9, atol=1e-12)
