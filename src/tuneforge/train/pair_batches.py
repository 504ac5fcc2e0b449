"""The batch of a pair objective (dpo, ipo, simpo, orpo, reward): each prepared pair as two sequences."""

from __future__ import annotations

import torch

from tuneforge.data.collate import FlatCollator, PaddedCollator
from tuneforge.data.templates import IGNORE_INDEX


class PairBatches:
    """Prepared pairs -> one batch of 2 x pairs sequences, in order chosen_0, rejected_0, chosen_1, ...

    share_prompt (padding-free only, for a model that runs tuneforge's per-sample attention, which reads shared
    prompts from the position_ids: model/attention.py Segment): each pair is laid as prompt + chosen, then the
    prompt's last token again + rejected, with positions going on from the prompt's, so that the prompt runs
    through the model once per pair instead of twice. The repeated token sees what the prompt's last token sees
    (the prompt before it, itself), so its output is that token's and it predicts the rejected completion's first
    token: the log-probs are those of the two separate sequences (tests/train/test_shared_prompt.py)."""

    def __init__(self, pad_id: int, padding_free: bool, share_prompt: bool = False):
        self.inner = FlatCollator(pad_id) if padding_free else PaddedCollator(pad_id)
        self.share_prompt = share_prompt and padding_free

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = []
        for r in rows:
            prompt = list(r["prompt_ids"])
            chosen, rejected = list(r["chosen_ids"]), list(r["rejected_ids"])
            if self.share_prompt and prompt:
                n = len(prompt)
                sequences.append(
                    {
                        "input_ids": prompt + chosen + prompt[-1:] + rejected,
                        "labels": [IGNORE_INDEX] * n + chosen + [IGNORE_INDEX] + rejected,
                        "position_ids": [*range(n + len(chosen)), *range(n - 1, n + len(rejected))],
                    }
                )
                continue
            for completion in (chosen, rejected):
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
