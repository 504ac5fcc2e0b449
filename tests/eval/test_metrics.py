import math

import datasets
import torch

from tuneforge.data.collate import PaddedCollator
from tuneforge.eval.perplexity import evaluate_loss
from tuneforge.eval.tasks import exact_match, normalize_answer


def test_exact_match_raw_and_normalized():
    preds, refs = ["The answer: 42.", "paris", " b a "], ["the answer 42", "Paris", "b a"]
    assert exact_match(preds, refs) == 1 / 3
    assert exact_match(preds, refs, normalized=True) == 1.0
    assert normalize_answer("  Hello,   World! ") == "hello world"


class Fixed(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform over 4 tokens: every trained token costs log 4.
    Its LM head is a zero Linear, so the loss can run the head only at trained positions."""

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, 4)
        torch.nn.init.zeros_(self.lm_head.weight)
        torch.nn.init.zeros_(self.lm_head.bias)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = torch.zeros(*input_ids.shape, 1)
        return type("Out", (), {"logits": self.lm_head(hidden)})()


def test_perplexity_is_token_weighted_over_uneven_batches():
    rows = [{"input_ids": [1, 2, 3, 0, 1], "labels": [-100, 2, 3, 0, 1]},  # 4 trained
            {"input_ids": [1, 2], "labels": [-100, 2]},                      # 1 trained
            {"input_ids": [3, 3, 3], "labels": [-100, -100, 3]}]             # 1 trained
    ds = datasets.Dataset.from_list(rows)
    out = evaluate_loss(Fixed(), ds, PaddedCollator(0), batch_size=2, device="cpu")
    assert out["eval_tokens"] == 6
    assert math.isclose(out["eval_loss"], math.log(4), rel_tol=1e-6)
    assert math.isclose(out["eval_ppl"], 4.0, rel_tol=1e-6)
