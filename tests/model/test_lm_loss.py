import math

import torch

from tuneforge.model.lm_loss import nll_sum, trained_tokens


def test_nll_sum_matches_hand_computed_value():
    # vocab 2, uniform logits -> every trained position costs log(2)
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[-100, 1, -100, 0]])
    assert trained_tokens(labels) == 2
    assert math.isclose(float(nll_sum(logits, labels)), 2 * math.log(2), rel_tol=1e-6)


def test_step_loss_is_token_weighted_not_mean_of_micro_batch_means():
    torch.manual_seed(0)
    a_logits, a_labels = torch.randn(1, 5, 7), torch.tensor([[0, 1, 2, 3, 4]])  # 4 trained tokens
    b_logits, b_labels = torch.randn(1, 5, 7), torch.tensor([[0, -100, -100, -100, 6]])  # 1 trained token
    total = nll_sum(a_logits, a_labels) + nll_sum(b_logits, b_labels)
    step_loss = total / (trained_tokens(a_labels) + trained_tokens(b_labels))
    flat = torch.nn.functional.cross_entropy(
        torch.cat([a_logits[0, :-1], b_logits[0, :-1]]),
        torch.cat([a_labels[0, 1:], b_labels[0, 1:]]),
        ignore_index=-100,
    )
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
from tuneforge.model.lm_loss import forward_logits, output_layer, trained_nll_sum  # noqa: E402


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


@pytest.mark.parametrize("chunked", [False, True], ids=["unfused", "chunked"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_selecting_trained_positions_before_the_lm_head_equals_the_full_logit_loss(lora, layout, chunked):
    model = tiny_llama(lora)
    batch = batches(varied_rows())[layout]
    full, g_full = grads_of(model, lambda: nll_sum(forward_logits(model, batch), batch["labels"]))
    seen = []
    handle = output_layer(model).register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    sel, g_sel = grads_of(model, lambda: trained_nll_sum(model, batch, chunked=chunked))
    again, _ = grads_of(model, lambda: trained_nll_sum(model, batch, chunked=chunked))
    handle.remove()
    if chunked:  # one row to check the head on the first call, then no full-vocabulary logits at all
        assert seen == [1, 0]
    else:
        assert seen == [trained_tokens(batch["labels"])] * 2
    assert sel == pytest.approx(full, rel=1e-12) and again == pytest.approx(full, rel=1e-12)
    assert g_full.keys() == g_sel.keys() and len(g_full) > 0
    if not lora:
        assert "lm_head.weight" in g_sel  # full fine-tuning: the head's own gradient (from the chunks when chunked)
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
                ids = torch.tensor([row["input_ids"][start : start + n]])
                alone = model(input_ids=ids, use_cache=False).logits[0]
                torch.testing.assert_close(logits[start : start + n], alone, rtol=1e-10, atol=1e-11)
                start += n


# ---------------------------------------------------------------------------- padding-free rows, per-sample SDPA
from tuneforge.data.collate import FlatCollator  # noqa: E402
from tuneforge.model.attention import NAME, Segment, packed_calls, segments, use_packed_sdpa  # noqa: E402


def test_segments_start_where_position_ids_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segments(pos) == [[Segment(0, 3), Segment(3, 5), Segment(5, 6)], [Segment(0, 6)]]


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


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements of any tensor an operation creates."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_padding_free_rows_build_no_row_by_row_mask():
    rows = varied_rows(60, seed=11)
    ds = datasets.Dataset.from_list(rows)
    flat = FlatCollator(0)(rows_at(ds, list(range(len(ds)))))
    length = flat["input_ids"].shape[1]
    assert length > 1000
    model = tiny_llama()
    use_packed_sdpa(model)
    with _LargestTensor() as plain:  # called as is, transformers builds its block-diagonal (row x row) mask ...
        model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False)
    assert plain.largest >= length * length
    with _LargestTensor() as ours:  # ... which the per-sample attention never reads: the loss leaves it out
        loss = trained_nll_sum(model, flat)
    assert ours.largest <= 64 * length  # nothing wider than the MLP and the logits (64 here)
    with torch.no_grad():
        padded = trained_nll_sum(model, PaddedCollator(0)(rows_at(ds, list(range(len(ds))))))
    assert float(loss) == pytest.approx(float(padded), rel=1e-10)


def test_per_sample_attention_keeps_a_sliding_window_within_each_sample():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=6,
    )
    model = MistralForCausalLM(cfg).double().eval()
    model.config._attn_implementation = "sdpa"
    rows = varied_rows(5, seed=4)
    assert max(len(r["input_ids"]) for r in rows) > 6 > min(len(r["input_ids"]) for r in rows)
    short = [{k: v[:6] for k, v in r.items()} for r in rows]
    with torch.no_grad():
        alone = {
            id(r): model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0] for r in rows + short
        }
        use_packed_sdpa(model)
        # samples past the window: SDPA per sample with a window mask; all within it: the CPU flash Function
        for group in (rows, short):
            ds = datasets.Dataset.from_list(group)
            got = forward_logits(model, FlatCollator(0)(rows_at(ds, list(range(len(ds))))))[0]
            start = 0
            for r in group:
                n = len(r["input_ids"])
                torch.testing.assert_close(got[start : start + n], alone[id(r)], rtol=1e-10, atol=1e-11)
                start += n


def test_cpu_flash_per_sample_function_equals_autograd_sdpa_on_each_slice():
    from tuneforge.model.attention import PackedFlashCPU

    g = torch.Generator().manual_seed(3)
    bounds = [[Segment(0, 5), Segment(5, 17), Segment(17, 20)], [Segment(0, 20)]]  # two rows: 3 samples, then 1
    # (batch, seq, heads, dim) storage seen as (batch, heads, seq, dim), as the Llama attention hands it over
    q, k, v = (torch.randn(2, 20, h, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    out = PackedFlashCPU.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bounds, None)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rows = [
        torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    qt[b : b + 1, :, s:e], kt[b : b + 1, :, s:e], vt[b : b + 1, :, s:e], is_causal=True, enable_gqa=True
                )
                for s, e, _, _ in row
            ],
            dim=2,
        )
        for b, row in enumerate(bounds)
    ]
    ref_out = torch.cat(rows).transpose(1, 2)
    ref = [ref_out.detach(), *torch.autograd.grad(ref_out, (q, k, v), grad_out)]
    assert out.shape == (2, 20, 4, 8) and out.is_contiguous()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    # a sample sees nothing of the one before it: changing sample 1's keys leaves sample 2's output as it was
    k2 = k.detach().clone()
    k2[0, :5] += 1.0
    again = PackedFlashCPU.apply(q.transpose(1, 2), k2.transpose(1, 2), v.transpose(1, 2), bounds, None)
    assert torch.equal(again[0, 5:], out[0, 5:].detach()) and not torch.equal(again[0, :5], out[0, :5].detach())


# ---------------------------------------------------------------------------- chunked LM head + cross-entropy
from tuneforge.model.linear_cross_entropy import (  # noqa: E402
    _WORKSPACE,
    chunk_rows,
    linear_cross_entropy_sum,
)


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_linear_cross_entropy_equals_the_unfused_loss_and_gradients(rows, bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, 40, (50,), generator=g)
    inputs = (h, w) + ((b,) if bias else ())
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), t, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.3, inputs)  # a scale, as the step's 1/trained_tokens
    got = linear_cross_entropy_sum(h, w, b, t, rows=rows)
    got_grads = torch.autograd.grad(got * 0.3, inputs)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(float(ref), rel=1e-13)
    for r, q in zip(ref_grads, got_grads):
        torch.testing.assert_close(q, r, rtol=1e-12, atol=1e-13)


def test_chunked_linear_cross_entropy_without_gradients_and_with_no_rows():
    w = torch.randn(10, 4)
    with torch.no_grad():
        h, t = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 9])
        expected = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
        assert float(linear_cross_entropy_sum(h, w, None, t, rows=4)) == pytest.approx(float(expected), rel=1e-6)
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = linear_cross_entropy_sum(empty, w, None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and empty.grad.shape == (0, 4)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_cross_entropy_sum(torch.zeros(2, 3, 4), w, None, torch.zeros(2, dtype=torch.long))


def test_chunk_rows_fill_the_workspace_and_the_workspace_is_kept_between_calls():
    assert chunk_rows(32000) == 524 and 524 * 32000 <= 16 * 2**20
    assert chunk_rows(128256) == 130 and chunk_rows(256000) == 128  # never fewer rows than an efficient matmul needs
    assert chunk_rows(64) == (16 * 2**20) // 64
    g = torch.Generator().manual_seed(1)
    w, t = torch.randn(30, 8, generator=g), torch.randint(0, 30, (20,), generator=g)
    h = torch.randn(20, 8, generator=g, requires_grad=True)
    first = linear_cross_entropy_sum(h, w, None, t, rows=8)
    buf = _WORKSPACE[("cpu", torch.float32)]
    assert buf.numel() >= 8 * 30
    second = linear_cross_entropy_sum(h, w, None, t, rows=8)
    assert _WORKSPACE[("cpu", torch.float32)].data_ptr() == buf.data_ptr()  # the same pages, no new allocation
    assert float(first) == float(second)


def test_chunked_linear_cross_entropy_under_autocast_keeps_the_softmax_in_fp32():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(12, 16, generator=g, requires_grad=True)
    w = torch.randn(24, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 24, (12,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), t, reduction="sum")
        got = linear_cross_entropy_sum(h, w, None, t, rows=5)
    assert got.dtype == torch.float32 and float(got) == pytest.approx(float(ref), rel=1e-6)
    ref_grads, got_grads = torch.autograd.grad(ref, (h, w)), torch.autograd.grad(got, (h, w))
    for r, q in zip(ref_grads, got_grads):
        assert q.dtype == torch.float32
        torch.testing.assert_close(q, r, rtol=2e-2, atol=2e-2)  # bf16 matmuls on both sides


def test_chunked_loss_falls_back_to_the_models_own_head_when_the_model_changes_its_logits():
    model = tiny_llama()
    batch = batches(varied_rows())["padded"]
    # a model that soft-caps its logits after the LM head (as Gemma 2 does): a hook stands in for it
    model.lm_head.register_forward_hook(lambda m, a, out: 5.0 * torch.tanh(out / 5.0))
    full = float(nll_sum(forward_logits(model, batch), batch["labels"]))
    assert float(trained_nll_sum(model, batch, chunked=True)) == pytest.approx(full, rel=1e-12)
    assert float(trained_nll_sum(model, batch, chunked=True)) == pytest.approx(full, rel=1e-12)
    unchanged = float(linear_cross_entropy_sum(*_head_inputs(model, batch)))
    assert unchanged != pytest.approx(full, rel=1e-6)  # the check mattered: the plain head gives another loss


def _head_inputs(model, batch):
    kept = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, a: kept.append(a[0]))
    with torch.no_grad():
        forward_logits(model, batch)
    handle.remove()
    labels = batch["labels"]
    mask = labels[:, 1:] != -100
    hidden = kept[0][:, :-1][mask]
    return hidden, model.lm_head.weight, model.lm_head.bias, labels[:, 1:][mask]


def test_chunked_linear_cross_entropy_is_exact_for_targets_far_below_the_top_logit():
    # target logits 60-120 below the largest: their softmax probability underflows fp32 (or keeps few digits)
    h = torch.eye(4, 8, dtype=torch.float32, requires_grad=True)
    w = torch.zeros(6, 8)
    w[0, :4] = torch.tensor([60.0, 90.0, 120.0, 1.0])
    t = torch.tensor([1, 1, 1, 0])
    ref = torch.nn.functional.cross_entropy(h.double() @ w.double().T, t, reduction="none")
    assert float(ref[2]) > 119  # exp(-120) is below fp32's smallest normal number
    got = linear_cross_entropy_sum(h, w, None, t)
    assert float(got) == pytest.approx(float(ref.sum()), rel=1e-6)
    got.backward()
    assert torch.isfinite(h.grad).all()


def test_rows_holding_several_samples_are_stopped_when_attention_never_split_them():
    from tuneforge.model.attention import check_samples_kept_apart, samples_share_rows

    assert not samples_share_rows(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]))  # one sample per row
    assert samples_share_rows(torch.tensor([[0, 1, 0, 1, 2]]))
    check_samples_kept_apart("LlamaForCausalLM", calls=4)  # the per-sample attention ran: fine
    with pytest.raises(
        RuntimeError,
        match="LlamaForCausalLM's attention does not receive position_ids.*"
        "set train.padding_free=false and data.packing=false",
    ):
        check_samples_kept_apart("LlamaForCausalLM", calls=0)
