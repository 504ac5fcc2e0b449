"""The memory planner against measured bytes of real steps (tiny models, CPU, fp32): within 15%."""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory_planner import measure_step_memory
from tuneforge.cli import main
from tuneforge.config.schema import RunConfig
from tuneforge.model.adapters import apply_adapter
from tuneforge.model.load import load_model
from tuneforge.train.optim import build_optimizer
from tuneforge.train.planner import GIB, parse_size, plan_memory


class _Tok:
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

    def __len__(self):
        return 512


def _cfg(adapter: str, checkpointing: bool) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {
                "init": {
                    "architecture": "llama",
                    "hidden_size": 128,
                    "num_layers": 3,
                    "num_heads": 4,
                    "num_kv_heads": 2,
                    "max_position_embeddings": 256,
                    "tokenizer_vocab_size": 512,
                }
            },
            "data": {"train": [{"synthetic": {"task": "reverse_words", "rows": 8}}], "max_seq_len": 128},
            "adapter": {"type": adapter, "r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"micro_batch_size": 4, "gradient_checkpointing": checkpointing, "lr": 1e-3},
        }
    )


@pytest.mark.parametrize("adapter", ["lora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_plan_is_within_15_percent_of_measured_bytes(adapter, checkpointing):
    cfg = _cfg(adapter, checkpointing)
    plan = plan_memory(cfg, device="cpu", precision="fp32")

    torch.manual_seed(0)
    model = load_model(cfg.model, _Tok(), torch.float32, "sdpa")
    model = apply_adapter(model, cfg.adapter, checkpointing, mask_dropout=True, addmm=True)  # as a CPU run builds it
    model.train()
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    measured = measure_step_memory(model, batch, build_optimizer(model, cfg.train))

    p = plan.parts
    planned = {
        "weights": p["weights"],
        "gradients": p["gradients"],
        "optimizer": p["optimizer (adamw)"],
        "saved activations": p["activations (decoder)"] + p["activations (LM head, loss)"],
    }
    # what stays saved through the forward (with checkpointing: the layers' inputs; their recompute comes later)
    assert ("recomputed layer (checkpointing)" in p) == checkpointing
    for k, m in measured.items():
        assert m > 0 and abs(planned[k] - m) <= 0.15 * m, f"{k}: planned {planned[k]:,.0f} vs measured {m:,.0f} bytes"


def test_plan_command_prints_the_breakdown_and_the_largest_micro_batch(tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg("lora", False).model_dump(mode="json", exclude_defaults=True)))
    assert main(["plan", str(path), "--gpu-mem", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per device (cuda, bf16; micro-batch 4 x 128 tokens)" in out
    assert "device memory 1.0 GiB: fits; largest micro-batch that fits:" in out
    assert main(["plan", str(path), "--gpu-mem", "1MiB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_memory_sizes_parse_with_units():
    assert parse_size("80GiB") == 80 * GIB and parse_size("24GB") == 24e9 and parse_size("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="use a number with a unit, e.g. 80GiB"):
        parse_size("lots")


def test_a_model_whose_config_cannot_be_read_is_a_clear_error(tmp_path, capsys):
    import yaml

    cfg = _cfg("lora", False).model_dump(mode="json", exclude_defaults=True)
    cfg["model"] = {"name_or_path": str(tmp_path / "no-such-model")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(path)]) == 1
    err = capsys.readouterr().err
    assert (
        "memory plan: could not read the config of model" in err and "set model.name_or_path to that directory" in err
    )


def test_sharded_strategies_divide_what_they_shard_and_offload_leaves_the_device():
    base = _cfg("full", False).model_dump()
    ddp = plan_memory(_cfg("full", False), device="cuda", precision="fp32", gpus=4).parts

    def plan(**dist):
        return plan_memory(RunConfig.model_validate({**base, "dist": dist}), device="cuda", precision="fp32", gpus=4)

    fsdp = plan(strategy="fsdp2")
    for key in ("weights", "gradients", "optimizer (adamw)"):
        assert fsdp.parts[key] == pytest.approx(ddp[key] / 4)
    # one decoder layer's weights (fp32), gathered whole for its forward and backward
    cfg = _cfg("full", False)
    from tuneforge.train.activation_probe import meta_model

    layer = sum(p.numel() for p in meta_model(cfg).model.layers[0].parameters()) * 4
    assert fsdp.parts["gathered layer (all-gather)"] == layer
    assert "FSDP2 on 4 devices: weights, gradients, optimizer divided over the devices" in fsdp.notes

    zero2 = plan(strategy="deepspeed", zero_stage=2).parts
    assert zero2["weights"] == ddp["weights"] and zero2["gradients"] == pytest.approx(ddp["gradients"] / 4)
    assert "gathered layer (all-gather)" not in zero2
    zero3 = plan(strategy="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True)
    assert zero3.parts["weights"] == 0.0 and zero3.parts["optimizer (adamw)"] == 0.0
    assert zero3.parts["gradients"] == pytest.approx(ddp["gradients"] / 4)
    assert zero3.notes[-1] == (
        "DeepSpeed ZeRO-3 on 4 devices: optimizer, gradients, weights divided over the devices; "
        "optimizer, weights in CPU RAM"
    )
    assert (
        zero3.total
        < plan(strategy="deepspeed", zero_stage=3).total
        < zero2["weights"] + sum(v for k, v in zero2.items() if k != "weights")
    )


def _smollm2_sized(checkpointing="auto", micro_batch: int = 4, seq: int = 512) -> RunConfig:
    """A config with SmolLM2-135M's shapes (built on meta: nothing is loaded)."""
    return RunConfig.model_validate(
        {
            "model": {
                "init": {
                    "architecture": "llama",
                    "hidden_size": 576,
                    "num_layers": 30,
                    "num_heads": 9,
                    "num_kv_heads": 3,
                    "intermediate_size": 1536,
                    "max_position_embeddings": 2048,
                    "tokenizer_vocab_size": 49152,
                }
            },
            "data": {"train": [{"synthetic": {"task": "reverse_words", "rows": 8}}], "max_seq_len": seq},
            "adapter": {"type": "lora", "dropout": 0.1},
            "train": {"micro_batch_size": micro_batch, "gradient_checkpointing": checkpointing},
        }
    )


def test_auto_checkpointing_follows_the_share_of_free_memory_and_says_why():
    plain = plan_memory(_smollm2_sized(False), device="cpu", precision="fp32", device_bytes=64 * GIB)
    need = plain.total
    assert (
        1.6 * GIB < plain.parts["activations (decoder)"] < 1.7 * GIB
    )  # 30 layers x 2048 positions of LoRA'd projections
    # plenty of room: no recomputation, the plan is the plain one
    roomy = plan_memory(_smollm2_sized(), device="cpu", precision="fp32", device_bytes=4 * need)
    assert not roomy.checkpointing and roomy.total == need
    assert roomy.notes[0] == (
        f"gradient checkpointing off (auto: {need / GIB:.1f} GiB planned, 25% of the {4 * need / GIB:.1f} GiB free)"
    )
    # more than half of the free memory: checkpointing, and the plan is the run that will happen
    tight = plan_memory(_smollm2_sized(), device="cpu", precision="fp32", device_bytes=1.5 * need)
    forced = plan_memory(_smollm2_sized(True), device="cpu", precision="fp32", device_bytes=1.5 * need)
    assert tight.checkpointing and tight.total == forced.total < 0.4 * need
    assert tight.notes[0] == (
        f"gradient checkpointing on (auto: {need / GIB:.1f} GiB without it would be 67% of "
        f"the {1.5 * need / GIB:.1f} GiB free, over 50%)"
    )
    # an explicit choice stands, whatever the plan
    assert plain.notes[0] == "gradient checkpointing off (train.gradient_checkpointing=False)"
    assert not plan_memory(_smollm2_sized(False), device="cpu", precision="fp32", device_bytes=need).checkpointing


def test_the_cpu_plan_counts_the_lora_dropout_the_run_uses():
    """On a CPU the run's LoRA dropout keeps one byte per element instead of an fp32 mask and dropout(x) (two
    fp32 tensors per projection), and with it the SwiGLU MLP keeps gate and up only (model/swiglu_lora.py): the
    plan, measured on the real modules, counts 59% less activation."""
    cpu = plan_memory(_smollm2_sized(False), device="cpu", precision="fp32")
    cuda = plan_memory(_smollm2_sized(False), device="cuda", precision="fp32")
    ratio = cpu.parts["activations (decoder)"] / cuda.parts["activations (decoder)"]
    assert 0.38 < ratio < 0.45


def test_train_logs_the_decision_the_plan_shows(tiny_config_dict, tmp_path, capsys):
    import yaml

    tiny_config_dict["train"].pop("gradient_checkpointing", None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict))
    assert main(["plan", str(path)]) == 0
    planned = next(x.strip()[len("note: ") :] for x in capsys.readouterr().out.splitlines() if "checkpointing" in x)
    assert planned.startswith("gradient checkpointing off (auto:")
    assert main(["train", str(path)]) == 0
    assert planned.split(" (auto")[0] in capsys.readouterr().out
