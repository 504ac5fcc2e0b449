"""Data-stage benchmark: tuneforge's full `prepare` vs the seed recipe's filter + padded tokenize.

Builds a >=50k-row Alpaca corpus from ../shared/data (real instruction files, replicated by pairing
rows), plants exact duplicates (case/whitespace/punctuation changes) and near-duplicates (one word
changed in long rows), then runs each pipeline in a fresh process on its own copy of the corpus (no
shared `datasets` cache, imports done before the clock starts, the tokenizer load inside it for both):

  seed:      per-row Python lambda filters + tokenizer(prompt + output, padding=True) in a batched map,
             with the same num_proc as tuneforge (filters and map; --seed-num-proc to differ)
  tuneforge: read -> normalise -> quality filters -> exact + MinHash near dedup -> template render with
             loss masks -> tokenize -> pack -> save + report (the whole `prepare` stage)

and prints seconds, rows/s and CPU seconds (all processes) per run, the ratio, and the recall /
false-positive rate of the planted near-duplicates. The machine's load average is printed too: other
work on it slows either pipeline.

  python benchmarks/data_prepare.py [--rows 50000] [--num-proc 2] [--seed-num-proc N] [--repeat 1]
"""

from __future__ import annotations

import argparse
import bisect
import importlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def base_rows() -> list[dict]:
    rows = []
    for name in (
        "instruct/alpaca_en_demo.json",
        "instruct/alpaca_data_cleaned_1000.json",
        "instruct/gsm_8k_train.json",
    ):
        for r in json.loads((SHARED / name).read_text()):
            inst = (r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")).strip()
            if inst and r["output"].strip():
                rows.append({"instruction": inst, "output": r["output"].strip()})
    seen, out = set(), []
    for r in rows:
        key = (r["instruction"].lower(), r["output"].lower())
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _words(row: dict) -> int:
    return len(row["instruction"].split()) + len(row["output"].split())


def build_corpus(n_rows: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Rows and their kind: unique | exact | near.

    Unique rows beyond the real ones are composites of two different real rows whose word counts are
    within 1.5x of each other, each unordered pair used once. So two composites sharing a component
    (or a composite and its component) have shingle Jaccard of at most about 0.6, well below the dedup
    threshold: without the length rule, a long component paired with short ones made composites that
    are genuine near-duplicates of each other, and "unique rows wrongly removed" counted them.
    """
    rng = random.Random(seed)
    base = base_rows()
    n_exact = n_near = n_rows // 10
    unique = list(base)
    by_len = sorted(range(len(base)), key=lambda i: _words(base[i]))
    lens = [_words(base[i]) for i in by_len]
    used: set[tuple[int, int]] = set()
    while len(unique) < n_rows - n_exact - n_near:
        a = rng.randrange(len(base))
        n = _words(base[a])
        lo, hi = bisect.bisect_left(lens, n / 1.5), bisect.bisect_right(lens, n * 1.5)
        b = by_len[rng.randrange(lo, hi)]
        if a == b or (min(a, b), max(a, b)) in used:
            continue
        used.add((min(a, b), max(a, b)))
        ra, rb = base[a], base[b]
        unique.append(
            {"instruction": ra["instruction"] + "\n" + rb["instruction"], "output": ra["output"] + "\n" + rb["output"]}
        )
    rows, kinds = [dict(r) for r in unique], ["unique"] * len(unique)
    for _ in range(n_exact):
        r = rng.choice(unique)
        rows.append(
            {"instruction": "  " + r["instruction"].upper() + " ", "output": r["output"].replace(" ", "  ") + "."}
        )
        kinds.append("exact")
    long_rows = [r for r in unique if len((r["instruction"] + " " + r["output"]).split()) >= 80]
    for _ in range(n_near):
        r = rng.choice(long_rows)
        words = r["output"].split()
        words[rng.randrange(len(words))] = rng.choice(["indeed", "also", "maybe", "clearly"])
        rows.append({"instruction": r["instruction"], "output": " ".join(words)})
        kinds.append("near")
    order = list(range(len(rows)))
    rng.shuffle(order)
    # keep every original before its planted copies, so "the later copy is the duplicate" holds
    firsts = [i for i in order if kinds[i] == "unique"]
    copies = [i for i in order if kinds[i] != "unique"]
    order = firsts + copies
    return [rows[i] for i in order], [kinds[i] for i in order]


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the map workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def seed_recipe(path: Path, num_proc: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "llama2"))
    tokenizer.pad_token = tokenizer.eos_token
    procs = num_proc if num_proc > 1 else None  # datasets: num_proc=1 would still start a worker pool
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    ds = ds.filter(lambda x: len(x["output"]) > 0, num_proc=procs)
    ds = ds.filter(lambda x: len(x["instruction"]) + len(x["output"]) < 20000, num_proc=procs)

    def tok(batch):
        texts = [ALPACA_PROMPT.format(instruction=i) + o for i, o in zip(batch["instruction"], batch["output"])]
        return tokenizer(texts, padding=True, truncation=True, max_length=1024)

    ds.map(tok, batched=True, batch_size=1000, remove_columns=ds.column_names, num_proc=procs)


def tuneforge_prepare(path: Path, run_dir: Path, num_proc: int):
    from tuneforge.config.schema import RunConfig
    from tuneforge.data.prepare import prepare

    cfg = RunConfig.model_validate(
        {
            "model": {"name_or_path": str(SHARED / "tokenizers" / "llama2")},
            "data": {
                "train": [{"path": str(path)}],
                "max_seq_len": 1024,
                "num_proc": num_proc,
                "packing": True,
                "dedup": {"exact": True, "near": True, "threshold": 0.8},
            },
            "output": {"dir": str(run_dir)},
        }
    )
    return prepare(cfg, run_dir, force=True, log=lambda s: None)


def worker(name: str, path: Path, num_proc: int) -> dict:
    """One pipeline, timed in this (fresh) process; its libraries are imported before the clock starts."""
    for module in ("transformers", "tuneforge.data.prepare"):
        importlib.import_module(module)
    datasets.disable_progress_bars()
    t, cpu = time.perf_counter(), _cpu_seconds()
    report = None
    if name == "seed":
        seed_recipe(path, num_proc)
    else:
        report = tuneforge_prepare(path, path.parent / "run", num_proc).report
    return {"seconds": time.perf_counter() - t, "cpu_seconds": _cpu_seconds() - cpu, "report": report}


def run_worker(name: str, corpus: Path, tmp: Path, num_proc: int) -> dict:
    """Run `worker` in a fresh Python process on a fresh copy of the corpus (no cache of the other run)."""
    work = tmp / f"{name}-{time.monotonic_ns()}"
    work.mkdir()
    shutil.copy(corpus, work / "corpus.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf-cache")}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--path", str(work / "corpus.jsonl"), "--num-proc", str(num_proc)],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"{name} run failed:\n{out.stderr[-3000:]}")
    shutil.rmtree(work, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument(
        "--seed-num-proc", type=int, help="the seed's num_proc (default: --num-proc, the same as tuneforge)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each pipeline (alternating seed, tuneforge)")
    ap.add_argument("--worker", choices=["seed", "tuneforge"], help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.num_proc)))
        return 0
    if not SHARED.exists():
        print(f"needs {SHARED}", file=sys.stderr)
        return 1
    from tuneforge.config.schema import DedupConfig
    from tuneforge.data.dedup import _texts, exact_duplicate_rows, near_duplicate_rows, normalize_text

    rows, kinds = build_corpus(args.rows)
    runs: list[tuple[dict, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        load_before = os.getloadavg()[0]
        for _ in range(args.repeat):
            seed_procs = args.num_proc if args.seed_num_proc is None else args.seed_num_proc
            runs.append(
                (
                    run_worker("seed", corpus, Path(tmp), seed_procs),
                    run_worker("tuneforge", corpus, Path(tmp), args.num_proc),
                )
            )
        load_after = os.getloadavg()[0]

    # which planted rows does dedup catch? (run the dedup stage alone on the same rows, index-aligned)
    canon = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["output"]},
                ],
                "text": "",
            }
            for r in rows
        ]
    )
    texts = [normalize_text(t) for t in _texts(canon, "all")]
    exact = exact_duplicate_rows(texts)
    near = near_duplicate_rows(texts, DedupConfig(near=True), skip=exact)
    removed = [e or n for e, n in zip(exact, near)]
    n_near = kinds.count("near")
    n_unique = kinds.count("unique")
    recall_near = sum(r for r, k in zip(removed, kinds) if k == "near") / n_near
    recall_exact = sum(r for r, k in zip(removed, kinds) if k == "exact") / kinds.count("exact")
    false_pos = sum(r for r, k in zip(removed, kinds) if k == "unique") / n_unique
    print(
        f"\ncorpus: {len(rows)} rows ({n_unique} unique, {kinds.count('exact')} planted exact, {n_near} planted near); "
        f"num_proc {args.num_proc} (seed: {args.num_proc if args.seed_num_proc is None else args.seed_num_proc}); "
        f"load average {load_before:.2f} before, {load_after:.2f} after"
    )
    print(f"{'run':<5}{'pipeline':<60}{'seconds':>9}{'rows/s':>9}{'cpu s':>8}")
    for k, (seed, ours) in enumerate(runs, 1):
        for name, r in (
            ("seed: lambda filters + tokenizer(padding=True) map", seed),
            ("tuneforge prepare (filters, exact+near dedup, masks, pack)", ours),
        ):
            print(f"{k:<5}{name:<60}{r['seconds']:>9.1f}{len(rows) / r['seconds']:>9.0f}{r['cpu_seconds']:>8.1f}")
        print(f"{k:<5}{'speed ratio tuneforge / seed':<60}{seed['seconds'] / ours['seconds']:>8.2f}x")
    if len(runs) > 1:
        median = statistics.median(seed["seconds"] / ours["seconds"] for seed, ours in runs)
        print(f"{'':<5}{'median speed ratio':<60}{median:>8.2f}x")
    rep = runs[-1][1]["report"]
    print(
        f"\nplanted near-duplicates found: {100 * recall_near:.1f}%   planted exact found: {100 * recall_exact:.1f}%   "
        f"unique rows wrongly removed: {100 * false_pos:.2f}%"
    )
    print(
        f"prepare report: exact removed {rep['dedup']['exact_removed']}, near removed {rep['dedup']['near_removed']}, "
        f"train rows {rep['train']['rows_in']}, packing efficiency {100 * rep['train']['packing']['efficiency']:.1f}%"
    )
    print("tuneforge seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in rep.get("seconds", {}).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
