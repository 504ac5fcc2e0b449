"""FLOP accounting for MFU, attention pairs from the collators, memory and thread defaults."""

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tuneforge.data.collate import PackedCollator, PaddedCollator
from tuneforge.train.throughput import MfuMeter, default_threads, flop_model, peak_memory_gb


def llama(h=32, i=64, layers=2, heads=4, kv=2, vocab=100):
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def test_flop_model_counts_block_matmuls_head_and_adapters():
    model = llama()
    fm = flop_model(model)
    # q,o: 32x32; k,v: 32x16 (2 of 4 heads); gate, up, down: 32x64
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64
    assert fm.body_params == 2 * per_layer and fm.trainable_body == fm.body_params
    assert fm.head_params == 100 * 32 and fm.head_trains and fm.adapter_params == 0
    # full fine-tuning: 6 FLOPs per weight per token (+ attention), head at the trained positions only
    flops = fm.step_flops(tokens=10, trained_positions=4, attended=55, head_positions=4)
    assert flops == 6 * fm.body_params * 10 + 3 * 4 * 2 * 32 * 55 + 6 * 3200 * 4

    lora = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fl = flop_model(lora)
    assert fl.body_params == fm.body_params and fl.trainable_body == 0
    assert fl.adapter_params == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) and not fl.head_trains
    # frozen weights: forward + input gradient only (4 per weight per token)
    assert fl.step_flops(10, 4, 0, 4) == 4 * fl.body_params * 10 + 6 * fl.adapter_params * 10 + 4 * 3200 * 4


def test_collators_count_causal_attention_pairs():
    padded = PaddedCollator(0)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert int(padded["num_attended"]) == 6 + 1
    packed = PackedCollator(0)([{"input_ids": [1, 2, 3, 4, 5], "labels": [1] * 5, "position_ids": [0, 1, 2, 0, 1]}])
    assert int(packed["num_attended"]) == 6 + 3  # two samples of 3 and 2 tokens, not one of 5 (15)


def test_peak_memory_and_threads_are_sane():
    assert 0.01 < peak_memory_gb("cpu") < 64
    assert default_threads(1) >= 1 and default_threads(64) == 1


def test_training_logs_throughput_mfu_and_memory(tiny_config_dict, tmp_path):
    import json

    from tuneforge.config.schema import RunConfig
    from tuneforge.data.prepare import prepare
    from tuneforge.train.loop import Trainer

    cfg = RunConfig.model_validate({**tiny_config_dict, "train": {**tiny_config_dict["train"], "peak_tflops": 0.5}})
    data = prepare(cfg, tmp_path / "run", log=lambda s: None)
    tr = Trainer(cfg, tmp_path / "run", data, log=lambda s: None).setup()
    assert tr.peak_tflops == 0.5
    tr.train()
    tr.cleanup()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in recs if r["type"] == "train"][-1]
    assert 0 < step["mfu"] < 1 and step["peak_mem_gb"] > 0.05
    assert step["trained_tokens_per_s"] == pytest.approx(step["trained_tokens"] / step["step_time_s"])
    assert step["tokens_per_s"] > step["trained_tokens_per_s"]


def test_mfu_is_never_above_100_percent_when_the_start_up_peak_was_low():
    meter = MfuMeter(2.0, "measured fp32 matmul, best of 4 bursts", processes=2)
    # 2 processes, 1e12 FLOPs each in 1 s: 1 TFLOP/s per process = 50% of 2.0
    assert meter.update(2e12, 1.0) == (0.5, None)
    # a step at 3 TFLOP/s per process: the measured peak was low (busy cores); the step becomes the peak
    mfu, note = meter.update(6e12, 1.0)
    assert mfu == 1.0 and meter.peak == pytest.approx(3.0)
    assert note == (
        "MFU: a step reached 3 TFLOP/s per process, above the peak of 2 (measured fp32 matmul, best of "
        "4 bursts); MFU is now measured against 3 (the cores were probably busy while it was measured)"
    )
    # later steps are measured against the raised peak; the note is given once
    assert meter.update(3e12, 1.0) == (pytest.approx(0.5), None)
    assert meter.update(8e12, 1.0) == (1.0, None) and meter.peak == pytest.approx(4.0)
    configured = MfuMeter(0.001, "train.peak_tflops")
    mfu, note = configured.update(1e10, 1.0)
    assert mfu == 1.0 and note.endswith("(set train.peak_tflops to the device's real peak)")


def test_a_run_with_a_too_low_configured_peak_logs_mfu_of_at_most_100_percent(tiny_config_dict, tmp_path):
    import json

    from tuneforge.config.schema import RunConfig
    from tuneforge.data.prepare import prepare
    from tuneforge.train.loop import Trainer

    cfg = RunConfig.model_validate({**tiny_config_dict, "train": {**tiny_config_dict["train"], "peak_tflops": 1e-9}})
    data = prepare(cfg, tmp_path / "run", log=lambda s: None)
    lines = []
    tr = Trainer(cfg, tmp_path / "run", data, log=lines.append).setup()
    tr.train()
    tr.cleanup()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in recs if r["type"] == "train"]
    assert mfus and max(mfus) <= 1.0 and mfus[0] == 1.0
    assert sum("MFU: a step reached" in line for line in lines) == 1
