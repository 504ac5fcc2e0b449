"""LM head only at trained positions vs full logits: time per step and peak memory, side by side.

A random-init Llama (hidden 256, 4 layers, 8 heads / 4 KV heads, vocab 32000 like Llama-2) trains on
padded batches whose prompts are untrained (about a third of the tokens trained, as in instruction
data). Each variant runs in a fresh subprocess so peak RSS is its own.

  python benchmarks/lm_head_selection.py [--steps 10] [--batch 8] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(variant: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.model.lm_loss import forward_logits, nll_sum, trained_nll_sum

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, 32000, (batch, seq))
    labels = ids.clone()
    labels[:, : seq * 2 // 3] = -100  # prompt: no loss
    b = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = trained_nll_sum(model, b) if variant == "trained" else nll_sum(forward_logits(model, b), b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {
        "variant": variant,
        "step_s": sum(times[1:]) / steps,
        "loss": float(loss),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.batch, args.seq)))
        return 0
    results = {}
    for variant in ("full", "trained"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    f, t = results["full"], results["trained"]
    print(f"batch {args.batch} x {args.seq} tokens, vocab 32000, 1/3 of positions trained, {args.steps} steps")
    print(f"{'logits':<26}{'s/step':>10}{'peak RSS GB':>14}{'last loss':>12}")
    for r in (f, t):
        print(f"{r['variant']:<26}{r['step_s']:>10.3f}{r['peak_rss_gb']:>14.2f}{r['loss']:>12.3f}")
    print(
        f"{'ratio full / trained':<26}{f['step_s'] / t['step_s']:>9.2f}x{f['peak_rss_gb'] / t['peak_rss_gb']:>13.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
