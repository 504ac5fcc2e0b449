"""Shared fixtures. Tests that read ../shared/data skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# GGUF conversions (the real model of tests/model/test_real_model.py) are made once and kept beside the checkout,
# never in the user's own cache
os.environ.setdefault("TUNEFORGE_CACHE", str(REPO / ".cache" / "tuneforge"))
SHARED_DATA = Path(os.environ.get("TUNEFORGE_SHARED", REPO.parent / "shared")) / "data"


def shared_path(rel: str) -> Path:
    """A path under ../shared/data, or skip the test when it is not there."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"{p} not available (../shared/data is absent)")
    return p


@pytest.fixture
def tiny_config_dict(tmp_path):
    """A small, fast run config (dict) on the synthetic task; tests tweak it."""
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
            "train": [{"synthetic": {"task": "reverse_words", "rows": 64, "seed": 0}}],
            "eval_fraction": 0.125,
            "max_seq_len": 64,
        },
        "adapter": {"type": "full"},
        "train": {"lr": 1e-3, "max_steps": 4, "micro_batch_size": 4, "warmup_steps": 0, "seed": 1},
        "eval": {"at_start": False, "show_samples": 0},
        "log": {"every_steps": 1, "progress": "none"},
        "output": {"dir": str(tmp_path / "run")},
    }
