"""End-to-end runs of the real entry point on tiny models (marked integration; CI runs them)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def tuneforge(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_quickstart_with_fewer_steps_learns_and_loads_with_plain_transformers(tmp_path):
    run = tmp_path / "qs"
    proc = tuneforge(
        "train",
        REPO / "configs/examples/quickstart.yaml",
        f"output.dir={run}",
        "train.max_steps=120",
        "eval.every_steps=60",
        "eval.generate_rows=20",
        "eval.show_samples=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "before training: eval_loss=" in proc.stdout and "sample generations:" in proc.stdout

    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["steps"] == 120
    assert summary["last_loss"] < 0.5 * summary["first_loss"]
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 1.0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["type"] == "train"]
    assert [x["step"] for x in train_lines][:2] == [10, 20] and train_lines[-1]["step"] == 120
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens"} <= set(train_lines[0])
    assert [x["step"] for x in lines if x["type"] == "eval"][:3] == [0, 60, 120]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 120 and resolved["output"]["dir"] == str(run)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run / "final"
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and model.config.vocab_size == len(tok)

    gen = tuneforge(
        "generate",
        run,
        "--prompt",
        "Reverse the order of these words.\n\nrocket candle island",
        "--max-new-tokens",
        "12",
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.strip(), "generate printed nothing"

    # training into a finished run without overwrite is refused
    again = tuneforge("train", REPO / "configs/examples/quickstart.yaml", f"output.dir={run}", "output.overwrite=false")
    assert again.returncode == 2 and "final already exists" in again.stderr


def test_lora_changes_only_adapter_weights_and_loads_with_plain_peft(tmp_path, tiny_config_dict):
    cfg = dict(tiny_config_dict)
    cfg["adapter"] = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    cfg["train"] = {**cfg["train"], "lr": 5e-3, "max_steps": 3}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = Path(cfg["output"]["dir"])
    proc = tuneforge("train", path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = run / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((run / "base").resolve())

    base = AutoModelForCausalLM.from_pretrained(run / "base")
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, final)
    for name, p in model.base_model.model.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        torch.testing.assert_close(p, base_before[key], rtol=0, atol=0)  # base weights unchanged

    trained = load_file(final / "adapter_model.safetensors")
    assert trained and all("lora_" in k for k in trained)
    # every LoRA matrix moved away from its initialisation (B starts at zero; A from the seeded init,
    # reproduced here: 3 Adam steps at lr 5e-3 move each entry by well under 0.05)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg["train"]["seed"])
    init = get_peft_model(
        AutoModelForCausalLM.from_pretrained(run / "base"),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    init_sd = {k.replace(".default", ""): v for k, v in init.state_dict().items() if "lora_" in k}
    assert len(init_sd) == len(trained)
    for k, v in trained.items():
        moved = (v - init_sd[k]).abs()
        assert 0 < float(moved.max()) < 0.05, f"{k}: max change {float(moved.max())}"
        if "lora_B" in k:
            assert float(init_sd[k].abs().max()) == 0.0 and (moved > 0).float().mean() > 0.5

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Reverse the order of these words.\\n\\napple river stone"}\n'
        '{"messages": [{"role": "user", "content": "Sort these words alphabetically."}]}\n'
    )
    gen = tuneforge("generate", run, "--file", prompts, "--max-new-tokens", "5")
    assert gen.returncode == 0, gen.stderr[-2000:]
    rows = [json.loads(x) for x in gen.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [
        "Reverse the order of these words.\n\napple river stone",
        "Sort these words alphabetically.",
    ]
    assert all(isinstance(r["completion"], str) for r in rows)
