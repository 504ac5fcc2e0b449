"""The batch of a pair objective (dpo, ipo, simpo, orpo, reward): each prepared pair as two sequences."""

from __future__ import annotations

import torch

from tuneforge.data.collate import FlatCollator, PaddedCollator
from tuneforge.data.templates import IGNORE_INDEX


class PairBatches:
    """Prepared pairs -> one batch of 2 x pairs sequences, in order chosen_0, rejected_0, chosen_1, ..."""

    def __init__(self, pad_id: int, padding_free: bool):
        self.inner = FlatCollator(pad_id) if padding_free else PaddedCollator(pad_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = []
        for r in rows:
            prompt = list(r["prompt_ids"])
            for completion in (r["chosen_ids"], r["rejected_ids"]):
                completion = list(completion)
                sequences.append(
                    {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}
                )
        batch = self.inner(sequences)
        batch["num_pairs"] = torch.tensor(len(rows))
        batch["chosen_tokens"] = torch.tensor(sum(len(r["chosen_ids"]) for r in rows))  # ORPO's NLL normaliser
        if rows and "ref_chosen_logp" in rows[0]:  # a full fine-tune's cached reference (train/reference_cache.py)
            for side in ("chosen", "rejected"):
                batch[f"ref_{side}_logps"] = torch.tensor([r[f"ref_{side}_logp"] for r in rows], dtype=torch.float64)
        return batch
