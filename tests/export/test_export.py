"""`tuneforge export`: merge, write, reload and check logit parity; refuse loudly when the numbers disagree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tuneforge.cli import main
from tuneforge.export import ExportError, ExportParityError, export_run
from tuneforge.export.parity import THRESHOLDS, compare


def _adapter_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "final").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_export_is_a_plain_hf_model_with_the_adapters_logits_and_stop_ids(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--out", str(out), "--dtype", "fp32"]) == 0
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "parity.json",
        "tuneforge.json",
    } <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".merged.tmp-*"))

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template  # the training template travels with the export
    ids = torch.tensor([tok("Reverse the order of these words.\n\nred green blue")["input_ids"]])
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    want = _adapter_logits(lora_run, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the adapter really moved the logits, so the comparison above means something
    from transformers import AutoModelForCausalLM as Auto

    with torch.no_grad():
        base_logits = Auto.from_pretrained(lora_run / "base")(input_ids=ids).logits
    assert float((base_logits - want).abs().max()) > 1e-3

    stops = json.loads((lora_run / "final" / "tuneforge.json").read_text())["stop_token_ids"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == stops and gen["pad_token_id"] == tok.pad_token_id
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["merged"] and parity["adapter"] == "lora"
    assert [c["name"] for c in parity["checks"]] == ["merge", "export"]
    assert parity["prompt_source"] == "data/eval" and parity["prompts"] == 4
    assert all(c["max_abs_diff"] < 1e-5 and c["top1_agreement"] == 1.0 for c in parity["checks"])


def test_a_corrupted_merge_fails_loudly_and_writes_nothing(lora_run, tmp_path, monkeypatch, capsys):
    from peft.tuners.tuners_utils import BaseTuner

    # the classic bug: the adapter is dropped instead of merged (unload without merge)
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())
    out = tmp_path / "bad"
    with pytest.raises(ExportParityError, match=r"failed the parity check, nothing was written") as err:
        export_run(lora_run, out, "fp32", log=lambda _: None)
    merge = err.value.checks[0]
    assert merge.name == "merge" and not merge.passed and merge.max_abs_diff > merge.allowed_max_abs_diff
    assert not out.exists() and not list(tmp_path.glob(".bad.tmp-*"))

    assert main(["export", str(lora_run), "--out", str(out), "--dtype", "fp32"]) == 1
    assert "merge (fp32): max |logit diff|" in capsys.readouterr().err and not out.exists()


def test_a_corrupted_write_fails_the_export_check(lora_run, tmp_path, monkeypatch):
    import tuneforge.export.merge as merge_mod

    real_write = merge_mod._write

    def write_then_corrupt(model, *args):
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(1.5)  # a wrong shard / bad cast on the way to disk
        real_write(model, *args)

    monkeypatch.setattr(merge_mod, "_write", write_then_corrupt)
    with pytest.raises(ExportParityError) as err:
        export_run(lora_run, tmp_path / "bad", "fp32", log=lambda _: None)
    assert [c.passed for c in err.value.checks] == [True, False]


def test_full_fine_tune_exports_in_bf16_sharded(full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    result = export_run(full_run, out, "bf16", max_shard_size="100KB", log=lambda _: None)
    assert result.dtype == "bf16" and not result.merged and [c.name for c in result.checks] == ["export"]
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    check = result.checks[0]
    assert check.passed and 0 < check.max_abs_diff <= THRESHOLDS["bf16"].rtol * max(1.0, check.logit_scale)


def test_exporting_again_replaces_the_previous_export(full_run, tmp_path):
    out = tmp_path / "x"
    export_run(full_run, out, "fp32", log=lambda _: None)
    (out / "stale.txt").write_text("from before")
    export_run(full_run, out, "fp32", log=lambda _: None)
    assert not (out / "stale.txt").exists() and (out / "parity.json").exists()
    assert not (tmp_path / "x.old").exists()


def test_export_errors_name_the_problem_and_the_fix(lora_run, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err

    not_export = tmp_path / "busy"
    not_export.mkdir()
    (not_export / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"is not a tuneforge export \(no parity.json\)"):
        export_run(lora_run, not_export, "fp32", log=lambda _: None)
    assert (not_export / "notes.txt").read_text() == "mine"

    # the run moved: its adapter still points at the old base directory
    moved = tmp_path / "moved"
    shutil.copytree(lora_run / "final", moved / "final")
    shutil.copytree(lora_run / "base", tmp_path / "elsewhere")
    adapter_cfg = json.loads((moved / "final" / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "final" / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    with pytest.raises(ExportError, match=r"base model not found: .*pass the base model's directory with --base DIR"):
        export_run(moved, None, "fp32", log=lambda _: None)
    assert main(["export", str(moved), "--base", str(tmp_path / "elsewhere"), "--dtype", "fp32"]) == 0
    assert json.loads((moved / "export" / "parity.json").read_text())["passed"]


def test_compare_judges_by_the_logit_scale():
    ref = [torch.tensor([[10.0, 0.0], [0.0, 10.0]])]
    close = [ref[0] + 5e-4]  # 5e-5 of the scale 10: fp32 allows 1e-4 x 10 = 1e-3
    far = [ref[0] + torch.tensor([[0.0, 0.0], [0.0, -20.0]])]  # flips the second argmax
    assert compare("x", ref, close, "fp32").passed
    c = compare("x", ref, far, "fp32")
    assert not c.passed and c.top1_agreement == 0.5 and c.max_abs_diff == 20.0


def test_export_and_adapter_directories_hold_what_vllm_reads(lora_run, tmp_path):
    """`vllm serve RUN/export` reads config.json (architectures), the safetensors, the tokenizer with its chat
    template (tokenizer_config.json for older transformers) and generation_config's eos ids; `vllm serve BASE
    --enable-lora --lora-modules name=RUN/final` reads adapter_config.json and adapter_model.safetensors."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out = tmp_path / "export"
    export_run(lora_run, out, "bf16", max_shard_size="100KB", log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["max_position_embeddings"] == 128
    assert config["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    stored = {k for f in out.glob("model-*.safetensors") for k in safe_open(str(f), "pt").keys()}
    assert stored == set(index["weight_map"]) and not any("lora" in k for k in stored)

    tok = AutoTokenizer.from_pretrained(lora_run / "final")
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == tok.chat_template == (out / "chat_template.jinja").read_text()
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template  # both copies load as one
    stops = json.loads((lora_run / "final" / "tuneforge.json").read_text())["stop_token_ids"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stops == [tok.eos_token_id]

    adapter = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    assert (Path(adapter["base_model_name_or_path"]) / "config.json").exists()
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    with safe_open(str(lora_run / "final" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
