"""On a tiny Llama: sequence_logps + dpo_loss / ipo_loss / orpo_loss / kto_loss equal TRL 1.16's trainers' own
loss code on the same model and rows (DPOTrainer / KTOTrainer._compute_loss through TRL's fused LM head, which
accumulates in fp32, hence 1e-6; ORPOTrainer.get_batch_loss_metrics, whose odds ratio is fp32), loss and every
parameter's gradient; and a fresh LoRA adapter's DPO loss against the adapter-off reference is exactly ln 2."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tests.train.objectives.trl_stand_ins import trl_dpo, trl_kto, trl_orpo
from tuneforge.data.collate import FlatCollator, PaddedCollator
from tuneforge.model.lm_loss import sequence_logps
from tuneforge.train.objectives.kto import kto_loss, mismatched_completion_index
from tuneforge.train.objectives.preference import dpo_loss, ipo_loss, orpo_loss

with __import__("warnings").catch_warnings():
    __import__("warnings").simplefilter("ignore")
    from trl.trainer.utils import add_fused_lm_head


def tiny_llama(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).double()


def pairs(n_pairs=4, seed=3):
    """Rows [chosen..., rejected...], each pair sharing its prompt."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    for _ in range(n_pairs):
        prompt = torch.randint(3, 60, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        for side in (chosen, rejected):
            completion = torch.randint(3, 60, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
            side.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return chosen + rejected


def trl_inputs(rows):
    """DPOTrainer's batch: right-padded input_ids, attention_mask, completion_mask."""
    padded = PaddedCollator(0)(rows)
    return padded["input_ids"], padded["attention_mask"], (padded["labels"] != -100).long()


def fused_logps(model, ids, attention, completion):
    labels = ids.masked_fill(completion == 0, -100)
    return model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True).log_probs


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 1.0), ("ipo", 0.1), ("ipo", 0.5)])
def test_dpo_and_ipo_equal_trl_on_the_same_model(loss_type, beta):
    policy, reference = tiny_llama(0), tiny_llama(1)
    rows = pairs()
    n = len(rows) // 2
    ids, attention, completion = trl_inputs(rows)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    with torch.no_grad():
        trl_ref = fused_logps(reference, ids, attention, completion).sum(1)
        ref, _ = sequence_logps(reference, FlatCollator(0)(rows))
    torch.testing.assert_close(ref, trl_ref, rtol=1e-6, atol=1e-6, check_dtype=False)

    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    policy.zero_grad()
    trl_loss, _ = trl_dpo(None, completion, trl_ref[:n], trl_ref[n:], loss_type, beta, model=policy, inputs=inputs)
    trl_loss.backward()
    trl_grads = {k: p.grad.clone() for k, p in policy.named_parameters()}

    policy.zero_grad()
    logps, tokens = sequence_logps(policy, FlatCollator(0)(rows))
    if loss_type == "sigmoid":
        losses, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta)
    else:
        losses, _ = ipo_loss(logps[:n], logps[n:], ref[:n], ref[n:], tokens[:n], tokens[n:], beta)
    losses.mean().backward()
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-6, atol=1e-6, check_dtype=False)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], rtol=1e-5, atol=1e-6, check_dtype=False)


def test_fresh_lora_adapter_dpo_loss_is_ln2_against_the_adapter_off_reference():
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    batch = FlatCollator(0)(pairs())
    with torch.no_grad(), model.disable_adapter():
        ref, _ = sequence_logps(model, batch)
    logps, _ = sequence_logps(model, batch)
    n = len(logps) // 2
    losses, metrics = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1)
    assert losses.tolist() == [math.log(2)] * n
    assert metrics["rewards/margins"].tolist() == [0.0] * n
    losses.mean().backward()  # the adapter still gets a gradient at policy == reference
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in model.named_parameters() if "lora_B" in n_)


@pytest.mark.parametrize("orpo_lambda", [0.1, 1.0])
def test_orpo_equals_trl_on_the_same_model(orpo_lambda):
    """TRL's ORPO runs the model itself (full logits); its NLL covers the chosen prompt too, so ours is given the
    NLL of the whole chosen sequence (labels on every token) from a second sequence_logps."""
    policy = tiny_llama(0)
    rows = pairs()
    n = len(rows) // 2
    batch = {}
    for side, part in (("chosen", rows[:n]), ("rejected", rows[n:])):
        padded = PaddedCollator(0)(part)
        batch.update({f"{side}_{k}": padded[k] for k in ("input_ids", "attention_mask", "labels")})
    policy.zero_grad()
    trl_loss, _ = trl_orpo(None, batch, orpo_lambda, model=policy)
    trl_loss.backward()
    trl_grads = {k: p.grad.clone() for k, p in policy.named_parameters()}

    policy.zero_grad()
    logps, tokens = sequence_logps(policy, FlatCollator(0)(rows), chunked=True)
    whole = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows[:n]]
    nll_logps, nll_tokens = sequence_logps(policy, FlatCollator(0)(whole), chunked=True)
    losses, _ = orpo_loss(
        logps[:n], logps[n:], tokens[:n], tokens[n:], orpo_lambda, -nll_logps, nll_tokens.double().mean()
    )
    losses.mean().backward()
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-6, atol=1e-6, check_dtype=False)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], rtol=1e-5, atol=1e-6, check_dtype=False)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_kto_equals_trl_on_the_same_model(beta):
    policy, reference = tiny_llama(0), tiny_llama(1)
    rows = pairs(n_pairs=3)  # 6 rows, used unpaired
    labels = [True, False, True, True, False, False]
    index = mismatched_completion_index(len(rows))
    kl_rows = []
    for i, r in enumerate(rows):  # row i's prompt with row index[i]'s completion
        prompt = [t for t, lab in zip(r["input_ids"], r["labels"]) if lab == -100]
        other = rows[index[i]]
        completion = [lab for lab in other["labels"] if lab != -100]
        kl_rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    ids, attention, completion = trl_inputs(rows)
    kl_ids, kl_attention, kl_completion = trl_inputs(kl_rows)
    with torch.no_grad():
        ref, _ = sequence_logps(reference, FlatCollator(0)(rows))
        ref_kl, _ = sequence_logps(reference, FlatCollator(0)(kl_rows))
    ref_kl = ref_kl - 1.0  # a positive KL estimate (these two random models' is negative: clamped to 0)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    inputs = {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
    }
    policy.zero_grad()
    trl_loss, trl_metrics = trl_kto(None, None, labels, ref, ref_kl, beta, 1.0, 1.5, model=policy, inputs=inputs)
    trl_loss.backward()
    trl_grads = {k: p.grad.clone() for k, p in policy.named_parameters()}

    policy.zero_grad()
    logps, _ = sequence_logps(policy, FlatCollator(0)(rows))
    with torch.no_grad():
        kl_logps, _ = sequence_logps(policy, FlatCollator(0)(kl_rows))
    losses, metrics = kto_loss(
        logps, ref, torch.tensor(labels), beta, 1.0, 1.5, policy_kl_logps=kl_logps, reference_kl_logps=ref_kl
    )
    losses.mean().backward()
    assert trl_metrics["kl"] > 0.1 and float(metrics["kl"]) == pytest.approx(trl_metrics["kl"], rel=1e-6)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-6, atol=1e-6, check_dtype=False)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], rtol=1e-5, atol=1e-6, check_dtype=False)
