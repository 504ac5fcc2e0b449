import datasets

from tuneforge.config.schema import QualityConfig
from tuneforge.data.quality import apply_quality_filters, garbage_frac, repeated_line_frac, repeated_ngram_frac


def rows(*pairs, scores=None):
    out = []
    for i, (prompt, response) in enumerate(pairs):
        out.append(
            {
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                "text": "",
                "score": None if scores is None else scores[i],
            }
        )
    return datasets.Dataset.from_list(out)


def test_each_rule_counts_exactly_the_rows_it_removes():
    loop = " ".join(["I am sorry"] * 12)
    ds = rows(
        ("ok?", "A fine answer."),  # kept
        ("empty?", "   "),  # min_response_chars
        ("long?", "x" * 500),  # max_response_chars
        ("hi", "A fine answer too."),  # min_prompt_chars (prompt < 3)
        ("garbage?", "ab\x00\x01\x02\ufffd"),  # max_garbage_char_frac
        ("lines?", "same\nsame\nsame\nother"),  # max_repeated_line_frac (2/4 repeats = 0.5, not > 0.5) -> kept
        ("lines2?", "same\nsame\nsame\nsame"),  # max_repeated_line_frac (3/4)
        ("loop?", loop),  # max_repeated_ngram_frac
    )
    q = QualityConfig(max_response_chars=400, min_prompt_chars=3)
    kept, report = apply_quality_filters(ds, q)
    assert {k: v["removed"] for k, v in report.items()} == {
        "min_response_chars": 1,
        "max_response_chars": 1,
        "min_prompt_chars": 1,
        "max_garbage_char_frac": 1,
        "max_repeated_line_frac": 1,
        "max_repeated_ngram_frac": 1,
    }
    assert len(kept) == 2
    assert report["min_response_chars"]["examples"] == [{"row": 2, "response": "   "}]  # 1-based


def test_score_threshold_keeps_rows_strictly_above_and_drops_missing_scores():
    ds = rows(("a?", "one"), ("b?", "two"), ("c?", "three"), ("d?", "four"), scores=[0.9, 0.7, None, 0.71])
    kept, report = apply_quality_filters(ds, QualityConfig(score_column="quality_score", min_score=0.7))
    assert report["min_score"]["removed"] == 2
    assert [m[1]["content"] for m in kept["messages"]] == ["one", "four"]


def test_completion_rows_use_the_text_as_response():
    ds = datasets.Dataset.from_list(
        [{"messages": [], "text": "plain text", "score": None}, {"messages": [], "text": "", "score": None}]
    )
    kept, report = apply_quality_filters(ds, QualityConfig())
    assert len(kept) == 1 and report["min_response_chars"]["removed"] == 1


def test_measures():
    assert repeated_line_frac("a\nb\na\na") == 0.5
    assert repeated_line_frac("a\na") == 0.0  # fewer than 3 lines: not judged
    assert repeated_ngram_frac("w " * 12) == 9 / 10
    assert garbage_frac("ab\x00\ufffd") == 0.5
