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
    `num_tokens` (real tokens) and `num_attended` (causal attention pairs) are for throughput accounting.
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
        lengths = [len(r["input_ids"]) for r in rows]
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "num_tokens": mask.sum(),
            "num_attended": torch.tensor(sum(n * (n + 1) // 2 for n in lengths)),
        }


@dataclass
class PackedCollator:
    """Right-pads packed rows; `position_ids` restart at 0 for every sample and for the padding tail.

    No attention mask is returned: the model derives a block-diagonal causal mask from the
    position_ids, so samples (and padding) never attend to each other.
    Example: rows with position_ids [[0, 1, 0, 1, 2], [0, 1, 2]] give [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]].
    """

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        real = attended = 0
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            real += n
            attended += sum(r["position_ids"]) + n  # a token at position p attends to p + 1 tokens
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            pos[i, :n] = torch.as_tensor(r["position_ids"])
            pos[i, n:] = torch.arange(width - n)
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": pos,
            "num_tokens": torch.tensor(real),
            "num_attended": torch.tensor(attended),
        }


@dataclass
class FlatCollator:
    """Padding-free micro-batches: the rows are laid end to end in ONE row, `position_ids` restarting at 0 for
    each, and the first label of each row set to -100 (its predecessor belongs to another sample). Every token
    the model processes is real; with per-sample attention (model/attention.py) the loss equals the padded
    batch's (tests/data/test_collate.py, tests/train/test_loss.py).
    Example: rows [[5, 6, 7], [8, 9]] with labels [[-100, 6, 7], [8, 9]] give input_ids [[5, 6, 7, 8, 9]],
    labels [[-100, 6, 7, -100, 9]], position_ids [[0, 1, 2, 0, 1]]. Packed rows (with position_ids) keep theirs.
    """

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, pos = [], [], []
        for r in rows:
            n = len(r["input_ids"])
            ids += r["input_ids"]
            row_labels = list(r["labels"])
            if "position_ids" in r:
                pos += r["position_ids"]
            else:
                pos += range(n)
            if n:
                row_labels[0] = IGNORE_INDEX
            labels += row_labels
        return PackedCollator(self.pad_id)([{"input_ids": ids, "labels": labels, "position_ids": pos}])


# what a collator reads from a prepared row: SFT tokens, a preference pair's, a KTO row's, cached reference log-probs
BATCH_COLUMNS = (
    "input_ids",
    "labels",
    "position_ids",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "completion_ids",
    "label",
    "ref_chosen_logp",
    "ref_rejected_logp",
)


def rows_at(dataset, indices: list[int]) -> list[dict]:
    """Fetch rows `indices` of a `datasets.Dataset` in one Arrow read, as collator input."""
    names = [c for c in BATCH_COLUMNS if c in dataset.column_names]
    cols = dataset.select_columns(names)[indices]
    return [dict(zip(names, values)) for values in zip(*(cols[n] for n in names))]
