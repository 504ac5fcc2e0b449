"""Generation-based task metrics on held-out rows: exact match, normalised-answer match, ROUGE-L, chrF, BLEU.

Scales: exact_match, exact_match_normalized and rouge_l are fractions in [0, 1]; chrf and bleu keep
sacrebleu's 0-100 scale (the numbers papers report). ROUGE-L comes from `rouge-score`, chrF and BLEU
from `sacrebleu` (corpus-level, default settings), so the numbers match what those packages print.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_WORD = re.compile(r"\w+")
_EDGE_PUNCT = "!\"#$%&'()*,./:;<=>?@[\\]^_`{|}~"


def _canonical_number(text: str) -> str:
    """'1,000.50' -> '1000.5', '+3.0' -> '3', '-0' -> '0': the same quantity written the same way."""
    value = Decimal(text.replace(",", ""))
    return "0" if value == 0 else format(value.normalize(), "f")


def normalize_answer(text: str) -> str:
    """Case, whitespace, edge punctuation and number formatting removed, so answers compare by content.

    'The answer:  1,000.0 ' -> 'the answer 1000'; 'Paris.' -> 'paris'. Unicode is NFKC-normalised first
    (full-width digits become ASCII). Punctuation inside the text is kept: '3.5' stays '3.5'.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _NUMBER.sub(lambda m: _canonical_number(m.group()), text)
    return " ".join(w.strip(_EDGE_PUNCT) or w for w in text.split()).strip()


def _check(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def exact_match(predictions: list[str], references: list[str], normalized: bool = False) -> float:
    """Fraction of predictions equal to their reference (stripped; or after `normalize_answer`)."""
    _check(predictions, references)
    if not references:
        return 0.0
    f = normalize_answer if normalized else str.strip
    return sum(f(p) == f(r) for p, r in zip(predictions, references)) / len(references)


class _WordTokenizer:
    """Lower-cased Unicode words: rouge-score's default tokenizer drops every non-ASCII letter, which would
    score any non-English answer 0."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (longest common subsequence of words) over the rows, from `rouge-score`."""
    _check(predictions, references)
    if not references:
        return 0.0
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (character n-gram F-score, 0-100) from `sacrebleu`."""
    _check(predictions, references)
    if not references:
        return 0.0
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(predictions, [references]).score)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) from `sacrebleu`, its default 13a tokenisation; short answers often score 0 (no 4-grams)."""
    _check(predictions, references)
    if not references:
        return 0.0
    from sacrebleu.metrics import BLEU

    return float(BLEU().corpus_score(predictions, [references]).score)


def task_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every task metric for one set of generations, under the names metrics.jsonl and the reports use."""
    return {
        "exact_match": exact_match(predictions, references),
        "exact_match_normalized": exact_match(predictions, references, normalized=True),
        "rouge_l": rouge_l(predictions, references),
        "chrf": chrf(predictions, references),
        "bleu": bleu(predictions, references),
    }
