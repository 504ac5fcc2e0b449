import json
import random

import datasets

from tests.conftest import shared_path
from tuneforge.config.schema import DecontamConfig, DedupConfig
from tuneforge.data.dedup import NgramIndex, decontaminate, deduplicate, exact_duplicate_rows, normalize_text

VOCAB = [f"w{i}" for i in range(2000)]


def chat(prompt, response):
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        "text": "",
        "score": None,
    }


def sentence(rng, n=60):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def perturb(rng, text):
    """A paraphrase-style edit: one word replaced, a capital and punctuation added (Jaccard ~0.9 at 60 words)."""
    words = text.split()
    words[rng.randrange(1, len(words))] = "changed"
    return words[0].capitalize() + ", " + " ".join(words[1:]) + "!"


def test_normalisation_folds_case_whitespace_and_punctuation():
    assert normalize_text("  Hello,\tWORLD!! ") == "hello world"
    assert exact_duplicate_rows([normalize_text(t) for t in ["Hi there.", "hi   THERE", "hi where"]]) == [
        False,
        True,
        False,
    ]


def test_exact_and_near_duplicates_with_exact_counts():
    rng = random.Random(0)
    base = [sentence(rng) for _ in range(40)]
    rows = [chat(f"q{i}", t) for i, t in enumerate(base)]
    rows += [chat(f"q{i}", perturb(rng, base[i])) for i in range(25)]  # 25 near-duplicates
    rows += [chat(f"Q{i}!", base[i].upper() + "  .") for i in range(25, 35)]  # 10 exact (normalised)
    ds = datasets.Dataset.from_list(rows)
    kept, report = deduplicate(ds, DedupConfig(exact=True, near=True, fields="all"))
    assert report == {"exact_removed": 10, "near_removed": 25, "kept": 40}
    assert kept["messages"] == ds.select(range(40))["messages"]  # the first occurrence is the one kept


def test_dedup_fields_prompt_only_and_exact_only():
    ds = datasets.Dataset.from_list([chat("same prompt", "answer one"), chat("Same prompt.", "answer two")])
    assert deduplicate(ds, DedupConfig(fields="prompt"))[1]["exact_removed"] == 1
    assert deduplicate(ds, DedupConfig(fields="all"))[1]["exact_removed"] == 0
    assert deduplicate(ds, DedupConfig(exact=False, near=False))[1] == {
        "exact_removed": 0,
        "near_removed": 0,
        "kept": 2,
    }


def test_decontamination_against_eval_split_and_benchmark_file(tmp_path):
    rng = random.Random(1)
    eval_text = sentence(rng, 30)
    bench = [{"question_id": 1, "turns": [sentence(rng, 20), "short benchmark question"]}]
    (tmp_path / "bench.jsonl").write_text("\n".join(json.dumps(b) for b in bench) + "\n")
    leaked_eval = " ".join(eval_text.split()[5:18])  # a 13-gram of the eval text
    leaked_bench = " ".join(bench[0]["turns"][0].split()[:15])
    train = datasets.Dataset.from_list(
        [
            chat("clean", sentence(rng, 30)),
            chat("leak 1", f"prefix words {leaked_eval} suffix"),
            chat("leak 2", leaked_bench),
            chat("Short benchmark question?", ""),  # whole-text match of a short reference
            chat("clean 2", "short benchmark question is not the whole text here"),
        ]
    )
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


def planted_rows(n_base=1200, seed=2):
    """Unique sentences, then near copies (one word changed) and exact copies (case/punctuation) of some."""
    rng = random.Random(seed)
    base = [sentence(rng) for _ in range(n_base)]
    rows = [chat(f"q{i}", t) for i, t in enumerate(base)]
    rows += [chat(f"q{i}", perturb(rng, base[i])) for i in range(0, 600, 2)]  # 300 near-duplicates
    rows += [chat(f"Q{i}!", base[i].upper() + " .") for i in range(1, 400, 4)]  # 100 exact (normalised)
    rows += [{"messages": [], "text": "", "score": None}, {"messages": [], "text": "a  b", "score": None}]
    return datasets.Dataset.from_list(rows)


def test_worker_processes_find_the_same_duplicates():
    ds = planted_rows()
    here = deduplicate(ds, DedupConfig(exact=True, near=True))
    workers = deduplicate(ds, DedupConfig(exact=True, near=True), num_proc=2)
    assert here[1] == workers[1] == {"exact_removed": 100, "near_removed": 300, "kept": 1202}
    first = ds.select([*range(1200), len(ds) - 2, len(ds) - 1])  # the originals and the two completion rows
    assert here[0]["messages"] == workers[0]["messages"] == first["messages"]
    assert workers[0]["text"] == ["" for _ in range(1201)] + ["a  b"]
    only_near = deduplicate(ds, DedupConfig(exact=False, near=True, fields="response"), num_proc=2)[1]
    assert only_near == deduplicate(ds, DedupConfig(exact=False, near=True, fields="response"))[1]


def test_pairs_and_row_by_row_decide_the_same(monkeypatch):
    import tuneforge.data.dedup as dedup

    ds = planted_rows()
    texts = [normalize_text(t) for t in dedup._texts(ds, "all")]
    found = {}
    for threshold in (0.8, 0.3):
        cfg = DedupConfig(near=True, threshold=threshold)
        found[threshold] = dedup.near_duplicate_rows(texts, cfg, None)
        monkeypatch.setattr(dedup, "PAIR_BUDGET", 0)  # every bucket pair over budget: the row-by-row path
        assert dedup.near_duplicate_rows(texts, cfg, None) == found[threshold]
        monkeypatch.undo()
    assert sum(found[0.8]) == 300 + 100  # the exact copies too: nothing was skipped
    assert found[0.3] == found[0.8]  # unrelated sentences share far fewer shingles


def test_word_and_shingle_hashes_on_single_spaced_texts_equal_the_general_split():
    import numpy as np
    import xxhash

    from tuneforge.data import minhash

    texts = ["the cat sat on the mat", "a b", "x", "more words here to hash", "é ü 中文 x"]
    words, offsets = minhash.word_hashes(texts, 7)  # single spaces, no empty text: the byte-offset path
    assert offsets.tolist() == [0, 6, 8, 9, 14, 18]
    assert words[:3].tolist() == [xxhash.xxh64_intdigest(w.encode(), 7) for w in ("the", "cat", "sat")]
    general = minhash.word_hashes(texts + [""], 7)  # an empty text: the split path
    assert np.array_equal(general[0], words) and general[1].tolist() == offsets.tolist() + [18]
    shingles, so = minhash.shingle_hashes(texts, 3, 7)
    assert so.tolist() == [0, 4, 5, 6, 9, 11]  # 6 words -> 4 trigrams; fewer than 3 words -> one shingle
    mult = np.random.default_rng(7).integers(0, 2**63, size=3, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    first = minhash._fmix64((words[0:3] * mult).sum(keepdims=True, dtype=np.uint64))  # sums wrap around 2**64
    short = minhash._fmix64((words[6:8] * mult[:2]).sum(keepdims=True, dtype=np.uint64))  # "a b"
    assert shingles[0] == first[0] and shingles[4] == short[0]


def test_stored_lsh_band_layouts_are_datasketchs():
    from datasketch import MinHashLSH

    from tuneforge.data.dedup import LSH_BANDS, LSH_WEIGHTS, lsh_bands

    for num_perm, by_threshold in LSH_BANDS.items():
        for threshold, bands in by_threshold.items():
            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
            assert (lsh.b, lsh.r) == bands, (threshold, num_perm)
    assert lsh_bands(0.8, 128) == (16, 8)
    other = MinHashLSH(threshold=0.83, num_perm=100, weights=LSH_WEIGHTS)
    assert lsh_bands(0.83, 100) == (other.b, other.r)  # not stored: asked of datasketch


def test_an_instruction_every_row_repeats_is_not_contamination():
    """Rows of one task share a 14-word instruction: only the eval row's own content may remove a training row."""
    instruction = "List every number in the text, in the order they appear, separated by semicolons, please now."
    rng = random.Random(5)
    eval_texts = [f"{instruction}\n\n{sentence(rng, 20)}" for _ in range(40)]
    train = datasets.Dataset.from_list(
        [chat(f"{instruction}\n\n{sentence(rng, 20)}", "1; 2") for _ in range(30)]
        + [chat(f"{instruction}\n\n{eval_texts[3].split(chr(10))[-1]}", "3")]
        # same instruction, and content that starts with an eval row's first word
        + [chat(f"{instruction}\n\n{eval_texts[0].split()[-20]} {sentence(rng, 19)}", "5")]
    )
    eval_ds = datasets.Dataset.from_list([chat(t, "4") for t in eval_texts])
    kept, report = decontaminate(train, eval_ds, DecontamConfig())
    assert report["removed"] == 1 and len(kept) == 31 and report["shared_ngrams_ignored"] >= 2
    # with every n-gram counted (the old rule) the shared instruction removes every row
    _, strict = decontaminate(train, eval_ds, DecontamConfig(shared_ngram_fraction=1.0))
    assert strict["removed"] == 32 and strict["shared_ngrams_ignored"] == 0
    # a small reference set: an n-gram in fewer than 5 texts is content, whatever its share
    index = NgramIndex(eval_texts[:4], 13, shared_fraction=0.1)
    assert index.shared == 0 and index.hit(eval_texts[0])
