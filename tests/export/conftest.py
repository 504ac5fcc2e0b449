"""Trained tiny runs shared by the export tests (one LoRA run, one full fine-tune; nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main


def _train(root: Path, adapter: dict, name: str) -> Path:
    cfg = {
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
        "adapter": adapter,
        "train": {"lr": 1e-2, "max_steps": 5, "micro_batch_size": 4, "warmup_steps": 0, "seed": 1},
        "eval": {"at_start": False, "show_samples": 0},
        "log": {"every_steps": 1, "progress": "none"},
        "output": {"dir": str(root / name)},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return root / name


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("export"), {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, "lora")


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("export"), {"type": "full"}, "full")
