import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tuneforge.data.collate import PackedCollator, PaddedCollator, rows_at
from tuneforge.data.packing import best_fit_decreasing, pack_dataset
from tuneforge.model.lm_loss import forward_logits, nll_sum, trained_tokens


def test_best_fit_decreasing_places_every_sample_once_within_capacity():
    lengths = [7, 5, 4, 3, 3, 2, 2, 1, 9, 10]
    bins = best_fit_decreasing(lengths, 10)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # 46 tokens need at least 5 rows of 10; BFD finds exactly that here
    with pytest.raises(ValueError, match="exceeds the row capacity 10"):
        best_fit_decreasing([11], 10)


def sample_rows(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = torch.randint(3, 50, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def test_packed_rows_keep_samples_whole_with_restarting_positions():
    rows = sample_rows()
    packed, report = pack_dataset(datasets.Dataset.from_list(rows), 32)
    assert report["samples"] == 12 and report["rows"] == len(packed)
    assert report["efficiency"] == sum(len(r["input_ids"]) for r in rows) / (32 * len(packed))
    seen = []
    for row in packed:
        assert len(row["input_ids"]) <= 32 and sum(row["seq_lens"]) == len(row["input_ids"])
        start = 0
        for n in row["seq_lens"]:
            assert row["position_ids"][start : start + n] == list(range(n))
            assert row["labels"][start] == -100  # no sample is predicted from its neighbour's last token
            seen.append(tuple(row["input_ids"][start : start + n]))
            start += n
    assert sorted(seen) == sorted(tuple(r["input_ids"]) for r in rows)


def test_packed_collator_pads_with_a_separate_position_run():
    batch = PackedCollator(pad_id=0)(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, 8, 9], "position_ids": [0, 1, 0, 1, 2]},
            {"input_ids": [4, 4, 4], "labels": [-100, 4, 4], "position_ids": [0, 1, 2]},
        ]
    )
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist()[1] == [-100, 4, 4, -100, -100]
    assert "attention_mask" not in batch and int(batch["num_tokens"]) == 8


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).double()


def loss_and_grads(model, batch):
    model.zero_grad()
    nll = nll_sum(forward_logits(model, batch), batch["labels"])
    nll.backward()
    return float(nll), trained_tokens(batch["labels"]), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_unpacked_give_the_same_loss_and_gradients(attention):
    model = tiny_llama()
    model.config._attn_implementation = attention
    rows = sample_rows(10, seed=3)
    ds = datasets.Dataset.from_list(rows)
    unpacked = PaddedCollator(0)(rows_at(ds, list(range(len(ds)))))
    unpacked.pop("num_tokens")
    packed_ds, _ = pack_dataset(ds, 40)
    packed = PackedCollator(0)(rows_at(packed_ds, list(range(len(packed_ds)))))
    packed.pop("num_tokens")
    u_loss, u_n, u_grads = loss_and_grads(model, unpacked)
    p_loss, p_n, p_grads = loss_and_grads(model, packed)
    assert p_n == u_n
    assert p_loss == pytest.approx(u_loss, rel=1e-10)
    for name in u_grads:
        torch.testing.assert_close(p_grads[name], u_grads[name], rtol=1e-8, atol=1e-10)


def test_packed_values_are_the_samples_in_packing_order():
    rows = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [], "labels": []},
        {"input_ids": [4, 5, 6, 7, 8], "labels": [4, 5, 6, 7, 8]},
        {"input_ids": [9, 10], "labels": [9, -100]},
    ]
    packed, report = pack_dataset(datasets.Dataset.from_list(rows), 8)
    assert packed[:] == {
        "input_ids": [[4, 5, 6, 7, 8, 1, 2, 3], [9, 10]],
        "labels": [[-100, 5, 6, 7, 8, -100, 2, 3], [-100, -100]],
        "position_ids": [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1]],
        "seq_lens": [[5, 3, 0], [2]],  # the empty sample fits the full row
        "num_tokens": [8, 2],
        "num_trained": [6, 0],
    }
    assert report == {"samples": 4, "rows": 2, "efficiency": 10 / 16, "efficiency_unpacked": 10 / 32}


def test_packing_reads_columns_of_any_chunking():
    import pyarrow as pa

    rows = sample_rows(9, seed=5)
    ids = [r["input_ids"] for r in rows]
    labels = [r["labels"] for r in rows]
    chunked = pa.table(
        {
            "input_ids": pa.chunked_array([ids[:2], ids[2:5], ids[5:]], pa.list_(pa.int32())),
            "labels": pa.chunked_array([labels[:4], labels[4:]], pa.list_(pa.int64())),
        }
    )
    one = datasets.Dataset.from_dict(
        {"input_ids": ids, "labels": labels},
        features=datasets.Features(
            {"input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int64"))}
        ),
    )
    a, ra = pack_dataset(datasets.Dataset(chunked), 24)
    b, rb = pack_dataset(one, 24)
    assert a[:] == b[:] and ra == rb and a.features == b.features
