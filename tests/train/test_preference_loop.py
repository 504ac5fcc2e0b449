"""Preference objectives on the one loop: the loss the loop backpropagates equals the objective's formula on
log-probs computed the plain way (full logits, reference = adapter off), micro-batch x accumulation gives the
same steps (normalised by pairs), and the run's before/after evaluation reports reward accuracy."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from tuneforge.cli import main
from tuneforge.config.load import ConfigError
from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import rows_at
from tuneforge.data.prepare import prepare
from tuneforge.train.loop import Trainer
from tuneforge.train.objective_step import PairObjective, peft_model

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


def pairs_file(tmp_path, n=32, words_per_row=(4, 4)):
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        low, high = words_per_row
        words = rng.sample(WORDS, low if low == high else rng.randint(low, high))
        rows.append(
            {
                "prompt": "Sort these words: " + " ".join(words),
                "chosen": " ".join(sorted(words)),
                "rejected": " ".join(rng.sample(words, len(words))) + " " + rng.choice(WORDS),
            }
        )
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tiny_config_dict, tmp_path, name="run", objective=None, words_per_row=(4, 4), **train):
    d = {**tiny_config_dict}
    pairs = pairs_file(tmp_path, words_per_row=words_per_row)
    d["data"] = {"train": [{"path": str(pairs)}], "eval_fraction": 0.0, "max_seq_len": 64}
    d["adapter"] = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    d["objective"] = objective or {"type": "dpo", "beta": 0.5}
    d["train"] = {**d["train"], "lr": 5e-3, **train}
    d["output"] = {"dir": str(tmp_path / name)}
    return RunConfig.model_validate(d)


def trainer_for(cfg, tmp_path, name="run"):
    data = prepare(cfg, tmp_path / name, log=lambda s: None)
    return Trainer(cfg, tmp_path / name, data, log=lambda s: None).setup()


def plain_logps(model, seqs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Sum of log p(completion | prompt), one sequence at a time, from the full logits."""
    out = []
    for prompt, completion in seqs:
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits.float()
        logp = F.log_softmax(logits[0, len(prompt) - 1 : -1], -1)
        out.append(logp.gather(1, torch.tensor(completion)[:, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize(
    "objective",
    [
        {"type": "dpo", "beta": 0.5, "label_smoothing": 0.1},
        {"type": "ipo", "beta": 0.5},
        {"type": "simpo"},
        {"type": "orpo"},
    ],
    ids=lambda o: o["type"],
)
def test_the_loop_loss_equals_the_objective_on_plainly_computed_logps(objective, tiny_config_dict, tmp_path):
    cfg = config(tiny_config_dict, tmp_path, objective=objective, micro_batch_size=4)
    tr = trainer_for(cfg, tmp_path)
    for step in (1, 2):  # move the adapter away from the reference first
        tr._step(step)
    model = peft_model(tr.model)
    model.eval()
    rows = [tr.data.train[i] for i in range(4)]
    assert tr.collate.share_prompt  # the loop's batches compute each prompt once (tests/train/test_shared_prompt.py)
    batch = tr.collate(rows)
    assert batch["input_ids"].shape[1] == sum(
        len(r["prompt_ids"]) + 1 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )
    batch.pop("num_tokens"), batch.pop("num_attended")
    with torch.no_grad():
        got, metrics = PairObjective(cfg).pair_losses(model, batch)
        seqs = [(list(r["prompt_ids"]), list(r[k])) for r in rows for k in ("chosen_ids", "rejected_ids")]
        pol = plain_logps(model, seqs)
        with model.disable_adapter():
            ref = plain_logps(model, seqs)
    n = torch.tensor([float(len(c)) for _, c in seqs])
    pc, pr, rc, rr, nc, nr = pol[0::2], pol[1::2], ref[0::2], ref[1::2], n[0::2], n[1::2]
    o = cfg.objective
    beta = o.beta_value
    if o.type == "dpo":
        h = beta * ((pc - rc) - (pr - rr))
        want = -(1 - o.label_smoothing) * F.logsigmoid(h) - o.label_smoothing * F.logsigmoid(-h)
    elif o.type == "ipo":
        want = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    elif o.type == "simpo":
        want = -F.logsigmoid(beta * (pc / nc - pr / nr) - o.simpo_gamma)
    else:  # orpo: chosen NLL per token (mean over the batch's pairs) - lambda log sigma(log odds)
        a, b = pc / nc, pr / nr
        log_odds = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
        want = -pc / nc.mean() - o.orpo_lambda * F.logsigmoid(log_odds)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert float(got.mean()) != pytest.approx(math.log(2), abs=1e-3) or o.type != "dpo"  # it did move
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
    tr.cleanup()


def test_dpo_micro_batch_times_accumulation_gives_the_same_steps(tiny_config_dict, tmp_path):
    def run(name, **train):
        tr = trainer_for(config(tiny_config_dict, tmp_path, name, **train), tmp_path, name)
        logs = [tr._step(s) for s in (1, 2, 3)]
        params = {n: p.detach().clone() for n, p in peft_model(tr.model).named_parameters() if p.requires_grad}
        tr.cleanup()
        return logs, params

    big, big_params = run("big", micro_batch_size=8, grad_accum=1)
    acc, acc_params = run("acc", micro_batch_size=2, grad_accum=4, pass_tokens=None)
    joined, _ = run("joined", micro_batch_size=1, grad_accum=8, pass_tokens=200)  # pairs joined into passes
    assert [m["loss"] for m in joined] == pytest.approx([m["loss"] for m in big], rel=1e-5)
    assert big[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a LoRA policy starts equal to its reference
    assert [m["loss"] for m in big] == pytest.approx([m["loss"] for m in acc], rel=1e-5)
    assert big[2]["loss"] < big[0]["loss"]
    assert big[2]["rewards/accuracies"] == pytest.approx(acc[2]["rewards/accuracies"])
    for name in big_params:
        torch.testing.assert_close(acc_params[name], big_params[name], rtol=1e-4, atol=1e-6)


def test_orpo_nll_is_normalised_over_the_step_so_accumulation_gives_the_same_steps(tiny_config_dict, tmp_path):
    """ORPO's NLL term is divided by the chosen tokens per pair of the whole step, not of each micro-batch (the
    chosen completions here have 2 to 6 words, so micro-batches' token means differ)."""
    orpo = {"type": "orpo", "orpo_lambda": 0.2}

    def run(name, **train):
        cfg = config(tiny_config_dict, tmp_path, name, objective=orpo, words_per_row=(2, 6), **train)
        tr = trainer_for(cfg, tmp_path, name)
        logs = [tr._step(s) for s in (1, 2)]
        tr.cleanup()
        return [m["loss"] for m in logs], [m["nll_loss"] for m in logs]

    big = run("big", micro_batch_size=8, grad_accum=1)
    acc = run("acc", micro_batch_size=2, grad_accum=4, pass_tokens=None)
    assert acc == (pytest.approx(big[0], rel=1e-5), pytest.approx(big[1], rel=1e-5))


def test_objective_and_data_must_match_and_unsupported_setups_are_refused(tiny_config_dict, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"objective.type=dpo trains on preference data, but the prepared data is "
        r"sft data",
    ):
        Trainer(
            RunConfig.model_validate({**tiny_config_dict, "objective": {"type": "dpo"}, "adapter": {"type": "lora"}}),
            tmp_path / "a",
            prepare(RunConfig.model_validate(tiny_config_dict), tmp_path / "a", log=lambda s: None),
            log=lambda s: None,
        ).setup()
    qlora = config(tiny_config_dict, tmp_path, "qlora")
    qlora.adapter.type = "qlora"
    with pytest.raises(
        ConfigError,
        match=r"objective.type=dpo compares with a reference model; .* adapter.type=qlora has neither yet. Use "
        r"adapter.type=lora, or a reference-free objective \(simpo, orpo\)",
    ):
        trainer_for(qlora, tmp_path, "qlora")
    sharded = config(tiny_config_dict, tmp_path, "sharded")
    sharded.adapter.type, sharded.dist.strategy = "full", "fsdp2"
    with pytest.raises(ConfigError, match=r"caches the reference's log-probs .* dist.strategy=fsdp2 does not hold"):
        trainer_for(sharded, tmp_path, "sharded")
    with pytest.raises(ValueError, match="objective.orpo_lambda applies to objective.type orpo, not dpo"):
        config(tiny_config_dict, tmp_path, objective={"type": "dpo", "orpo_lambda": 0.3})


@pytest.mark.integration
def test_a_dpo_run_reports_reward_accuracy_before_and_after(tiny_config_dict, tmp_path, capsys):
    cfg = config(tiny_config_dict, tmp_path, max_steps=8, micro_batch_size=8)
    d = cfg.model_dump(mode="json")
    d["data"]["eval_fraction"] = 0.25
    d["eval"] = {**d["eval"], "at_start": True, "every_steps": 4, "generate_rows": 0, "show_samples": 0}
    path = tmp_path / "dpo.yaml"
    path.write_text(json.dumps(d))
    assert main(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["after"]["eval_reward_accuracy"] > 0.5 and summary["after"]["eval_pairs"] == 8
    out = capsys.readouterr().out
    assert "eval_reward_accuracy" in out and "eval_pairs " not in out  # a count, not a score, in the table
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------- full fine-tuning: cached reference
def full_config(tiny_config_dict, tmp_path, name="run", objective=None, **train):
    cfg = config(tiny_config_dict, tmp_path, name, objective=objective, lr=1e-4, **train)
    cfg.adapter.type = "full"
    return cfg


def test_full_fine_tuning_uses_the_starting_models_cached_log_probs(tiny_config_dict, tmp_path):
    """dpo here; ipo reads the same cached columns (PairObjective.pair_losses)."""
    objective = {"type": "dpo", "beta": 0.5}
    logs = []
    cfg = full_config(tiny_config_dict, tmp_path, objective=objective, micro_batch_size=4)
    data = prepare(cfg, tmp_path / "run", log=lambda s: None)
    tr = Trainer(cfg, tmp_path / "run", data, log=logs.append).setup()
    start = copy.deepcopy(tr.model)  # the reference: the model before any update
    assert any(line.startswith("reference log-probs (full fine-tuning): computed for 32 pairs") for line in logs)
    assert {"ref_chosen_logp", "ref_rejected_logp"} <= set(tr.data.train.column_names)
    first = tr._step(1)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    tr._step(2)
    accum = cfg.train.grad_accum
    rows = [r for i in range(accum) for r in rows_at(tr.data.train, tr.order.micro_batch(2 * accum + i))]
    seqs = [(list(r["prompt_ids"]), list(r[k])) for r in rows for k in ("chosen_ids", "rejected_ids")]
    with torch.no_grad():
        pol, ref = plain_logps(tr.model.eval(), seqs), plain_logps(start.eval(), seqs)
    tr.model.train()
    pc, pr, rc, rr = pol[0::2], pol[1::2], ref[0::2], ref[1::2]
    want = -F.logsigmoid(0.5 * ((pc - rc) - (pr - rr)))
    assert tr._step(3)["loss"] == pytest.approx(float(want.mean()), rel=1e-5)
    tr.cleanup()


@pytest.mark.integration
def test_a_resumed_full_dpo_run_reads_its_cached_reference_and_equals_the_uninterrupted_one(
    tiny_config_dict, tmp_path, monkeypatch
):
    from tuneforge.train import reference_cache

    calls = []
    compute = reference_cache.pair_reference_logps
    monkeypatch.setattr(reference_cache, "pair_reference_logps", lambda *a, **k: calls.append(1) or compute(*a, **k))

    def run(resume=None):
        logs = []
        cfg = full_config(tiny_config_dict, tmp_path, max_steps=4, micro_batch_size=4)
        cfg.checkpoint.every_steps = 2
        data = prepare(cfg, tmp_path / "run", log=lambda s: None)
        tr = Trainer(cfg, tmp_path / "run", data, log=logs.append).setup()
        tr.train(resume)
        tr.cleanup()
        lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        weights = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        return logs, [(r["step"], r["loss"]) for r in lines if r["type"] == "train"], weights

    logs, straight, w_straight = run()
    assert len(calls) == 1 and any("computed for 32 pairs" in line for line in logs)  # train only: no eval rows
    logs, resumed, w_resumed = run(resume=tmp_path / "run" / "checkpoints" / "step-000002")
    assert len(calls) == 1 and any(
        line.startswith("reference log-probs (full fine-tuning): read from") for line in logs
    )
    assert resumed[-2:] == straight[2:4]  # exactly: steps 3-4 from the step-2 checkpoint
    for name in w_straight:
        assert torch.equal(w_straight[name], w_resumed[name]), name


@pytest.mark.integration
def test_a_full_fine_tuning_dpo_run_from_a_config(tiny_config_dict, tmp_path, capsys):
    d = full_config(tiny_config_dict, tmp_path, max_steps=4, micro_batch_size=8).model_dump(mode="json")
    d["train"]["lr"] = 1e-3
    d["data"]["eval_fraction"] = 0.25
    d["eval"] = {**d["eval"], "at_start": True, "every_steps": 4, "generate_rows": 0, "show_samples": 0}
    path = tmp_path / "dpo.yaml"
    path.write_text(json.dumps(d))
    assert main(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # held-out rows cached too
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert "computed for 32 pairs" in capsys.readouterr().out  # 24 train + 8 held out
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
