import json
import random

import datasets
import pytest

from tests.conftest import shared_path
from tuneforge.config.schema import DecontamConfig, DedupConfig
from tuneforge.data.dedup import NgramIndex, decontaminate, deduplicate, exact_duplicates, normalize_text

VOCAB = [f"w{i}" for i in range(2000)]


def chat(prompt, response):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], "text": "", "score": None}


def sentence(rng, n=60):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def perturb(rng, text):
    """A paraphrase-style edit: one word replaced, a capital and punctuation added (Jaccard ~0.9 at 60 words)."""
    words = text.split()
    words[rng.randrange(1, len(words))] = "changed"
    return words[0].capitalize() + ", " + " ".join(words[1:]) + "!"


def test_normalisation_folds_case_whitespace_and_punctuation():
    assert normalize_text("  Hello,\tWORLD!! ") == "hello world"
    assert exact_duplicates(["Hi there.", "hi   THERE", "hi where"]) == [False, True, False]


def test_exact_and_near_duplicates_with_exact_counts():
    rng = random.Random(0)
    base = [sentence(rng) for _ in range(40)]
    rows = [chat(f"q{i}", t) for i, t in enumerate(base)]
    rows += [chat(f"q{i}", perturb(rng, base[i])) for i in range(25)]              # 25 near-duplicates
    rows += [chat(f"Q{i}!", base[i].upper() + "  .") for i in range(25, 35)]       # 10 exact (normalised)
    ds = datasets.Dataset.from_list(rows)
    kept, report = deduplicate(ds, DedupConfig(exact=True, near=True, fields="all"))
    assert report == {"exact_removed": 10, "near_removed": 25, "kept": 40}
    assert kept["messages"] == ds.select(range(40))["messages"]  # the first occurrence is the one kept


def test_dedup_fields_prompt_only_and_exact_only():
    ds = datasets.Dataset.from_list([chat("same prompt", "answer one"), chat("Same prompt.", "answer two")])
    assert deduplicate(ds, DedupConfig(fields="prompt"))[1]["exact_removed"] == 1
    assert deduplicate(ds, DedupConfig(fields="all"))[1]["exact_removed"] == 0
    assert deduplicate(ds, DedupConfig(exact=False, near=False))[1] == {"exact_removed": 0, "near_removed": 0, "kept": 2}


def test_decontamination_against_eval_split_and_benchmark_file(tmp_path):
    rng = random.Random(1)
    eval_text = sentence(rng, 30)
    bench = [{"question_id": 1, "turns": [sentence(rng, 20), "short benchmark question"]}]
    (tmp_path / "bench.jsonl").write_text("\n".join(json.dumps(b) for b in bench) + "\n")
    leaked_eval = " ".join(eval_text.split()[5:18])          # a 13-gram of the eval text
    leaked_bench = " ".join(bench[0]["turns"][0].split()[:15])
    train = datasets.Dataset.from_list([
        chat("clean", sentence(rng, 30)),
        chat("leak 1", f"prefix words {leaked_eval} suffix"),
        chat("leak 2", leaked_bench),
        chat("Short benchmark question?", ""),               # whole-text match of a short reference
        chat("clean 2", "short benchmark question is not the whole text here"),
    ])
    eval_ds = datasets.Dataset.from_list([chat("eval prompt", eval_text)])
    kept, report = decontaminate(train, eval_ds, DecontamConfig(files=[str(tmp_path / "bench.jsonl")]))
    assert report["removed"] == 3 and report["reference_texts"] == 3
    assert [m[0]["content"] for m in kept["messages"]] == ["clean", "clean 2"]


def test_ngram_index_on_a_real_benchmark_file():
    rows = [json.loads(x) for x in shared_path("eval/mt_bench_question.jsonl").read_text().splitlines()]
    first = rows[0]["turns"][0]
    index = NgramIndex([t for r in rows for t in r["turns"]], 13)
    assert index.hit("Here is a copy: " + first)
    assert not index.hit("A completely unrelated sentence about river stones and silver lamps in winter.")
