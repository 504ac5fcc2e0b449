"""The DeepSpeed JSON of a run: "auto" filled from the tuneforge config, contradictions and gaps refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.config.schema import RunConfig
from tuneforge.train.deepspeed_config import DeepSpeedConfigError, build_deepspeed_config

ROOT = Path(__file__).resolve().parents[2]


def run_config(**dist) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"init": {"hidden_size": 64, "num_layers": 2, "num_heads": 4}},
            "data": {"train": [{"synthetic": {"task": "sort_words", "rows": 16}}]},
            "train": {"micro_batch_size": 3, "grad_accum": 5, "max_grad_norm": 0.5},
            "dist": {"strategy": "deepspeed", **dist},
        }
    )


def test_the_seed_style_zero2_file_is_filled_from_the_run_config():
    ds, notes = build_deepspeed_config(
        run_config(deepspeed_config=str(ROOT / "configs/deepspeed/zero2.json")), "bf16", world=4, hidden_size=64
    )
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        3,
        5,
        60,
    )
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["fp16"]["initial_scale_power"] == 16  # explicit values are kept
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert "optimizer" not in ds and "scheduler" not in ds
    assert notes == [
        "the JSON's \"optimizer\" section is replaced by tuneforge's train.* settings",
        "the JSON's \"scheduler\" section is replaced by tuneforge's train.* settings",
    ]


def test_without_a_file_the_stage_offload_and_zero3_thresholds_come_from_dist():
    ds, _ = build_deepspeed_config(
        run_config(zero_stage=3, offload_optimizer=True, offload_params=True), "fp32", world=2, hidden_size=64
    )
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 640
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["bf16"]["enabled"] is False
    plain, _ = build_deepspeed_config(run_config(), "fp32", world=2, hidden_size=None)
    assert plain["zero_optimization"] == {"stage": 2}  # bucket sizes left to DeepSpeed without a hidden size


def test_an_explicit_value_that_contradicts_the_run_config_is_refused(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(DeepSpeedConfigError) as e:
        build_deepspeed_config(run_config(deepspeed_config=str(f)), "fp32", world=2)
    assert str(e.value) == (
        f"dist.deepspeed_config: {f}: gradient_accumulation_steps = 4 but the tuneforge config "
        'gives 5 (train.grad_accum); set it to "auto" (or to 5) in the JSON, or change '
        "train.grad_accum"
    )
    f.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization.stage = 3 but dist.zero_stage = 2; remove one"):
        build_deepspeed_config(run_config(deepspeed_config=str(f), zero_stage=2), "fp32", world=2)


def test_broken_files_and_unfillable_autos_name_the_place(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(DeepSpeedConfigError, match=rf"{f} line 2: not valid JSON"):
        build_deepspeed_config(run_config(deepspeed_config=str(f)), "fp32", world=1)
    f.write_text(
        json.dumps({"zero_optimization": {"stage": 2}, "activation_checkpointing": {"number_checkpoints": "auto"}})
    )
    with pytest.raises(
        DeepSpeedConfigError, match=r"cannot fill \"auto\" for activation_checkpointing.number_checkpoints"
    ):
        build_deepspeed_config(run_config(deepspeed_config=str(f)), "fp32", world=1)
    with pytest.raises(DeepSpeedConfigError, match=r"cannot read .*missing.json"):
        build_deepspeed_config(run_config(deepspeed_config=str(tmp_path / "missing.json")), "fp32", world=1)
    f.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(DeepSpeedConfigError, match=r"stage must be 1, 2 or 3 \(got 0\).*use dist.strategy=ddp"):
        build_deepspeed_config(run_config(deepspeed_config=str(f)), "fp32", world=1)


def test_dist_keys_that_do_not_apply_are_config_errors():
    with pytest.raises(ValueError, match=r"dist.zero_stage only applies to dist.strategy=deepspeed \(it is fsdp2\)"):
        RunConfig.model_validate(
            {
                "model": {"init": {}},
                "data": {"train": [{"synthetic": {"task": "sort_words"}}]},
                "dist": {"strategy": "fsdp2", "zero_stage": 3},
            }
        )
    with pytest.raises(ValueError, match=r"dist.offload_params needs ZeRO-3 \(dist.zero_stage=3\), not 2"):
        run_config(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match=r"adapter.type=qlora with dist.strategy=fsdp2 is not supported"):
        RunConfig.model_validate(
            {
                "model": {"init": {}},
                "data": {"train": [{"synthetic": {"task": "sort_words"}}]},
                "adapter": {"type": "qlora"},
                "dist": {"strategy": "fsdp2"},
            }
        )
