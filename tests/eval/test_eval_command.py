"""`tuneforge eval RUN --base` and the report written by `train`, on real tiny runs (integration)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main

pytestmark = pytest.mark.integration


def tuneforge(*args):
    return subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("adapter", [{"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, {"type": "full"}])
def test_eval_base_prints_both_columns_and_base_matches_the_before_training_eval(
    tmp_path, tiny_config_dict, adapter, capsys
):
    cfg = dict(tiny_config_dict)
    cfg["adapter"] = adapter
    cfg["train"] = {**cfg["train"], "lr": 5e-3}
    cfg["eval"] = {"at_start": True, "show_samples": 1, "generate_rows": 2, "max_new_tokens": 6}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = Path(cfg["output"]["dir"])
    proc = tuneforge("train", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        (run / "report.md").exists()
        and (run / "report.html").exists()
        and (run / "plots" / "loss_vs_step.png").exists()
    )
    before = json.loads((run / "run_summary.json").read_text())["before"]

    # eval and report in this process (the train above is the CLI subprocess a user runs)
    assert main(["eval", str(run), "--base", "--rows", "3", "--max-new-tokens", "6", "--progress", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "held-out set: 8 rows (3 generated, max_new_tokens 6, temperature 0)"
    header = next(x for x in lines if x.startswith("metric"))
    assert header.split() == ["metric", "base", "tuned", "delta"]
    rows = {
        x.split()[0]: [float(v) for v in x.split()[1:]]
        for x in lines[lines.index(header) + 1 :]
        if x.strip() and not x.startswith("wrote")
    }
    assert list(rows) == ["eval_loss", "eval_ppl", "exact_match", "exact_match_normalized", "rouge_l", "chrf", "bleu"]
    base, tuned, delta = rows["eval_loss"]
    assert base == pytest.approx(before["eval_loss"], abs=1e-4)  # the base really is the model before training
    assert tuned < base and delta == pytest.approx(tuned - base, abs=2e-4)

    saved = json.loads((run / "eval.json").read_text())
    assert saved["base"]["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-5)
    assert saved["settings"] == {"rows": 8, "generated_rows": 3, "max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0}
    assert len(saved["samples"]["tuned"]) == 3 and set(saved["samples"]["base"][0]) == {
        "prompt",
        "reference",
        "generated",
    }

    # the report picks up the base/tuned table
    assert main(["report", str(run)]) == 0
    assert "| metric | base | tuned | delta |" in (run / "report.md").read_text()


def test_lm_eval_bridge_says_how_to_install_it(tmp_path):
    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here")
    run = tmp_path / "run"
    (run / "data" / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {init: {}}\n")
    ev = tuneforge("eval", run, "--lm-eval", "hellaswag")
    assert ev.returncode == 2 and "pip install lm-eval" in ev.stderr
