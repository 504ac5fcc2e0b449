"""Pure tensor collators: lists of token ids -> padded batch tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.data.templates import IGNORE_INDEX


@dataclass
class PaddedCollator:
    """Right-pads `input_ids` with `pad_id` and `labels` with -100, and builds the attention mask.

    Example: rows [[5, 6, 7], [8]] with labels [[-100, 6, 7], [8]] and pad_id 0 give
    input_ids [[5, 6, 7], [8, 0, 0]], labels [[-100, 6, 7], [8, -100, -100]],
    attention_mask [[1, 1, 1], [1, 0, 0]]. Padding is never trained, even when pad_id == eos_id.
    """

    pad_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        width = (longest + m - 1) // m * m
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def rows_at(dataset, indices: list[int]) -> list[dict]:
    """Fetch rows `indices` of a `datasets.Dataset` in one Arrow read, as collator input."""
    cols = dataset.select_columns(["input_ids", "labels"])[indices]
    return [{"input_ids": i, "labels": lab} for i, lab in zip(cols["input_ids"], cols["labels"])]
