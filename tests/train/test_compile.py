"""train.compile: the compiled decoder layers give the eager loop's losses (the switch changes speed, not numbers)."""

import json

import pytest

from tuneforge.config.schema import RunConfig
from tuneforge.data.prepare import prepare
from tuneforge.train.loop import Trainer

pytestmark = pytest.mark.integration


def losses(cfg_dict, tmp_path, name, compile_):
    d = {
        **cfg_dict,
        "output": {"dir": str(tmp_path / name)},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {**cfg_dict["train"], "max_steps": 3, "compile": compile_},
    }
    d["model"] = {"init": {**cfg_dict["model"]["init"], "num_layers": 1}}  # one layer: one compilation
    cfg = RunConfig.model_validate(d)
    data = prepare(cfg, tmp_path / name, log=lambda s: None)
    logs = []
    tr = Trainer(cfg, tmp_path / name, data, None, log=logs.append).setup()
    try:
        tr.train()
    finally:
        tr.cleanup()
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["type"] == "train"], logs


def test_compiled_layers_give_the_eager_losses(tiny_config_dict, tmp_path):
    eager, _ = losses(tiny_config_dict, tmp_path, "eager", False)
    compiled, logs = losses(tiny_config_dict, tmp_path, "compiled", True)
    assert "torch.compile: 1 decoder layer (compiled on first use)" in logs
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-5 * abs(a)
