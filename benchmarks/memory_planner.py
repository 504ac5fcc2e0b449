"""Memory planner vs measurement: `plan_memory` against the bytes of real training steps on this CPU.

For a tiny and a small Llama (the small one with the Llama-2 vocabulary size, 32000), LoRA and full
fine-tuning, with and without gradient checkpointing and packing, one real step is measured with
`measure_step_memory` (weights, gradients and optimizer state from tensor sizes; activations from
`saved_tensors_hooks`, each storage once) and compared with the plan, part by part.

  python benchmarks/memory_planner.py
"""

from __future__ import annotations

import torch

from tuneforge.config.schema import RunConfig
from tuneforge.model.adapters import apply_adapter
from tuneforge.model.lm_loss import trained_nll_sum
from tuneforge.model.load import load_model
from tuneforge.train.optim import build_optimizer
from tuneforge.train.planner import plan_memory


def measure_step_memory(
    model, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, chunked: bool = True
) -> dict[str, float]:
    """Bytes of a real training step, counted from tensors (any device): weights, gradients, optimizer state,
    and everything autograd saved for backward (each storage once, parameters excluded). chunked: the LM head
    and loss as train.logits=chunked computes them (the default), else as `trained`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trained_nll_sum(model, batch, chunked=chunked)
    loss.backward()
    optimizer.step()
    state = sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if torch.is_tensor(t) and t.numel() > 1
    )
    return {
        "weights": float(sum(p.numel() * p.element_size() for p in model.parameters())),
        "gradients": float(
            sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        ),
        "optimizer": float(state),
        "saved activations": float(sum(storages.values())),
    }


MODELS = {
    "tiny (h128, 3 layers, vocab 512)": (
        {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2},
        512,
        4,
        128,
    ),
    "small (h256, 4 layers, vocab 32000)": (
        {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 704},
        32000,
        4,
        256,
    ),
}


class _Vocab:
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def case(init: dict, vocab: int, rows: int, seq: int, adapter: str, checkpointing: bool, packing: bool):
    cfg = RunConfig.model_validate(
        {
            "model": {
                "init": {
                    "architecture": "llama",
                    "max_position_embeddings": 1024,
                    "tokenizer_vocab_size": vocab,
                    **init,
                }
            },
            "data": {
                "train": [{"synthetic": {"task": "reverse_words", "rows": 8}}],
                "max_seq_len": seq,
                "packing": packing,
            },
            "adapter": {"type": adapter, "r": 16, "alpha": 32, "dropout": 0.0},
            "train": {"micro_batch_size": rows, "gradient_checkpointing": checkpointing, "lr": 1e-4},
        }
    )
    plan = plan_memory(cfg, "cpu", "fp32")
    torch.manual_seed(0)
    model = apply_adapter(load_model(cfg.model, _Vocab(vocab), torch.float32, "sdpa"), cfg.adapter, checkpointing)
    model.train()
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if packing:  # four samples per row, positions restarting at each
        batch["position_ids"] = torch.arange(seq).remainder(seq // 4).expand(rows, seq).contiguous()
    else:
        batch["attention_mask"] = torch.ones_like(ids)
    measured = measure_step_memory(model, batch, build_optimizer(model, cfg.train))
    p = plan.parts
    planned = {
        "weights": p["weights"],
        "gradients": p["gradients"],
        "optimizer": p["optimizer (adamw)"],
        "saved activations": p["activations (decoder)"] + p["activations (LM head, loss)"],
    }
    return planned, measured


def main() -> None:
    torch.set_num_threads(2)
    print(f"{'model':<38}{'case':<26}{'part':<20}{'planned MiB':>12}{'measured MiB':>13}{'error':>8}")
    worst = 0.0
    for mname, (init, vocab, rows, seq) in MODELS.items():
        for adapter in ("lora", "full"):
            for ckpt in (False, True):
                for packing in (False, True):
                    label = f"{adapter}{' +ckpt' if ckpt else ''}{' +packing' if packing else ''}"
                    planned, measured = case(init, vocab, rows, seq, adapter, ckpt, packing)
                    for part, m in measured.items():
                        err = (planned[part] - m) / m
                        worst = max(worst, abs(err))
                        print(
                            f"{mname:<38}{label:<26}{part:<20}"
                            f"{planned[part] / 2**20:>12.2f}{m / 2**20:>13.2f}{err:>+8.1%}"
                        )
    print(f"\nlargest error: {worst:.1%} (target: within 15%)")


if __name__ == "__main__":
    main()
