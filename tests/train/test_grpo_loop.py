"""GRPO on the one loop: with one update per rollout batch the gradient equals the group-baseline policy-gradient
formula computed the plain way (fp64, one sequence at a time), for each loss normalisation; groups whose rewards
are all equal give no gradient; reward errors name the function and the row; the same seed samples the same
rollouts, and a run resumed from its step-2 checkpoint equals the uninterrupted one; a run from a config."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from tuneforge.cli import main
from tuneforge.config.load import ConfigError
from tuneforge.config.objective import ObjectiveConfig
from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import FlatCollator, rows_at
from tuneforge.data.prepare import prepare
from tuneforge.train.grpo_step import prompt_and_reference
from tuneforge.train.loop import Trainer
from tuneforge.train.objective_step import collate_step
from tuneforge.train.reference import peft_model
from tuneforge.train.rewards import Reward, RewardError, last_number, numeric, score

G = 4


def text_length_mod_3(prompts, completions, rows):
    """A reward that varies within groups of a random-init model's completions."""
    return [float(len(c) % 3) for c in completions]


def constant(prompts, completions, rows):
    return [1.0] * len(completions)


def config(tiny_config_dict, tmp_path, name="run", rewards=None, **grpo):
    d = {**tiny_config_dict}
    d["data"] = {"train": [{"synthetic": {"task": "add", "rows": 40, "seed": 0}}], "eval_fraction": 0.2}
    d["data"]["max_seq_len"] = 64
    d["adapter"] = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    rewards = rewards or [{"function": f"{__name__}:text_length_mod_3"}, {"type": "numeric", "weight": 0.5}]
    d["objective"] = {"type": "grpo", "grpo": {"generations": G, "max_new_tokens": 6, "rewards": rewards, **grpo}}
    d["train"] = {**d["train"], "lr": 1e-2, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 4}
    d["output"] = {"dir": str(tmp_path / name)}
    return RunConfig.model_validate(d)


def trainer_for(cfg, tmp_path, name="run"):
    data = prepare(cfg, tmp_path / name, log=lambda s: None)
    return Trainer(cfg, tmp_path / name, data, log=lambda s: None).setup()


def rollout(tr, step):
    """The step's micro-batches after the objective's begin_step (rollouts, rewards, advantages)."""
    accum = tr.cfg.train.grad_accum
    micro = [rows_at(tr.data.train, tr.order.micro_batch((step - 1) * accum + i)) for i in range(accum)]
    batches = collate_step(tr.collate, micro)
    for b in batches:
        b.pop("num_tokens"), b.pop("num_attended")
    tr.objective.begin_step(tr.model, batches, step=step)
    return batches


def sequences(batch):
    """(prompt ids, completion ids) of each completion of a padding-free batch: a sequence of its own, or a branch
    off a shared prompt (the prompt's last token again, positions going on from the prompt's, then the completion)."""
    ids, labels, pos = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    starts = [i for i in range(len(pos)) if i == 0 or pos[i] != pos[i - 1] + 1] + [len(pos)]
    out, prompt = [], None
    for a, b in zip(starts, starts[1:]):
        if pos[a] == 0:
            n_prompt = next(i for i in range(a + 1, b) if labels[i] != -100) - a
            prompt = ids[a : a + n_prompt]
            out.append((prompt, ids[a + n_prompt : b]))
        else:
            assert (ids[a], labels[a], pos[a]) == (prompt[-1], -100, len(prompt) - 1)
            out.append((prompt, ids[a + 1 : b]))
    return out


def assert_gradients_equal(got: dict, want: dict, shared_prompts: bool) -> None:
    """To fp64 rounding; with shared prompts (the loop's layout) to fp32's relative to the largest gradient: Llama's
    RMSNorm runs its backward in fp32 even in an fp64 model, once on a prompt's summed gradient where the separate
    sequences run it on each copy (as tests/train/test_shared_prompt.py)."""
    scale = max(float(g.abs().max()) for g in want.values())
    rtol, atol = (1e-6, 1e-6 * scale) if shared_prompts else (1e-9, 1e-12)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol, msg=name)


def loop_gradient(tr, batches):
    model = tr.model
    model.zero_grad()
    units = sum(tr.objective.units(b) for b in batches)
    loss = sum(tr.objective.loss_sum(model, b)[0] for b in batches) / units
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return float(loss.detach()), grads


def plain_gradient(tr, seqs, rewards, how, max_new=6):
    """The GRPO formula, one sequence at a time with full logits: A_i = (r_i - mean_g) / (std_g + 1e-4); the
    gradient of sum_i -A_i sum_t log p_it / norm_i with norm_i = S |o_i| (sequence), T (token) or S max_new
    (constant); the loss's value sum_i -A_i |o_i| / norm_i (the ratio is 1 at every token)."""
    S, T = len(seqs), sum(len(c) for _, c in seqs)
    tr.model.zero_grad()
    total = 0.0
    for i, (p, c) in enumerate(seqs):
        group = rewards[i // G * G : i // G * G + G]
        adv = (rewards[i] - statistics.fmean(group)) / (statistics.stdev(group) + 1e-4)
        norm = S * len(c) if how == "sequence" else T if how == "token" else S * max_new
        logits = tr.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].double()
        (-adv / norm * logits.log_softmax(-1).gather(1, torch.tensor(c)[:, None]).sum()).backward()
        total += -adv * len(c) / norm
    grads = {n: q.grad.clone() for n, q in tr.model.named_parameters() if q.requires_grad}
    tr.model.zero_grad()
    return total, grads


@pytest.mark.integration
def test_the_gradient_is_the_group_baseline_policy_gradient_for_each_normalisation(tiny_config_dict, tmp_path):
    tr = trainer_for(config(tiny_config_dict, tmp_path, skip_zero_advantage=False), tmp_path)  # every completion
    tr._step(1)  # move the adapter off zero so every LoRA parameter has a gradient
    tr.model.double()
    batches = rollout(tr, 2)
    seqs = [s for b in batches for s in sequences(b)]
    stops = tr.objective.stop_ids
    completions = [tr.data.tokenizer.decode(c[:-1] if c[-1] in stops else c, skip_special_tokens=True) for _, c in seqs]
    rewards = [float(len(t.strip()) % 3) for t in completions]  # numeric: 0 on random text
    assert len(seqs) == 4 * G and len(set(rewards)) > 1
    # a random-init model never stops early: cut the completions to different lengths (the advantages stay)
    seqs = [(p, c[: 1 + i % 6]) for i, (p, c) in enumerate(seqs)]
    prompts, outs = [p for p, _ in seqs[::G]], [c for _, c in seqs]
    collate = FlatCollator(tr.data.tokenizer.pad_token_id)
    tr.objective._step_tokens = float(sum(len(c) for _, c in seqs))
    # the loop's layout (each group's prompt once: tuneforge's per-sample attention) and one sequence per completion
    assert tr.objective.share_prompt
    for share in (True, False):
        tr.objective.share_prompt = share
        for k, b in enumerate(batches):
            flat = collate(tr.objective._sequences(prompts, outs, k * 2 * G, 2 * G))
            b.update({n: flat[n] for n in ("input_ids", "labels", "position_ids")})
        assert [s for b in batches for s in sequences(b)] == seqs
        tokens = sum(b["input_ids"].shape[1] for b in batches)
        saved = sum((G - 1) * (len(p) - 1) for p in prompts) if share else 0  # G-1 copies of all but the last token
        assert tokens == sum(len(p) + len(c) for p, c in seqs) - saved
        for how in ("sequence", "token", "constant"):
            tr.objective.g = tr.objective.g.model_copy(update={"loss_normalization": how})
            loss, got = loop_gradient(tr, batches)
            want_loss, want = plain_gradient(tr, seqs, rewards, how)
            assert loss == pytest.approx(want_loss, abs=1e-10), (share, how)
            assert max(float(g.abs().max()) for g in want.values()) > 1e-6
            assert_gradients_equal(got, want, share)
    tr.cleanup()


@pytest.mark.integration
def test_a_later_update_on_the_rollout_batch_clips_the_ratio_to_the_sampling_policy(tiny_config_dict, tmp_path):
    """updates_per_batch 2: the second update's loss and gradient are the clipped surrogate with logp_old = the
    first update's log-probs (the policy that sampled the batch), computed here one sequence at a time."""
    cfg = config(
        tiny_config_dict, tmp_path, updates_per_batch=2, epsilon_low=0.1, epsilon_high=0.1, loss_normalization="token"
    )
    tr = trainer_for(cfg, tmp_path)
    m = tr._step(1)
    assert tr.scheduler.scheduler.last_epoch == 2  # two optimizer updates in the step
    assert 0 <= m["clip_fraction"] <= 1 and 0 < m["entropy"] < math.log(tr.model.config.vocab_size) + 1e-6
    tr.model.double()
    batches = rollout(tr, 2)
    seqs = [s for b in batches for s in sequences(b)]
    adv = torch.cat([b["advantages"] for b in batches])
    T = tr.objective._step_tokens  # every completion's tokens: those of zero advantage are counted, not run
    assert T >= sum(len(c) for _, c in seqs)

    def plain_logps():
        return [
            tr.model(input_ids=torch.tensor([p + c]))
            .logits[0, len(p) - 1 : -1]
            .log_softmax(-1)
            .gather(1, torch.tensor(c)[:, None])[:, 0]
            for p, c in seqs
        ]

    with torch.no_grad():
        old = plain_logps()
    first, _ = loop_gradient(tr, batches)  # ratio 1: the loss is -sum A_i |o_i| / T
    assert first == pytest.approx(float(sum(-adv[i] * len(c) for i, (_, c) in enumerate(seqs)) / T), abs=1e-10)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy after an update
        for p in tr.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    sums = [tr.objective.loss_sum(tr.model, b)[1] for b in batches]
    got_loss, got = loop_gradient(tr, batches)
    want_loss, clipped = 0.0, 0
    for i, new in enumerate(plain_logps()):
        ratio = torch.exp(new - old[i])
        loss = -torch.min(ratio * adv[i], ratio.clamp(0.9, 1.1) * adv[i]).sum() / T
        loss.backward()
        want_loss += float(loss)
        clipped += int(((ratio < 0.9) & (adv[i] < 0) | (ratio > 1.1) & (adv[i] > 0)).sum())
    want = {n: q.grad.clone() for n, q in tr.model.named_parameters() if q.requires_grad}
    assert got_loss == pytest.approx(want_loss, abs=1e-10)
    assert 0 < clipped < T and sum(s["clipped_tokens"] for s in sums) == clipped
    assert_gradients_equal(got, want, tr.objective.share_prompt)
    tr.cleanup()


@pytest.mark.parametrize("skip", [True, False])
def test_groups_with_all_equal_rewards_give_no_gradient_and_are_counted(tiny_config_dict, tmp_path, skip):
    cfg = config(tiny_config_dict, tmp_path, rewards=[{"function": f"{__name__}:constant"}], skip_zero_advantage=skip)
    tr = trainer_for(cfg, tmp_path)
    m = tr._step(1)
    assert m["groups_all_equal"] == 1.0 and m["reward"] == 1.0 and m["reward_std"] == 0.0
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0
    if skip:  # nothing ran through the update
        assert m["trained_tokens"] == 0 and "entropy" not in m and "clip_fraction" not in m
    else:
        assert m["trained_tokens"] == pytest.approx(m["completion_len"] * 4 * G) and m["entropy"] > 0
    assert 1 <= m["completion_len_max"] <= 6 and m["rollout_s"] > 0 and m["update_s"] > 0
    tr.cleanup()


REWARD_CALLS = [0]


def equal_groups_by_step(prompts, completions, rows):
    """Rollout 1: only the first group's rewards vary (the step's first micro-batch runs with one of its two groups,
    the second runs no forward); rollout 2: every group's rewards are equal (no forward at all); then all vary."""
    REWARD_CALLS[0] += 1
    n = REWARD_CALLS[0]
    return [float(len(c) % 3) if n > 2 or (n == 1 and i < G) else 1.0 for i, c in enumerate(completions)]


@pytest.mark.integration
def test_leaving_out_zero_advantage_completions_gives_the_same_run(tiny_config_dict, tmp_path):
    """skip_zero_advantage (the default) against every completion through the update, fp64: the same losses,
    gradient norms and weights after a step with some groups left out, one with all of them (Adam's moments still
    move the weights) and one with one group left out."""
    runs = {}
    for skip in (True, False):
        REWARD_CALLS[0] = 0
        rewards = [{"function": f"{__name__}:equal_groups_by_step"}]
        cfg = config(tiny_config_dict, tmp_path, f"skip-{skip}", rewards=rewards, skip_zero_advantage=skip)
        tr = trainer_for(cfg, tmp_path, f"skip-{skip}")
        tr.model.double()
        steps, weights = [], []
        for s in (1, 2, 3):
            steps.append(tr._step(s))
            weights.append({n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad})
        runs[skip] = steps, weights
        tr.cleanup()
    (skipped, w_skipped), (full, w_full) = runs[True], runs[False]
    assert [m["groups_all_equal"] for m in skipped] == [0.75, 1.0, 0.25]  # step 3: one group's lengths agree
    assert skipped[1]["trained_tokens"] == 0 < skipped[0]["trained_tokens"] < full[0]["trained_tokens"]
    assert 0 < skipped[2]["trained_tokens"] < full[2]["trained_tokens"]
    for a, b in zip(skipped, full):
        assert a["reward"] == b["reward"] and a["completion_len"] == b["completion_len"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9, abs=1e-12)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-9, abs=1e-12)
    assert full[1]["grad_norm"] == 0.0 and full[0]["grad_norm"] > 0
    for step in range(3):
        for n, w in w_full[step].items():
            torch.testing.assert_close(w_skipped[step][n], w, rtol=1e-9, atol=1e-12, msg=f"step {step + 1}: {n}")
    # step 2 had no gradient, yet Adam's momentum from step 1 moved the weights (in both runs)
    assert any(not torch.equal(w_skipped[1][n], w_skipped[0][n]) for n in w_skipped[0])


def test_rewards_numeric_and_errors_name_the_function_and_the_row():
    assert last_number("So the total is $1,234.00 dollars.") == 1234.0 and last_number("no digits") is None
    rows = [{"prompt": "What is 2+3?", "reference": "5"}, {"prompt": "What is 2+3?", "reference": "5"}]
    assert numeric([], ["It is 5 apples.", "5 or 6"], rows) == [1.0, 0.0]

    def run(fn):
        with pytest.raises(RewardError) as e:
            score(Reward("mine", 1.0, fn), ["p", "p"], ["a", "b"], rows)
        return str(e.value)

    assert "reward mine raised ZeroDivisionError" in run(lambda p, c, r: [1 / 0])
    assert "returned 1 values for 2 completions" in run(lambda p, c, r: [1.0])
    msg = run(lambda p, c, r: [1.0, math.nan])
    assert "reward mine returned nan for completion 1" in msg and "'What is 2+3?'" in msg
    assert "returned 'x' (str) for completion 0" in run(lambda p, c, r: ["x", 1.0])


def test_grpo_config_errors(tiny_config_dict, tmp_path):
    with pytest.raises(ValueError, match="updates_per_batch\n  Input should be less than or equal to 16"):
        ObjectiveConfig.model_validate(
            {"type": "grpo", "grpo": {"rewards": [{"type": "numeric"}], "updates_per_batch": 17}}
        )
    with pytest.raises(ValueError, match="format reward needs pattern"):
        ObjectiveConfig.model_validate({"type": "grpo", "grpo": {"rewards": [{"type": "format"}]}})
    with pytest.raises(ValueError, match="needs objective.grpo"):
        ObjectiveConfig.model_validate({"type": "grpo"})
    cfg = config(tiny_config_dict, tmp_path, kl_coef=0.1)
    d = cfg.model_dump(mode="json")
    d["adapter"] = {"type": "full"}
    with pytest.raises(ConfigError, match="kl_coef=0.1 compares with a reference"):
        trainer_for(RunConfig.model_validate(d), tmp_path)


def test_prompt_and_reference_is_the_last_trained_span():
    assert prompt_and_reference([1, 2, 3, 4, 5, 6], [-100, -100, 3, -100, 5, 6]) == ([1, 2, 3, 4], [5, 6])


@pytest.mark.integration
def test_same_seed_same_rollouts_and_a_resumed_run_equals_the_uninterrupted_one(tiny_config_dict, tmp_path):
    cfg = config(tiny_config_dict, tmp_path, kl_coef=0.05, loss_normalization="token", updates_per_batch=2)
    d = cfg.model_dump(mode="json")
    d["checkpoint"] = {**d.get("checkpoint", {}), "every_steps": 2, "save_total_limit": 3}
    cfg = RunConfig.model_validate(d)
    first = trainer_for(cfg, tmp_path)
    a = [s for b in rollout(first, 3) for s in sequences(b)]
    b = [s for b in rollout(first, 3) for s in sequences(b)]
    assert a == b and a != [s for b in rollout(first, 4) for s in sequences(b)]
    first.train()
    want = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    want = {r["step"]: r for r in want if r["type"] == "train"}
    weights = {n: p.detach().clone() for n, p in peft_model(first.model).named_parameters() if p.requires_grad}
    first.cleanup()
    resumed = Trainer(cfg, tmp_path / "run", first.data, log=lambda s: None).setup()
    resumed.train(resume_from=tmp_path / "run" / "checkpoints" / "step-000002")
    got = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = [r for r in got if r["type"] == "train" and r["step"] in (3, 4)][-2:]
    assert [r["step"] for r in got] == [3, 4]
    for r in got:
        for key in (
            "loss",
            "grad_norm",
            "reward",
            "rewards/text_length_mod_3",
            "kl",
            "completion_len",
            "clip_fraction",
        ):
            assert r[key] == want[r["step"]][key], key
    assert want[4]["kl"] > 0
    for n, p in peft_model(resumed.model).named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), weights[n]), n
    resumed.cleanup()


@pytest.mark.integration
def test_a_grpo_run_from_a_config(tiny_config_dict, tmp_path, capsys):
    cfg = config(tiny_config_dict, tmp_path)
    d = cfg.model_dump(mode="json")
    d["train"]["max_steps"] = 2
    d["eval"] = {**d["eval"], "at_start": True, "every_steps": 2, "generate_rows": 0, "show_samples": 0}
    path = tmp_path / "grpo.yaml"
    path.write_text(json.dumps(d))
    assert main(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["eval_prompts"] == after["eval_prompts"] == 8
    assert before["eval_pass@1"] == 0.0 and "eval_rewards/text_length_mod_3" in after
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["type"] == "train"]
    assert len(train) == 2 and {"reward", "rewards/numeric", "groups_all_equal", "rollout_s"} <= set(train[-1])
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def digit_share(prompts, completions, rows):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@pytest.mark.integration
def test_a_tiny_model_raises_its_held_out_reward(tiny_config_dict, tmp_path):
    """A verifiable task a random-init model can learn in a few steps: write digits (reward: their share)."""
    cfg = config(tiny_config_dict, tmp_path, rewards=[{"function": f"{__name__}:digit_share"}], eval_prompts=8)
    d = cfg.model_dump(mode="json")
    d["adapter"] = {"type": "full"}
    d["train"].update(lr=3e-3, max_steps=20, micro_batch_size=4, grad_accum=1)
    tr = trainer_for(RunConfig.model_validate(d), tmp_path)
    before = tr.objective.evaluate(tr.model, tr.data.eval, 8, 0)
    rewards = [tr._step(s)["reward"] for s in range(1, 21)]
    after = tr.objective.evaluate(tr.model, tr.data.eval, 8, 0)
    assert before["eval_prompts"] == after["eval_prompts"] == 8
    assert before["eval_reward"] < 0.2 and after["eval_reward"] > before["eval_reward"] + 0.5, (before, after)
    assert len(rewards) == 20 and all(0.0 <= r <= 1.0 for r in rewards)  # sampled at temperature 1: noisy
    tr.cleanup()
