"""QLoRA on this CPU: a 4-bit (bitsandbytes nf4) frozen base, LoRA on top, gradients that are right."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from tuneforge.cli import main  # noqa: E402
from tuneforge.config.schema import RunConfig  # noqa: E402
from tuneforge.model.load import load_quantized  # noqa: E402
from tuneforge.train.optim import build_optimizer  # noqa: E402


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_qlora_gradients_equal_lora_on_the_dequantized_base_even_after_an_eval(base_dir):
    q = load_quantized(str(base_dir), torch.float32, "cpu", "nf4", double_quant=True)
    linears = {n: m for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linears) == 2 * 7 and all(m.weight.dtype == torch.uint8 for m in linears.values())
    assert next(iter(linears.values())).weight.quant_state.quant_type == "nf4"
    q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)

    # the reference: the same base with each 4-bit weight dequantised into an ordinary fp32 Linear
    ref = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for name, m in linears.items():
        ref.get_submodule(name).weight.data = bnb.functional.dequantize_4bit(
            m.weight.data, m.weight.quant_state
        ).float()

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    pq, pr = get_peft_model(q, lora), get_peft_model(ref, lora)
    torch.manual_seed(1)
    for (nq, wq), (nr, wr) in zip(
        ((n, p) for n, p in pq.named_parameters() if "lora_" in n),
        ((n, p) for n, p in pr.named_parameters() if "lora_" in n),
    ):
        assert nq == nr
        with torch.no_grad():  # B != 0, so every layer's gradient depends on the frozen layers above it
            wq.copy_(torch.randn_like(wq) * 0.05)
            wr.copy_(wq)

    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(2))
    pq.eval()  # the trainer evaluates before training: bitsandbytes must not keep an inference-only layout
    with torch.no_grad():
        _loss(pq, ids)
    pq.train()
    _loss(pq, ids).backward()
    _loss(pr, ids).backward()
    grads_q = {n: p.grad for n, p in pq.named_parameters() if p.requires_grad}
    grads_r = {n: p.grad for n, p in pr.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_r.keys() and len(grads_q) == 2 * 2 * 7
    for n in grads_q:
        assert grads_q[n] is not None and float(grads_q[n].abs().max()) > 0, n
        torch.testing.assert_close(grads_q[n], grads_r[n], rtol=1e-4, atol=1e-6, msg=n)


def _cfg(tmp_path, **train) -> dict:
    return {
        "model": {
            "init": {
                "architecture": "llama",
                "hidden_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "max_position_embeddings": 128,
                "tokenizer_vocab_size": 400,
            }
        },
        "data": {
            "train": [{"synthetic": {"task": "reverse_words", "rows": 48, "seed": 0}}],
            "eval_fraction": 0.125,
            "max_seq_len": 64,
        },
        "adapter": {"type": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"lr": 1e-2, "max_steps": 12, "micro_batch_size": 4, "warmup_steps": 0, "seed": 1, **train},
        "eval": {"at_start": True, "show_samples": 0},
        "log": {"every_steps": 1, "progress": "none"},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_qlora_run_trains_saves_an_adapter_and_exports_into_a_full_precision_base(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, optimizer="adamw_8bit")))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 0.1
    info = json.loads((run / "final" / "tuneforge.json").read_text())
    assert info["adapter"] == "qlora"
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(run / "final" / "adapter_model.safetensors"))
    assert main(["export", str(run), "--dtype", "fp32"]) == 0
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert parity["passed"] and parity["adapter"] == "qlora" and parity["merged"]
    merged = AutoModelForCausalLM.from_pretrained(run / "export")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}


def test_8bit_optimizers_come_from_bitsandbytes(tmp_path):
    model = torch.nn.Linear(8, 8)
    for name, cls in (("adamw_8bit", bnb.optim.AdamW8bit), ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit)):
        cfg = RunConfig.model_validate(_cfg(tmp_path, optimizer=name))
        assert type(build_optimizer(model, cfg.train)) is cls


def test_qlora_without_bitsandbytes_is_valid_but_cannot_start_here(tmp_path, monkeypatch):
    from tuneforge.config.packages import MissingPackageError, missing_packages, require_packages

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    cfg = RunConfig.model_validate(_cfg(tmp_path, optimizer="adamw_8bit"))  # valid whatever is installed
    assert missing_packages(cfg) == [
        "adapter.type=qlora and train.optimizer=adamw_8bit needs the bitsandbytes "
        "package, which is not installed: pip install 'tuneforge[qlora]'"
    ]
    with pytest.raises(MissingPackageError, match=r"this run cannot start on this machine:\n  adapter.type=qlora"):
        require_packages(cfg)
