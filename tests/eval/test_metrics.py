import math

import datasets
import pytest
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
    rows = [
        {"input_ids": [1, 2, 3, 0, 1], "labels": [-100, 2, 3, 0, 1]},  # 4 trained
        {"input_ids": [1, 2], "labels": [-100, 2]},  # 1 trained
        {"input_ids": [3, 3, 3], "labels": [-100, -100, 3]},
    ]  # 1 trained
    ds = datasets.Dataset.from_list(rows)
    out = evaluate_loss(Fixed(), ds, PaddedCollator(0), batch_size=2, device="cpu")
    assert out["eval_tokens"] == 6
    assert math.isclose(out["eval_loss"], math.log(4), rel_tol=1e-6)
    assert math.isclose(out["eval_ppl"], 4.0, rel_tol=1e-6)


# ---------------------------------------------------------------------------- normalised answers and text metrics
from tuneforge.eval.tasks import bleu, chrf, rouge_l, task_metrics  # noqa: E402


def test_normalize_answer_numbers_whitespace_case():
    assert normalize_answer("The answer:  1,000.0 ") == "the answer 1000"
    assert normalize_answer("+3.50") == "3.5" and normalize_answer("-0.0") == "0" and normalize_answer("007") == "7"
    assert normalize_answer("（４２）") == "42"  # full-width digits and brackets, NFKC
    assert normalize_answer("3.5") != normalize_answer("35")  # a decimal point inside a number is kept
    preds = ["1,000", "Forty two", "x = 3.0", "1000 apples"]
    refs = ["1000", "forty-two", "X = 3", "1000"]
    assert exact_match(preds, refs, normalized=True) == 0.5  # the first and third match
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_rouge_l_is_lcs_f1_averaged_over_rows():
    # row 1: LCS "the cat on the mat" = 5 of 6 words each way -> F1 5/6; row 2: LCS 2, P 2/2, R 2/3 -> F1 0.8
    preds = ["the cat sat on the mat", "hello world"]
    refs = ["The cat is on the mat", "hello there world"]
    assert rouge_l(preds, refs) == pytest.approx((5 / 6 + 0.8) / 2, abs=1e-12)
    assert rouge_l(["один два три"], ["один три"]) == pytest.approx(0.8)  # non-ASCII words count (LCS 2; P 2/3, R 1)


def test_chrf_and_bleu_hand_computed():
    # chrF (beta 2): hypothesis 'abcdefg' is a prefix of 'abcdefgh', so every character n-gram (n = 1..6)
    # matches: precision 1, recall (8 - n) / (9 - n); sacrebleu averages both over n, then F2 = 5PR / (4P + R)
    recall = sum((8 - n) / (9 - n) for n in range(1, 7)) / 6
    assert chrf(["abcdefg"], ["abcdefgh"]) == pytest.approx(100 * 5 * recall / (4 + recall), abs=1e-9)
    assert chrf(["same text"], ["same text"]) == pytest.approx(100.0)
    # BLEU: every n-gram of 'a b c d' is in the reference; brevity penalty exp(1 - 6/4)
    assert bleu(["a b c d"], ["a b c d e f"]) == pytest.approx(100 * math.exp(-0.5), abs=1e-9)
    assert bleu(["w x y z"], ["a b c d"]) == 0.0


def test_task_metrics_names_and_perfect_scores():
    out = task_metrics(["Paris.", "the sky is blue today"], ["paris", "the sky is blue today"])
    assert out == pytest.approx(
        {"exact_match": 0.5, "exact_match_normalized": 1.0, "rouge_l": 1.0, "chrf": out["chrf"], "bleu": out["bleu"]}
    )
    assert 90 < out["chrf"] < 100
    # corpus BLEU, case-sensitive 13a tokens: hypothesis 'Paris .' + 5 words, reference 'paris' + 5 words;
    # 1-grams 5/7, 2-grams 4/5, 3-grams 3/3, 4-grams 2/2, no brevity penalty (7 > 6 tokens)
    assert out["bleu"] == pytest.approx(100 * (5 / 7 * 4 / 5) ** 0.25, abs=1e-9)


# ---------------------------------------------------------------------------- perplexity with uneven token losses
class Bigram(torch.nn.Module):
    """Next-token distribution depends on the current token (one-hot embedding, log-probabilities as the head):
    after 0 or 3 uniform over 4; after 1 -> 2 and after 2 -> 3 with probability 1/2 (others 1/6)."""

    def __init__(self):
        super().__init__()
        probs = torch.tensor([[1 / 4] * 4, [1 / 6, 1 / 6, 1 / 2, 1 / 6], [1 / 6, 1 / 6, 1 / 6, 1 / 2], [1 / 4] * 4])
        self.lm_head = torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(probs.log().T)  # logits[next] = log P[cur][next]

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = torch.nn.functional.one_hot(input_ids, 4).float()
        return type("Out", (), {"logits": self.lm_head(hidden)})()


def test_perplexity_is_exp_of_total_nll_over_trained_tokens_not_a_mean_of_batch_means():
    rows = [
        {"input_ids": [1, 2, 3, 0, 1], "labels": [-100, 2, 3, 0, 1]},  # 1>2 ln2, 2>3 ln2, 3>0 ln4, 0>1 ln4 = 6 ln2
        {"input_ids": [1, 2], "labels": [-100, 2]},  # ln2
        {"input_ids": [0, 1, 2], "labels": [-100, 1, 2]},
    ]  # ln4 + ln2 = 3 ln2
    ds = datasets.Dataset.from_list(rows)
    out = evaluate_loss(Bigram(), ds, PaddedCollator(0), batch_size=2, device="cpu")
    assert out["eval_tokens"] == 7
    assert out["eval_loss"] == pytest.approx(10 / 7 * math.log(2), rel=1e-6)  # (6 + 1 + 3) ln2 / 7 tokens
    assert out["eval_ppl"] == pytest.approx(2 ** (10 / 7), rel=1e-6)
    batch_means = (7 / 5 + 3 / 2) / 2 * math.log(2)  # what averaging the two batches' means would give
    assert abs(out["eval_loss"] - batch_means) > 0.01
