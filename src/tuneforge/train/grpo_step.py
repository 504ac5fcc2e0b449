"""How the loop runs GRPO (objective.type: grpo): reinforcement learning with verifiable rewards, the rollouts
sampled by tuneforge's own engine (infer/engine.py) on the live policy weights (no copy, no weight sync).

Data: instruction rows prepared as for SFT; a row's prompt is its tokens before its last trained span (the chat
template's rendering up to the assistant turn), its reference answer the text of that span (`output`, e.g. the
synthetic `add` task's sum, or GSM8K's answer whose last number is the reference for the `numeric` reward).

Per optimizer step (the step's prompts are its rows: train.micro_batch_size x train.grad_accum per process):

  begin_step    rollouts: the model in eval mode, each prompt sampled G times (objective.grpo.generations) by the
                engine, every completion on its own random stream seeded by train.seed, the step, the prompt and
                its index in the group (`rollout_seed`: a resumed run, or the same rows on 2 processes, samples
                the same completions);
                back in train mode. The rewards (train/rewards.py) score every completion; advantages
                A_i = r_i - mean of its group (divided by the group's std + 1e-4 with scale_rewards, as TRL). Each
                micro-batch becomes the padding-free sequences prompt + completion (only the completion trained),
                with its advantages (and, with kl_coef > 0, the reference's per-token log-probs: adapter off).
                With kl_coef 0 (and skip_zero_advantage, the default), completions whose advantage is 0 (all of a
                group whose rewards are all equal) are left out: their loss is 0 at any ratio, so the update is
                the same without them; a micro-batch left with none runs no forward (`_kept`)
  loss_sum      per completion token t of completion i: l_it = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high)
                A_i) + kl_coef k3_it, rho = exp(logp - logp_old) with logp_old the rollout policy's log-prob (one
                update per rollout batch: logp_old = logp detached, rho = 1, so the gradient is -A_i grad logp),
                k3 = exp(ref - logp) - (ref - logp) - 1. With updates_per_batch U > 1 the loop makes U optimizer
                updates on the same rollout batch: the first has rho = 1 and keeps its log-probs (detached) as
                logp_old of the later ones (the policy that sampled the rollouts, as TRL's num_iterations; with LoRA
                dropout on, the first update's dropout mask is part of logp_old). The step's loss, over its S
                completions and T completion tokens (every micro-batch and process):
                  sequence (GRPO)    1/S sum_i 1/|o_i| sum_t l_it
                  token (DAPO)       1/T sum_i sum_t l_it
                  constant (Dr GRPO) 1/(S max_new_tokens) sum_i sum_t l_it
                The loop divides by its units (the step's completions, S), so loss_sum returns the numerators
                scaled accordingly.
  step_metrics  reward and reward_std (total), rewards/<name> and rewards/<name>_std per reward,
                groups_all_equal (share of groups whose rewards are all equal: zero advantage, no gradient),
                completion_len (mean) and completion_len_max, kl (mean per-completion token KL; with kl_coef 0,
                0), clip_fraction (share of completion tokens whose ratio was clipped where that zeroes their
                gradient: rho < 1 - eps_low with A < 0, rho > 1 + eps_high with A > 0; 0 with one update),
                entropy (mean per completion token, nats), rollout_s and update_s, trained_tokens (the
                completions'). loss, kl, clip_fraction and entropy are means over the step's U updates; entropy,
                clip_fraction and trained_tokens are over the completions that ran through the update (a step
                whose every advantage is 0 logs no entropy or clip_fraction and 0 trained_tokens)

Held-out (`evaluate`): up to objective.grpo.eval_prompts held-out prompts, one greedy completion each:
eval_reward (mean total reward), eval_rewards/<name>, eval_pass@1 (share whose completion scores at least 1 on
every exact_match / numeric reward; absent without one), eval_completion_len, eval_prompts.

The log-probs (policy and reference) come from the LM head at completion positions only, in row chunks with
train.logits: chunked (the default): no (completion tokens x vocab) logits. Not yet: a full fine-tune with kl_coef > 0
(no reference copy)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable

import torch

from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import FlatCollator
from tuneforge.data.templates import IGNORE_INDEX
from tuneforge.eval.generation import context_length
from tuneforge.infer.engine import Engine, SamplingParams
from tuneforge.model.lm_loss import token_logps
from tuneforge.train.reference import peft_model
from tuneforge.train.rewards import build_rewards, score


def rollout_seed(seed: int, step: int, prompt: list[int], j: int) -> int:
    """The random stream of completion j of `prompt` at `step`: a hash of the four, so a completion is the same
    whichever process, micro-batch or engine batch samples it (2 processes sample what 1 does; a resumed run what
    the uninterrupted one did). The same prompt twice in one step gets the same G completions."""
    key = f"{seed}:{step}:{j}:" + ",".join(map(str, prompt))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def grpo_setup_error(cfg: RunConfig) -> str | None:
    """What a grpo run's config cannot do yet, with the fix; None when it can run."""
    g = cfg.objective.grpo
    if cfg.data.packing:
        return "objective.type=grpo samples completions for each prompt row: set data.packing: false"
    if g.kl_coef > 0 and cfg.adapter.type not in ("lora", "dora"):
        return (
            f"objective.grpo.kl_coef={g.kl_coef} compares with a reference, which tuneforge takes from a LoRA/DoRA "
            f"run's base weights (adapter off); adapter.type={cfg.adapter.type} has none yet. Use adapter.type=lora "
            "or kl_coef: 0"
        )
    if cfg.dist.strategy in ("fsdp2", "deepspeed"):
        return (
            f"objective.type=grpo with dist.strategy={cfg.dist.strategy} is not supported yet: use dist.strategy=ddp "
            "(or auto)"
        )
    return None


def prompt_and_reference(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """A prepared instruction row -> (prompt ids: the tokens before its last trained span, the span's ids)."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        raise ValueError("a row with no trained tokens has no reference answer")
    end = trained[-1] + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(input_ids[start:end])


def _padded(seqs: list[list[int]]) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    return torch.tensor([s + [-1] * (width - len(s)) for s in seqs], dtype=torch.long).view(len(seqs), width)


def _unpadded(t: torch.Tensor) -> list[list[int]]:
    return [[int(x) for x in row if x >= 0] for row in t.tolist()]


class GrpoBatches:
    """Prepared instruction rows -> a micro-batch of prompts: grpo_prompts and grpo_references (token ids, padded
    with -1), num_rows, and placeholders for what the loop reads before the rollouts (input_ids, labels,
    num_tokens, num_attended). `GrpoObjective.begin_step` replaces the sequences by the sampled ones."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [prompt_and_reference(list(r["input_ids"]), list(r["labels"])) for r in rows]
        prompts = [p for p, _ in pairs]
        return {
            "grpo_prompts": _padded(prompts),
            "grpo_references": _padded([ref for _, ref in pairs]),
            "num_rows": torch.tensor(len(rows)),
            "input_ids": torch.full((1, 1), self.pad_id),
            "labels": torch.full((1, 1), IGNORE_INDEX),
            "num_tokens": torch.tensor(sum(len(p) for p in prompts)),
            "num_attended": torch.tensor(0),
        }


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> torch.Tensor:
    """r - mean of its group (rows of `group` consecutive completions), / (the group's std + 1e-4) if scale
    (torch's unbiased std, as TRL's GRPOTrainer)."""
    r = rewards.view(-1, group)
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, keepdim=True) + 1e-4)
    return a.reshape(-1)


def completion_token_logps(
    model, batch: dict, autocast=contextlib.nullcontext, entropy: bool = False, chunked: bool = False
) -> tuple[torch.Tensor, ...]:
    """(log-prob of every trained token, the index of its sequence) of a padding-free batch (position_ids
    restarting at 0 for each sequence), in fp32 or better; with entropy, also each trained position's entropy of
    the next-token distribution (detached). chunked: the LM head in row chunks (`model.lm_loss.token_logps`): no
    (completion tokens x vocab) logits."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "labels") if k in batch}
    with autocast():
        logps, owner, ent, _ = token_logps(model, inputs, chunked=chunked, entropy=entropy)
    logps = logps.float() if logps.dtype in (torch.float16, torch.bfloat16) else logps
    return (logps, owner, ent) if entropy else (logps, owner)


def grpo_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    kl_coef: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token k3 KL, per-token clipped flag) for tokens whose sequence's advantage is
    `advantages` (per token). A token is clipped where the clip zeroes its gradient: ratio < 1 - eps_low with a
    negative advantage, ratio > 1 + eps_high with a positive one."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    with torch.no_grad():
        was_clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        loss = loss + kl_coef * kl
    return loss, kl, was_clipped


class GrpoObjective:
    """GRPO on the loop: `units` (completions), `begin_step` (rollouts, rewards, advantages), `loss_sum`,
    `step_metrics`, `evaluate`; the prepared data gives it the tokenizer and stop tokens."""

    def __init__(self, cfg: RunConfig, data, chunked: bool = False, share_prompt: bool = False):
        self.cfg, self.g, self.chunked, self.share_prompt = cfg, cfg.objective.grpo, chunked, share_prompt
        self.rewards = build_rewards(self.g.rewards, self.g.max_new_tokens)
        self.tokenizer = None
        self.stop_ids: list[int] = []
        self._extra: dict[str, float] = {}
        self._rollout_end = 0.0
        self.updates_per_step = self.g.updates_per_batch  # the loop's optimizer updates per rollout batch
        self._old_logps: dict[int, torch.Tensor] = {}  # micro-batch -> its first update's log-probs (logp_old)
        self.tokenizer = data.tokenizer
        stops = data.report.get("stop_token_ids") or [data.tokenizer.eos_token_id]
        self.stop_ids = [int(t) for t in stops if t is not None]

    def units(self, batch: dict) -> float:
        return float(batch["num_rows"]) * self.g.generations

    # ---------------------------------------------------------------- rollouts and rewards
    def _generate(
        self, model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], seed: int
    ) -> list[list[int]]:
        module = peft_model(model)
        ctx = context_length(module, self.tokenizer)
        engine = Engine(module, self.tokenizer, self.stop_ids, ctx, max_batch_size=max(1, len(prompts)), seed=seed)
        was_training = module.training
        module.eval()
        try:
            return engine.run_to_completion(prompts, params)
        finally:
            if was_training:
                module.train()

    def _score(self, prompts: list[list[int]], refs: list[list[int]], outs: list[list[int]], group: int):
        """(total reward per completion, {name: per-completion values}, completion texts, completion lengths)."""
        tok = self.tokenizer
        prompt_texts = [tok.decode(p, skip_special_tokens=True) for p in prompts]
        ref_texts = [tok.decode(r, skip_special_tokens=True).strip() for r in refs]
        completions = [
            tok.decode(o[:-1] if o and o[-1] in self.stop_ids else o, skip_special_tokens=True).strip() for o in outs
        ]
        rows = [
            {"prompt": prompt_texts[i // group], "reference": ref_texts[i // group], "completion_tokens": len(o)}
            for i, o in enumerate(outs)
        ]
        per_prompt = [r["prompt"] for r in rows]
        values = {r.name: score(r, per_prompt, completions, rows) for r in self.rewards}
        total = torch.zeros(len(outs), dtype=torch.float64)
        for r in self.rewards:
            total += r.weight * torch.tensor(values[r.name], dtype=torch.float64)
        return total, values, completions, [len(o) for o in outs]

    def _sequences(
        self, prompts: list[list[int]], outs: list[list[int]], k: int, n: int, keep: list[bool] | None = None
    ) -> list[dict]:
        """Completions k..k+n-1 (those `keep` marks, if given) as padding-free sequences, in order (log-prob owners
        follow it). With share_prompt, one sequence per prompt: prompt + its first completion, then for each further
        completion the prompt's last token again + that completion, positions going on from the prompt's
        (model/attention.py Segment, as a preference pair's prompt): the prompt runs through the model once per
        group, not G times."""
        G = self.g.generations
        chosen = [j for j in range(k, k + n) if keep is None or keep[j]]
        if not self.share_prompt:
            return [
                {"input_ids": prompts[j // G] + outs[j], "labels": [IGNORE_INDEX] * len(prompts[j // G]) + outs[j]}
                for j in chosen
            ]
        seqs = []
        for start in range(k, k + n, G):
            members = [outs[j] for j in chosen if start <= j < start + G]
            if not members:
                continue
            p = prompts[start // G]
            ids, labels, positions = list(p), [IGNORE_INDEX] * len(p), list(range(len(p)))
            for i, o in enumerate(members):
                if i:
                    ids.append(p[-1])
                    labels.append(IGNORE_INDEX)
                    positions.append(len(p) - 1)
                ids += o
                labels += o
                positions += range(len(p), len(p) + len(o))
            seqs.append({"input_ids": ids, "labels": labels, "position_ids": positions})
        return seqs

    @torch.no_grad()
    def begin_step(
        self,
        model,
        batches: list[dict],
        autocast=contextlib.nullcontext,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        step: int = 0,
    ) -> None:
        """The step's rollouts (sampled with a seed of train.seed and `step`: a resumed run samples the same),
        rewards and group advantages, put into the batches."""
        t0 = time.perf_counter()
        G = self.g.generations
        prompts = [p for b in batches for p in _unpadded(b["grpo_prompts"])]
        refs = [r for b in batches for r in _unpadded(b["grpo_references"])]
        params = [
            SamplingParams(
                max_tokens=self.g.max_new_tokens,
                temperature=self.g.temperature,
                top_p=self.g.top_p,
                seed=rollout_seed(self.cfg.train.seed, step, p, j),
            )
            for p in prompts
            for j in range(G)
        ]
        outs = self._generate(model, [p for p in prompts for _ in range(G)], params, seed=step)
        total, values, _, lengths = self._score(prompts, refs, outs, G)
        advantages = group_advantages(total, G, self.g.scale_rewards)
        device = next(model.parameters()).device
        counts = torch.tensor([float(sum(lengths)), float(len(outs))], dtype=torch.float64, device=device)
        if reduce_sum is not None:  # the step's completion tokens and completions on every process
            counts = reduce_sum(counts)
        self._step_tokens, self._step_units = float(counts[0]), float(counts[1])
        keep, trains = self._kept(advantages, batches, reduce_sum, device)
        collate = FlatCollator(self.tokenizer.pad_token_id)
        self._old_logps = {}
        k = 0
        for index, b in enumerate(batches):
            b["micro_index"] = torch.tensor(index)
            n = int(b["num_rows"]) * G
            for key in ("grpo_prompts", "grpo_references"):
                b.pop(key)
            b["trains"] = torch.tensor(trains[index])
            if trains[index]:
                flat = collate(self._sequences(prompts, outs, k, n, keep))
                b.update({key: flat[key] for key in ("input_ids", "labels", "position_ids")})
            b["advantages"] = advantages[k : k + n][torch.tensor(keep[k : k + n], dtype=torch.bool)]  # fp64
            sums = {"reward": total[k : k + n], "reward_sq": total[k : k + n] ** 2}
            for name, v in values.items():
                v = torch.tensor(v[k : k + n], dtype=torch.float64)
                sums[f"rewards/{name}"], sums[f"rewards/{name}_sq"] = v, v**2
            grouped = total[k : k + n].view(-1, G)
            sums["groups_all_equal"] = (grouped == grouped[:, :1]).all(dim=1).double()
            sums["completion_len"] = torch.tensor(lengths[k : k + n], dtype=torch.float64)
            b["metric_sums"] = torch.stack([v.sum() for v in sums.values()])
            self._metric_names = list(sums)
            if self.g.kl_coef > 0:
                on = {key: b[key].to(device) for key in ("input_ids", "labels", "position_ids")}
                with peft_model(model).disable_adapter():
                    b["ref_logps"] = completion_token_logps(model, on, autocast, chunked=self.chunked)[0].float().cpu()
            k += n
        self._extra = {"completion_len_max": float(max(lengths, default=0)), "rollout_s": time.perf_counter() - t0}
        self._rollout_end = time.perf_counter()

    def _kept(self, advantages: torch.Tensor, batches: list[dict], reduce_sum, device) -> tuple[list[bool], list[bool]]:
        """(per completion: does it run through the update, per micro-batch: does it run at all). With kl_coef 0 and
        skip_zero_advantage, a completion whose advantage is 0 has a loss of exactly 0 at every ratio (-min(rho 0,
        clip(rho) 0)), hence no gradient: it is left out; a micro-batch left with none on every process runs no
        forward (the loop steps on the others' gradients, or on zero gradients). A process whose micro-batch has
        none while another's has some keeps its first completion (zero gradient) to join the backward's
        all-reduce."""
        keep = [True] * len(advantages)
        if not self.g.skip_zero_advantage or self.g.kl_coef > 0:
            return keep, [True] * len(batches)
        keep = [bool(a != 0) for a in advantages.tolist()]
        spans, k = [], 0
        for b in batches:
            n = int(b["num_rows"]) * self.g.generations
            spans.append((k, n))
            k += n
        counts = torch.tensor([float(sum(keep[k : k + n])) for k, n in spans], dtype=torch.float64, device=device)
        if reduce_sum is not None:
            counts = reduce_sum(counts)
        trains = [bool(c > 0) for c in counts.tolist()]
        for (k, n), runs in zip(spans, trains):
            if runs and n and not any(keep[k : k + n]):
                keep[k] = True
        return keep, trains

    # ---------------------------------------------------------------- the loss
    def untrained_sums(self, batch: dict) -> dict[str, float]:
        """The metric sums of a micro-batch that runs no forward (every advantage 0): its rewards and lengths."""
        return dict(zip(self._metric_names, batch["metric_sums"].tolist()))

    def loss_sum(self, model, batch: dict, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, float]]:
        logps, owner, entropy = completion_token_logps(model, batch, autocast, entropy=True, chunked=self.chunked)
        adv = batch["advantages"].to(logps)[owner]
        ref = batch["ref_logps"].to(logps) if "ref_logps" in batch else None
        index = int(batch["micro_index"])
        old = self._old_logps.get(index)
        if old is None:  # the first update on this rollout batch: the policy that sampled it, rho = 1
            old = logps.detach()
            if self.updates_per_step > 1:
                self._old_logps[index] = old
        loss, kl, clipped = grpo_token_losses(
            logps, old, adv, self.g.epsilon_low, self.g.epsilon_high, self.g.kl_coef, ref
        )
        n = len(batch["advantages"])  # the completions that run (see _kept)
        lengths = torch.zeros(n, dtype=loss.dtype, device=loss.device).index_add(0, owner, torch.ones_like(loss))
        per_seq = torch.zeros(n, dtype=loss.dtype, device=loss.device).index_add(0, owner, loss)
        per_seq_kl = torch.zeros(n, dtype=kl.dtype, device=kl.device).index_add(0, owner, kl.detach())
        how = self.g.loss_normalization
        if how == "sequence":
            total = (per_seq / lengths.clamp(min=1)).sum()
        elif how == "token":  # the loop divides by the step's completions S: sum / T = (sum S / T) / S
            total = per_seq.sum() * self._step_units / max(self._step_tokens, 1.0)
        else:
            total = per_seq.sum() / self.g.max_new_tokens
        sums = self.untrained_sums(batch)
        sums["kl"] = float((per_seq_kl / lengths.clamp(min=1)).sum())
        sums["completion_tokens"] = float(lengths.sum())
        sums["clipped_tokens"] = float(clipped.sum())
        sums["entropy"] = float(entropy.sum())
        return total, sums

    def step_metrics(self, sums: dict[str, float], units: float) -> dict[str, float]:
        n = max(units, 1.0)
        out = {}
        for key in [k for k in sums if k.endswith("_sq")]:
            name = key[: -len("_sq")]
            mean = sums[name] / n
            out[name] = mean
            out[f"{name}_std"] = max(0.0, sums[key] / n - mean**2) ** 0.5
        out["groups_all_equal"] = sums.get("groups_all_equal", 0.0) / max(n / self.g.generations, 1.0)
        out["completion_len"] = sums.get("completion_len", 0.0) / n
        out["kl"] = sums.get("kl", 0.0) / n
        tokens = sums.get("completion_tokens", 0.0)  # over the step's updates, of the completions that ran
        if tokens:  # a step whose every advantage was 0 ran none (skip_zero_advantage): no entropy to report
            out["clip_fraction"] = sums.get("clipped_tokens", 0.0) / tokens
            out["entropy"] = sums.get("entropy", 0.0) / tokens
        out["trained_tokens"] = int(round(tokens / self.updates_per_step))
        out.update(self._extra, update_s=time.perf_counter() - self._rollout_end)
        return out

    @staticmethod
    def prepare_run(model, data, run_dir, accelerator, precision: str) -> None:
        return None

    @staticmethod
    def final_model(model):
        return model

    # ---------------------------------------------------------------- held out
    @torch.no_grad()
    def evaluate(self, model, rows, batch_size: int, pad_id: int, status: Callable[[str], None] | None = None) -> dict:
        n = min(len(rows), self.g.eval_prompts)
        pairs = [prompt_and_reference(list(r["input_ids"]), list(r["labels"])) for r in rows.select(range(n))]
        prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
        if status is not None:
            status(f"evaluating {n} prompts (greedy)")
        params = SamplingParams(max_tokens=self.g.max_new_tokens, temperature=0.0)
        outs = self._generate(model, prompts, params, seed=0)
        total, values, _, lengths = self._score(prompts, refs, outs, 1)
        result = {"eval_reward": float(total.mean()) if n else 0.0}
        for name, v in values.items():
            result[f"eval_rewards/{name}"] = sum(v) / max(n, 1)
        correct = [r.name for r in self.rewards if r.name in ("exact_match", "numeric")]
        if correct:
            passed = [all(values[c][i] >= 1 for c in correct) for i in range(n)]
            result["eval_pass@1"] = sum(passed) / max(n, 1)
        result["eval_completion_len"] = sum(lengths) / max(n, 1)
        result["eval_prompts"] = n
        return result
