import torch

from tuneforge.data.collate import PaddedCollator


def test_padding_is_never_trained_even_when_pad_equals_eos():
    eos = 2
    rows = [{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]}, {"input_ids": [8], "labels": [8]}]
    batch = PaddedCollator(pad_id=eos)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 2], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 2], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_to_multiple_of():
    batch = PaddedCollator(pad_id=0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert batch["input_ids"].shape == (1, 8) and batch["input_ids"].dtype == torch.long


def test_flat_collator_lays_rows_end_to_end_without_padding():
    from tuneforge.data.collate import FlatCollator

    out = FlatCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 8 would be predicted from sample 1's last token
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert (int(out["num_tokens"]), int(out["num_attended"])) == (5, 6 + 3)
    assert "attention_mask" not in out
