"""Generation in the recipe's before/after evaluation on 2 CPU processes (gloo) with a sharded model: FSDP2 and
DeepSpeed ZeRO-3 gather parameters collectively inside every forward, so every rank generates, and the engine must
make the same forward calls on each (a rank that stopped early would leave the other waiting forever). The run
finishes, and the task metrics of the generations are those of one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.train.test_distributed import tuneforge
from tests.train.test_strategies import FULL, LORA
from tests.train.test_strategies import config as strategy_config

pytestmark = pytest.mark.integration

ROWS = 4


def config(tmp_path: Path, name: str, adapter: dict, micro: int, dist: dict | None = None) -> Path:
    """test_strategies' run, 2 steps, with generation before and after training and samples at the end. The task
    eval samples (seeded: the same tokens on every rank): the tiny model's greedy answers are blank lines (before
    training) or eos at once (after), which would score 0 however they were made; sampled ones score above 0 and
    end at different steps."""
    path = strategy_config(tmp_path, name, adapter, micro, dist)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["max_steps"] = 2
    cfg["checkpoint"] = {"every_steps": 100}
    cfg["eval"] = {
        "at_start": True,
        "every_steps": 2,
        "generate_rows": ROWS,
        "max_new_tokens": 16,
        "temperature": 1.0,
        "batch_size": 3,  # 4 rows through 3 slots: a waiting row joins the running batch
        "show_samples": 2,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def summary(run: Path) -> dict:
    return json.loads((run / "run_summary.json").read_text())


@pytest.mark.parametrize(
    "adapter, dist",
    [(LORA, {"strategy": "fsdp2"}), (FULL, {"strategy": "deepspeed", "zero_stage": 3})],
    ids=["fsdp2-lora", "zero3-full"],
)
def test_sharded_ranks_generate_together_and_as_one_process(tmp_path, adapter, dist):
    one = tuneforge("train", config(tmp_path, "one", adapter, micro=4))
    assert one.returncode == 0, one.stderr[-3000:]
    two = tuneforge("train", config(tmp_path, "two", adapter, micro=2, dist=dist), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert s2["world_size"] == 2 and s2["wrapper"].startswith(("FSDP", "DeepSpeedEngine(ZeRO-3)"))
    task = ("generated_rows", "exact_match", "exact_match_normalized", "rouge_l", "chrf", "bleu")
    assert s1["before"]["generated_rows"] == s2["before"]["generated_rows"] == ROWS
    assert {k: s2["before"][k] for k in task} == {k: s1["before"][k] for k in task}
    assert s2["after"]["generated_rows"] == ROWS and len(s2["samples"]) == len(s1["samples"]) == 2
    assert s1["before"]["chrf"] > 0 and s1["after"]["chrf"] > 0  # real answers were scored, not empty ones
    assert {k: s2["after"][k] for k in task} == pytest.approx({k: s1["after"][k] for k in task})
