"""KTO on the one loop: the loss the loop backpropagates equals TRL 1.16's KTOTrainer._compute_loss on log-probs
computed the plain way (full logits, one sequence at a time, reference = adapter off, the mismatched KL pairs
rotated over the step's rows), a fresh LoRA policy starts at KL 0 and loss w/2, micro-batch x accumulation gives
the same steps (the KL estimate is the step's), the config errors, and an end-to-end run from a config."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.conftest import shared_path
from tests.train.objectives.trl_stand_ins import trl_kto
from tests.train.test_preference_loop import WORDS, plain_logps
from tuneforge.cli import main
from tuneforge.config.load import ConfigError
from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import rows_at
from tuneforge.data.prepare import prepare
from tuneforge.train.kto_step import KtoBatches, pairwise_auc
from tuneforge.train.loop import Trainer
from tuneforge.train.objective_step import peft_model

# desirable rows weigh more: the policy raises their log-probs, also as mismatched completions, so the KL is > 0
KTO = {"type": "kto", "beta": 0.5, "kto_desirable_weight": 3.0, "kto_undesirable_weight": 1.0}


def kto_file(tmp_path, n=32):
    """Sorting words: even rows desirable (sorted), odd rows undesirable (shuffled, one word too many)."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 4)
        good = i % 2 == 0
        reply = " ".join(sorted(words)) if good else " ".join(rng.sample(words, 4)) + " " + rng.choice(WORDS)
        prompt = {"role": "user", "content": "Sort these words: " + " ".join(words)}
        rows.append({"messages": [prompt, {"role": "assistant", "content": reply}], "label": good})
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tiny_config_dict, tmp_path, name="run", objective=None, **train):
    d = {**tiny_config_dict}
    d["data"] = {"train": [{"path": str(kto_file(tmp_path))}], "eval_fraction": 0.0, "max_seq_len": 64}
    d["adapter"] = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    d["objective"] = objective or KTO
    d["train"] = {**d["train"], "lr": 5e-3, **train}
    d["output"] = {"dir": str(tmp_path / name)}
    return RunConfig.model_validate(d)


def trainer_for(cfg, tmp_path, name="run"):
    data = prepare(cfg, tmp_path / name, log=lambda s: None)
    return Trainer(cfg, tmp_path / name, data, log=lambda s: None).setup()


def step_rows(tr, step):
    accum = tr.cfg.train.grad_accum
    return [r for i in range(accum) for r in rows_at(tr.data.train, tr.order.micro_batch((step - 1) * accum + i))]


def test_the_loop_kto_loss_starts_at_half_the_weight_and_equals_trl_on_plainly_computed_logps(
    tiny_config_dict, tmp_path
):
    cfg = config(tiny_config_dict, tmp_path, micro_batch_size=4, grad_accum=2)
    tr = trainer_for(cfg, tmp_path)
    labels = [bool(r["label"]) for r in step_rows(tr, 1)]
    first = tr._step(1)  # a fresh LoRA policy is its reference: KL 0, rewards 0, each row costs w (1 - sigma(0))
    desirable = sum(labels)
    assert 0 < desirable < len(labels)
    assert first["loss"] == pytest.approx((0.5 * 3.0 * desirable + 0.5 * (len(labels) - desirable)) / 8, abs=1e-6)
    assert first["kl"] == 0.0 and first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["rewards/accuracies"] == 0.0 and first["grad_norm"] > 0  # no sign right yet, but it learns
    tr._step(2)  # move the adapter away from the reference
    rows = step_rows(tr, 3)  # 8 rows, in two micro-batches: the KL pairs rotate over all of them
    model = peft_model(tr.model)
    with torch.no_grad():
        prompts = [list(r["prompt_ids"]) for r in rows]
        completions = [list(r["completion_ids"]) for r in rows]
        matched = list(zip(prompts, completions))
        mismatched = [(p, completions[i - 1][: 64 - len(p)]) for i, p in enumerate(prompts)]  # i - 1: cyclic
        policy, policy_kl = plain_logps(model, matched), plain_logps(model, mismatched)
        with model.disable_adapter():
            ref, ref_kl = plain_logps(model, matched), plain_logps(model, mismatched)
    labels = [bool(r["label"]) for r in rows]
    o = cfg.objective
    want, trl_metrics = trl_kto(
        policy[:, None].double(),
        policy_kl[:, None].double(),
        labels,
        ref.double(),
        ref_kl.double(),
        o.beta,
        o.kto_desirable_weight,
        o.kto_undesirable_weight,
    )
    got = tr._step(3)
    assert 0 < sum(labels) < len(labels)
    assert trl_metrics["kl"] > 1e-3  # the KL term is in play (not clamped to 0)
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert got["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-4, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert got[key] == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-5), key
    tr.cleanup()


@pytest.mark.integration
def test_kto_micro_batch_times_accumulation_gives_the_same_steps(tiny_config_dict, tmp_path):
    def run(name, **train):
        tr = trainer_for(config(tiny_config_dict, tmp_path, name, **train), tmp_path, name)
        logs = [tr._step(s) for s in (1, 2)]
        params = {n: p.detach().clone() for n, p in peft_model(tr.model).named_parameters() if p.requires_grad}
        tr.cleanup()
        return logs, params

    big, big_params = run("big", micro_batch_size=8, grad_accum=1)
    acc, acc_params = run("acc", micro_batch_size=2, grad_accum=4, pass_tokens=None)
    joined, _ = run("joined", micro_batch_size=1, grad_accum=8, pass_tokens=200)  # rows joined into passes
    assert big[1]["kl"] > 0  # the step's KL estimate is in play from step 2
    for other in (acc, joined):
        assert [m["loss"] for m in other] == pytest.approx([m["loss"] for m in big], rel=1e-5)
        assert [m["kl"] for m in other] == pytest.approx([m["kl"] for m in big], rel=1e-4, abs=1e-7)
        assert other[1]["rewards/margins"] == pytest.approx(big[1]["rewards/margins"], rel=1e-4, abs=1e-6)
    assert big[1]["rewards/margins"] > 0  # desirable completions gain on undesirable ones
    for name in big_params:
        torch.testing.assert_close(acc_params[name], big_params[name], rtol=1e-4, atol=1e-6)


def test_kl_pairs_rotate_over_the_whole_step_and_are_cut_to_fit():
    shapes = [(3, 7, 2), (5, 8, 4), (2, 9, 1)]  # prompt length, completion token, completion length
    rows = [{"prompt_ids": [1] * p, "completion_ids": [c] * n, "label": c % 2 == 0} for p, c, n in shapes]
    one, two = KtoBatches(0, padding_free=False, max_seq_len=8).collate_step([rows[:2], rows[2:]])
    assert one["kl_input_ids"][0, :4].tolist() == [1, 1, 1, 9]  # row 0: its prompt, the step's last completion
    assert one["kl_input_ids"][1].tolist() == [1, 1, 1, 1, 1, 7, 7]  # row 1: row 0's completion
    assert two["kl_input_ids"][0].tolist() == [1, 1, 8, 8, 8, 8]  # row 2: row 1's, in another micro-batch
    assert one["kl_labels"][1].tolist() == [-100] * 5 + [7, 7]
    assert one["desirable"].tolist() == [False, True] and int(one["num_rows"]) == 2
    cut = KtoBatches(0, padding_free=False, max_seq_len=6)([rows[1], rows[0]])
    assert cut["kl_input_ids"][0].tolist() == [1] * 5 + [7]  # 5 prompt tokens leave room for one
    assert pairwise_auc(torch.tensor([1.0, 0.0]), torch.tensor([0.0, -1.0])) == 0.875  # 3 right, 1 tie in 4


def test_kto_config_errors(tiny_config_dict, tmp_path):
    with pytest.raises(
        ConfigError, match=r"estimates its KL term .* train.micro_batch_size=1 x train.grad_accum=1 gives one row"
    ):
        trainer_for(config(tiny_config_dict, tmp_path, "one", micro_batch_size=1), tmp_path, "one")
    full = config(tiny_config_dict, tmp_path, "full")
    full.adapter.type = "full"
    with pytest.raises(ConfigError, match=r"objective.type=kto compares with a reference model"):
        trainer_for(full, tmp_path, "full")
    dpo = config(tiny_config_dict, tmp_path, "dpo", objective={"type": "dpo"})
    with pytest.raises(
        ConfigError,
        match=r"objective.type=dpo trains on preference data, but the prepared data is kto data: use "
        r"objective.type=kto for rows labelled desirable or undesirable",
    ):
        trainer_for(dpo, tmp_path, "dpo")
    with pytest.raises(ValueError, match="objective.kto_desirable_weight applies to objective.type kto, not dpo"):
        config(tiny_config_dict, tmp_path, objective={"type": "dpo", "kto_desirable_weight": 2.0})


@pytest.mark.integration
def test_a_kto_run_from_a_config_reports_its_held_out_metrics(tiny_config_dict, tmp_path, capsys):
    cfg = config(tiny_config_dict, tmp_path, max_steps=8, micro_batch_size=8)
    d = cfg.model_dump(mode="json")
    d["data"]["eval_fraction"] = 0.25
    d["eval"] = {**d["eval"], "at_start": True, "every_steps": 4, "generate_rows": 0, "show_samples": 0}
    path = tmp_path / "kto.yaml"
    path.write_text(json.dumps(d))
    assert main(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["eval_kl"] == 0.0 and before["eval_reward_auc"] == 0.5 and before["eval_rows"] == 8
    desirable = (16 * before["eval_loss"] - 8) / 2  # w/2 per row: (3 d + (8 - d)) / 16 over 8 rows
    assert desirable == pytest.approx(round(desirable), abs=1e-5) and 0 < round(desirable) < 8
    assert after["eval_loss"] < before["eval_loss"] and after["eval_reward_auc"] > 0.5
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["type"] == "train"]
    assert len(train) == 8 and {"kl", "rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(train[-1])
    out = capsys.readouterr().out
    assert "eval_reward_auc" in out and "eval_rows " not in out  # a count, not a score, in the table
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.integration
def test_kto_trains_on_the_shared_kto_demo_file(tiny_config_dict, tmp_path):
    d = config(tiny_config_dict, tmp_path, max_steps=2, micro_batch_size=4).model_dump(mode="json")
    d["data"]["train"] = [{"path": str(shared_path("chat/kto_en_demo.json"))}]
    d["data"]["max_seq_len"] = 96
    path = tmp_path / "kto.yaml"
    path.write_text(json.dumps(d))
    assert main(["train", str(path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and train[1]["kl"] >= 0.0


@pytest.mark.integration
def test_kto_padding_free_equals_padded(tiny_config_dict, tmp_path):
    def losses(name, flat):
        tr = trainer_for(
            config(tiny_config_dict, tmp_path, name, micro_batch_size=4, padding_free=flat), tmp_path, name
        )
        out = [tr._step(s) for s in (1, 2)]
        tr.cleanup()
        return [m["loss"] for m in out], [m["kl"] for m in out]

    flat, padded = losses("flat", True), losses("padded", False)
    assert flat[1][1] > 0  # the KL term is in play at step 2
    assert flat[0] == pytest.approx(padded[0], rel=1e-5) and flat[1] == pytest.approx(padded[1], rel=1e-4, abs=1e-7)
