"""FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo): the per-step losses of one process with the same global
batch, the wrapper really used and really sharding, sharded checkpoints that resume (FSDP2 at another world size),
and a final directory that plain transformers / peft load with the run's own eval loss.

The LoRA runs start from a pretrained model directory (the full run's result), as users' runs do: ZeRO-3 then
partitions the weights while they load (HfDeepSpeedConfig) and peft puts LoRA on the partitioned layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.train.test_distributed import config as ddp_config
from tests.train.test_distributed import final_weights, records, tuneforge

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LORA = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
FULL = {"type": "full"}
GENERATED = 4  # held-out rows generated before and after training (3 at a time: a waiting row joins the batch)
TASK = ("generated_rows", "exact_match", "exact_match_normalized", "rouge_l", "chrf", "bleu")


def config(
    tmp_path: Path, name: str, adapter: dict, micro: int, dist: dict | None = None, model: Path | None = None
) -> Path:
    """test_distributed's run (6 steps of 2 micro-batches, eval every 3) with a dist section, checkpoints kept;
    `model`: a pretrained model directory instead of the new tiny model."""
    path = ddp_config(tmp_path, name, adapter, micro)
    cfg = yaml.safe_load(path.read_text())
    if model is not None:
        cfg["model"] = {"name_or_path": str(model)}
    cfg["dist"] = dist or {}
    cfg["checkpoint"]["save_total_limit"] = 5
    # the unfused LM head everywhere: FSDP2 and ZeRO-3 cannot use the chunked one, and comparing strategies
    # needs the same loss arithmetic (Adam turns summation-order rounding of near-zero gradients into 1e-6s)
    cfg["train"]["logits"] = "trained"
    # generation before and after training: under FSDP2 / ZeRO-3 every rank generates (parameters are gathered
    # inside each forward), so the engine must make the same forward calls on every rank. Sampled, seeded (the same
    # tokens on every rank): the tiny model's greedy answers are empty and would score 0 however they were made.
    cfg["eval"].update(
        at_start=True, generate_rows=GENERATED, max_new_tokens=16, temperature=1.0, batch_size=3, show_samples=2
    )
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    """The 1-process baselines (micro-batch 4 x accumulation 2): full fine-tuning of a new tiny model, then LoRA on
    its result (`pretrained`, the model directory every LoRA case starts from)."""
    tmp = tmp_path_factory.mktemp("one")
    runs = {"full": tmp / "full", "lora": tmp / "lora", "pretrained": tmp / "full" / "final"}
    done = tuneforge("train", config(tmp, "full", FULL, micro=4))
    assert done.returncode == 0, done.stderr[-3000:]
    done = tuneforge("train", config(tmp, "lora", LORA, micro=4, model=runs["pretrained"]))
    assert done.returncode == 0, done.stderr[-3000:]
    return runs


def losses(run: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in records(run, "train")], dtype=torch.float64)


def eval_losses(run: Path) -> torch.Tensor:
    return torch.tensor([r["eval_loss"] for r in records(run, "eval")], dtype=torch.float64)


def assert_same_weights(w1: dict, w2: dict) -> None:
    assert w1.keys() == w2.keys()
    for k in w1:  # Adam amplifies rounding of near-zero gradient entries (a few per tensor: 3 of a 4x64 LoRA B on
        # a 2-core Xeon with AVX-512, at most 2 on an EPYC); the rest agree to 1e-6, and none by more than 6 steps of lr
        diff = (w2[k] - w1[k]).abs()
        assert int((diff > 1e-6).sum()) <= max(4, diff.numel() // 100) and float(diff.max()) < 6 * 5e-3, k


def reloaded_eval_loss(run: Path, kind: str, base: Path) -> float:
    """The final directory loaded the way a user would (transformers, + peft for an adapter), on the run's eval rows."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.data.collate import PaddedCollator
    from tuneforge.eval.perplexity import evaluate_loss

    final = run / "final"
    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), final)
    tok = AutoTokenizer.from_pretrained(final)
    return evaluate_loss(model, load_from_disk(str(run / "data" / "eval")), PaddedCollator(tok.pad_token_id), 8, "cpu")[
        "eval_loss"
    ]


CASES = {
    "fsdp2-lora": ("lora", {"strategy": "fsdp2"}, "FSDPPeftModelForCausalLM", 0.5),
    "fsdp2-full": ("full", {"strategy": "fsdp2"}, "FSDPLlamaForCausalLM", 0.5),
    # the seed-style ZeRO-2 file, "auto" values and optimizer/scheduler sections included, used as given
    "zero2-lora": (
        "lora",
        {"strategy": "deepspeed", "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json")},
        "DeepSpeedEngine(ZeRO-2)",
        1.0,
    ),
    "zero3-lora": ("lora", {"strategy": "deepspeed", "zero_stage": 3}, "DeepSpeedEngine(ZeRO-3)", 0.5),
}
# (ZeRO-3 with full fine-tuning: configs/deepspeed/zero3.json is built through a run config in
# tests/test_shipped_configs.py; ZeRO-3's partitioning and gathering are the same code for LoRA and full)


@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_processes_match_one(tmp_path, one_process, case):
    kind, dist, wrapper, held = CASES[case]
    adapter = LORA if kind == "lora" else FULL
    model = one_process["pretrained"] if kind == "lora" else None
    run = tmp_path / case
    two = tuneforge("train", config(tmp_path, case, adapter, micro=2, dist=dist, model=model), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"distributed: 2 processes, {wrapper}, backend gloo; global micro-batch 4 rows" in two.stdout
    summary = json.loads((run / "run_summary.json").read_text())
    # the strategy really shards (FSDP2 / ZeRO-3 hold half of every sharded tensor; ZeRO-2 keeps whole weights)
    assert (summary["world_size"], summary["wrapper"]) == (2, wrapper)
    assert summary["params_held_per_rank"] == pytest.approx(held, abs=0.02)

    base = one_process[kind]
    # the sharded ranks generated together, the same texts as one process
    s1 = json.loads((base / "run_summary.json").read_text())
    assert summary["before"]["generated_rows"] == summary["after"]["generated_rows"] == GENERATED
    assert {k: summary["before"][k] for k in TASK} == {k: s1["before"][k] for k in TASK}
    assert {k: summary["after"][k] for k in TASK} == pytest.approx({k: s1["after"][k] for k in TASK})
    assert s1["before"]["chrf"] > 0 and len(summary["samples"]) == 2  # real answers were scored, not empty ones
    torch.testing.assert_close(losses(run), losses(base), rtol=1e-5, atol=0)
    assert len(losses(run)) == 6
    if kind == "full":  # a new model learns fast; LoRA on the already-trained one moves little, but it moves
        assert losses(run)[-1] < losses(run)[0]
    else:
        assert all(float(w.abs().max()) > 0 for k, w in final_weights(run).items() if "lora_B" in k)
    torch.testing.assert_close(eval_losses(run), eval_losses(base), rtol=1e-5, atol=0)
    assert_same_weights(final_weights(base), final_weights(run))
    # final/ is a plain consolidated directory: reloaded, it gives the run's own last eval loss
    assert reloaded_eval_loss(run, kind, one_process["pretrained"]) == pytest.approx(
        float(eval_losses(run)[-1]), rel=1e-5
    )

    ckpt = run / "checkpoints" / "step-000002"
    assert (ckpt / "sharded").is_dir() and not (ckpt / "trainable.safetensors").exists()
    if case == "fsdp2-full":
        # DCP shards written by 2 processes resume on 1 (resharded on load): the 1-process losses of steps 3-6
        cont = tuneforge("train", config(tmp_path, "cont", adapter, micro=4, dist=dist), "--resume", ckpt)
        assert cont.returncode == 0, cont.stderr[-3000:]
        assert "resuming from" in cont.stdout
        torch.testing.assert_close(losses(tmp_path / "cont"), losses(base)[2:], rtol=1e-5, atol=0)
    if case == "zero3-lora":
        # ZeRO partitions belong to one world size: resuming on 2 processes continues exactly ...
        cont = tuneforge(
            "train",
            config(tmp_path, "cont", adapter, micro=2, dist=dist, model=model),
            "--nproc",
            "2",
            "--resume",
            run / "checkpoints" / "step-000004",
        )
        assert cont.returncode == 0, cont.stderr[-3000:]
        torch.testing.assert_close(losses(tmp_path / "cont"), losses(base)[4:], rtol=1e-5, atol=0)
        # ... and 1 process is refused before training, with the reason
        one = tuneforge("train", config(tmp_path, "cont1", adapter, micro=4, dist=dist, model=model), "--resume", ckpt)
        assert one.returncode == 2, one.stdout[-2000:]
        assert "checkpoint_layout: deepspeed zero-3 x2 -> deepspeed zero-3 x1" in one.stderr
        # and the export merges the gathered adapter into its base, parity checked
        export = tuneforge("export", run)
        assert export.returncode == 0, export.stderr[-3000:]
        assert (run / "export" / "config.json").exists() and json.loads((run / "export" / "parity.json").read_text())
