"""Reward models on the one loop: the loss the loop backpropagates equals the Bradley-Terry formula (and TRL 1.16's
RewardTrainer.compute_loss) on rewards computed the plain way (one sequence at a time through transformers' own
pooling), the head trains in full beside LoRA and a resumed run restores it exactly, and final/ loads with
AutoModelForSequenceClassification with the same rewards; an end-to-end run beats chance on held-out pairs."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.train.objectives.trl_stand_ins import trl_reward
from tests.train.test_preference_loop import WORDS, config, trainer_for
from tuneforge.cli import main
from tuneforge.config.load import ConfigError
from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import rows_at
from tuneforge.data.prepare import prepare
from tuneforge.model.load import ModelLoadError, load_trained
from tuneforge.train.objective_step import peft_model

REWARD = {"type": "reward", "reward_margin": 0.25}


def plain_rewards(model, rows: list[dict]) -> torch.Tensor:
    """r(prompt + chosen), r(prompt + rejected) per pair, one sequence at a time, from the model's own pooled
    output (a sequence-classification model's logits at the last token)."""
    out = []
    for r in rows:
        for side in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([list(r["prompt_ids"]) + list(r[side])])
            out.append(model(input_ids=ids).logits[0, 0].float())
    return torch.stack(out)


def step_rows(tr, step):
    accum = tr.cfg.train.grad_accum
    return [r for i in range(accum) for r in rows_at(tr.data.train, tr.order.micro_batch((step - 1) * accum + i))]


def test_the_loop_reward_loss_equals_the_formula_on_plainly_computed_rewards(tiny_config_dict, tmp_path):
    tr = trainer_for(config(tiny_config_dict, tmp_path, objective=REWARD, micro_batch_size=4, grad_accum=2), tmp_path)
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert "base_model.model.score.weight" in trainable and not any("score.lora" in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and not any("embed_tokens" in n for n in trainable)
    for step in (1, 2):
        tr._step(step)
    rows = step_rows(tr, 3)
    model = peft_model(tr.model)
    with torch.no_grad():
        r = plain_rewards(model, rows)
    chosen, rejected = r[0::2].double(), r[1::2].double()
    want = -F.logsigmoid(chosen - rejected - 0.25).mean()
    trl_loss, trl_metrics = trl_reward(chosen, rejected, torch.full_like(chosen, 0.25))
    got = tr._step(3)
    assert float(want) == pytest.approx(float(trl_loss), rel=1e-12)
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert got["rewards/accuracies"] == pytest.approx(trl_metrics["accuracy"])
    assert got["rewards/margins"] == pytest.approx(trl_metrics["margin"], rel=1e-4, abs=1e-6)
    assert got["rewards/chosen"] == pytest.approx(float(chosen.mean()), rel=1e-4, abs=1e-6)
    tr.cleanup()


@pytest.mark.integration
def test_a_resumed_reward_run_equals_the_uninterrupted_one_and_final_loads_as_a_classifier(tiny_config_dict, tmp_path):
    def run(name, max_steps, resume=None):
        cfg = config(tiny_config_dict, tmp_path, name, objective=REWARD, max_steps=max_steps, micro_batch_size=4)
        cfg.checkpoint.every_steps = 2
        tr = trainer_for(cfg, tmp_path, name)
        tr.train(resume)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        weights = {n: p.detach().clone() for n, p in peft_model(tr.model).named_parameters() if p.requires_grad}
        return tr, [(r["step"], r["loss"]) for r in lines if r["type"] == "train"], weights

    tr, straight, w_straight = run("straight", 4)
    step2 = tmp_path / "straight" / "checkpoints" / "step-000002"
    assert [k for k in load_file(step2 / "trainable.safetensors") if "score" in k] == ["base_model.model.score.weight"]
    cont_tr, cont, w_cont = run("cont", 4, resume=step2)
    assert cont == straight[2:]  # exactly: steps 3-4 from the step-2 checkpoint
    assert "base_model.model.score.weight" in w_straight
    for name in w_straight:
        assert torch.equal(w_straight[name], w_cont[name]), name

    final = tr.save_final()
    rows = [tr.data.train[i] for i in range(4)]
    with torch.no_grad():
        trained = plain_rewards(peft_model(tr.model).eval(), rows)
        loaded = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
        assert type(loaded).__name__ == "LlamaForSequenceClassification" and loaded.config.num_labels == 1
        torch.testing.assert_close(plain_rewards(loaded, rows), trained, rtol=1e-5, atol=1e-6)
    assert json.loads((final / "tuneforge.json").read_text())["objective"] == "reward"
    assert not (final / "adapter_config.json").exists()  # merged: nothing refers to the base any more
    with pytest.raises(
        ModelLoadError,
        match=r"is a reward model \(LlamaForSequenceClassification.*"
        r"AutoModelForSequenceClassification.from_pretrained",
    ):
        load_trained(final)
    tr.cleanup()
    cont_tr.cleanup()


def test_a_fully_fine_tuned_reward_model_trains_everything_and_saves_as_a_classifier(tiny_config_dict, tmp_path):
    cfg = config(tiny_config_dict, tmp_path, objective=REWARD, micro_batch_size=4)
    cfg.adapter.type = "full"
    tr = trainer_for(cfg, tmp_path)
    assert all(p.requires_grad for p in tr.model.parameters()) and type(tr.model).__name__.endswith("Classification")
    tr._step(1)
    final = tr.save_final()
    rows = [tr.data.train[i] for i in range(2)]
    with torch.no_grad():
        loaded = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
        torch.testing.assert_close(plain_rewards(loaded, rows), plain_rewards(tr.model.eval(), rows))
    tr.cleanup()


def test_reward_setups_that_cannot_write_final_are_refused(tiny_config_dict, tmp_path):
    cfg = config(tiny_config_dict, tmp_path, "q", objective=REWARD)
    cfg.adapter.type = "qlora"
    with pytest.raises(ConfigError, match=r"objective.type=reward merges its adapter .* use adapter.type=lora"):
        trainer_for(cfg, tmp_path, "q")
    cfg = config(tiny_config_dict, tmp_path, "g", objective=REWARD)
    cfg.eval.generate_rows = 4
    with pytest.raises(ConfigError, match=r"eval.generate_rows and eval.general_text measure a language model's text"):
        trainer_for(cfg, tmp_path, "g")


def separable_pairs(tmp_path, n=48):
    """Chosen replies end in "ok", rejected ones in "no": a reward model can tell them apart from the last tokens."""
    rng = random.Random(1)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        rows.append(
            {
                "prompt": "Sort these words: " + " ".join(words),
                "chosen": " ".join(sorted(words)) + " ok",
                "rejected": " ".join(rng.sample(words, 4)) + " no",
            }
        )
    path = tmp_path / "separable.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.integration
def test_a_reward_run_beats_chance_on_held_out_pairs_and_final_scores_them_alike(tiny_config_dict, tmp_path, capsys):
    cfg = config(tiny_config_dict, tmp_path, objective={"type": "reward"}, max_steps=12, micro_batch_size=8)
    d = cfg.model_dump(mode="json")
    d["data"]["train"] = [{"path": str(separable_pairs(tmp_path))}]
    d["data"]["eval_fraction"] = 0.25
    d["eval"] = {**d["eval"], "at_start": True, "every_steps": 12, "generate_rows": 0, "show_samples": 0}
    path = tmp_path / "reward.yaml"
    path.write_text(json.dumps(d))
    assert main(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["eval_loss"] == pytest.approx(0.69, abs=0.02)  # a new head: rewards near 0, loss near ln 2
    assert after["eval_reward_accuracy"] == 1.0 and after["eval_pairs"] == 12  # was 0.83 (measured)
    assert after["eval_loss"] < 0.1 and after["eval_reward_margin"] > 1.0  # was 0.020 and 4.1 (measured)
    out = capsys.readouterr().out
    assert "eval_reward_accuracy" in out and "AutoModelForSequenceClassification.from_pretrained" in out
    # final/ scores the held-out pairs as the run measured them
    data = prepare(RunConfig.model_validate(d), tmp_path / "run", log=lambda s: None)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final").eval()
    with torch.no_grad():
        r = plain_rewards(model, list(data.eval))
    assert float((r[0::2] > r[1::2]).double().mean()) == pytest.approx(after["eval_reward_accuracy"])
    assert float(-F.logsigmoid(r[0::2] - r[1::2]).mean()) == pytest.approx(after["eval_loss"], rel=1e-4)
