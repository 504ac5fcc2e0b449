"""Token-normalised causal-LM loss over a whole optimizer step.

The loss of a step is (sum of token NLLs over every micro-batch and rank) / (trained tokens in the
step), not a mean of micro-batch means: a micro-batch with 3 trained tokens must not weigh as much as
one with 300. Each micro-batch therefore backpropagates `nll_sum / step_tokens`.

`trained_nll_sum` computes the LM head only at positions whose next token is trained: prompt and
padding positions never get full-vocabulary logits (with a 32k-128k vocabulary those logits are most
of a step's activation memory). It hooks the model's own output layer, so whatever the model does
after it (logit scaling, soft-capping) still applies. With `chunked`, the head and the cross-entropy run
together in row chunks (`linear_cross_entropy.py`) once the model's own head output has been seen to equal
the plain product.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from tuneforge.data.templates import IGNORE_INDEX
from tuneforge.model.attention import rows_by_position, sequence_starts
from tuneforge.model.linear_cross_entropy import TINY, chunk_rows, linear_cross_entropy_sum


def trained_tokens(labels: torch.Tensor) -> int:
    """Positions that contribute to the loss: labels shifted by one, not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token negative log-likelihoods over trained positions, in fp32 or better."""
    shift_logits = logits[:, :-1, :]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _run(model, batch: dict[str, torch.Tensor]):
    """The model's output on a padded batch (attention_mask) or on rows of samples delimited by position_ids."""
    # rows of samples: no (row x row) mask, the per-sample attention splits the rows itself
    with rows_by_position() if "position_ids" in batch else contextlib.nullcontext():
        return model(**_model_inputs(batch))


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    if "position_ids" in batch:
        # no attention mask and no cache: the samples are where position_ids restart (see _run)
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def output_layer(model) -> torch.nn.Module:
    """The LM head of a (peft-, DDP- or compile-wrapped) causal LM."""
    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (LM head); is it a causal LM?")
    return head


def trained_nll_sum(model, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
    """Sum of next-token NLLs over trained positions, running the LM head only at those positions.

    chunked: LM head and cross-entropy together, in row chunks (`linear_cross_entropy_sum`), which never
    holds the (trained positions x vocab) logits. Only for models whose parameters are whole on this rank (not
    FSDP2 / ZeRO-3 shards). The first call per output layer checks one row against the model's own head output;
    a model that changes its logits after the LM head (soft-capping, logit scaling) keeps its own head from then on."""
    labels = batch["labels"]
    targets_mask = labels[:, 1:] != IGNORE_INDEX
    run = _head_at_trained_positions(model, batch, targets_mask, chunked)
    if run is None:  # the model changes its head's output: its own head from now on
        return trained_nll_sum(model, batch, chunked=False)
    logits, hidden, head, targets = run
    if hidden is not None:
        return linear_cross_entropy_sum(hidden, head.weight, head.bias, targets)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _head_at_trained_positions(model, batch: dict[str, torch.Tensor], targets_mask: torch.Tensor, chunked: bool):
    """Run the model with its LM head applied only at the positions whose next token is trained.

    Returns (logits, hidden, head, targets): without `chunked`, logits (trained positions x vocab) and hidden
    None; with it, the head's input `hidden` at those positions for a fused chunked head (logits then hold at most
    the one row checked on the first call per head). None when that check finds that the model changes its
    head's output (soft-capping, logit scaling): the caller recomputes unchunked, with the model's own head."""
    select = torch.zeros_like(batch["labels"], dtype=torch.bool)
    select[:, :-1] = targets_mask
    select = select.to(batch["input_ids"].device)
    head = output_layer(model)
    chunked = chunked and type(head) is torch.nn.Linear and head not in _POSTPROCESSED  # not LoRA-wrapped, not 4-bit
    check = chunked and head not in _PLAIN  # first call: one row through the model's head, to compare with ours
    kept: list[torch.Tensor] = []

    def keep_trained(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != select.shape:
            raise RuntimeError(
                f"LM head got hidden states of shape {tuple(hidden.shape)}, expected "
                f"{tuple(select.shape)} + (hidden,); use train.logits=full for this model"
            )
        kept.append(hidden[select])
        return (kept[0][: int(check)] if chunked else kept[0], *args[1:])

    handle = head.register_forward_pre_hook(keep_trained)
    try:
        logits = _run(model, batch).logits  # (trained positions, vocab), or (<=1, vocab) when chunked
    finally:
        handle.remove()
    targets = batch["labels"][:, 1:][targets_mask].to(logits.device)
    if not chunked:
        return logits, None, head, targets
    hidden = kept[0]
    if check and hidden.shape[0]:
        ours = F.linear(hidden[:1].detach(), head.weight, head.bias)
        if not torch.equal(logits.detach().float(), ours.float()):
            _POSTPROCESSED.add(head)
            return None
        _PLAIN.add(head)
    return logits, hidden, head, targets


_PLAIN: weakref.WeakSet = weakref.WeakSet()  # output layers whose output the model returns unchanged
_POSTPROCESSED: weakref.WeakSet = weakref.WeakSet()  # and those it changes (soft-capping, scaling)


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a padded batch (attention_mask) or a packed one (position_ids restarting per sample)."""
    return _run(model, batch).logits


def token_logps(
    model, batch: dict[str, torch.Tensor], chunked: bool = False, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """The trained tokens' log-probabilities, one per token in order: (token_logps, owner, entropies, n_seq).

    token_logps[j] = log softmax(z_{t-1})[labels[t]] for the j-th position t with labels[t] != -100 (row-major),
    where z_{t-1} is the LM head's output at the position before (its own head, so soft-capping or logit scaling
    still applies); owner[j] is the index of t's sequence. Sequences, in order: the rows of a padded batch
    (attention_mask), or, in a batch whose samples position_ids delimit (padding-free: all laid end to end in one
    row; or packed rows), every place where position_ids restarts at 0, row by row (a packed row's padding tail is
    a sequence of its own, with no trained tokens); n_seq counts them. entropies (with `entropy`, else None): the
    entropy in nats of each of those next-token distributions, detached. The LM head runs only at trained
    positions (as `trained_nll_sum`: no full-vocabulary logits for prompt or padding positions); differentiable,
    in fp32 or better.
    chunked: the LM head and the log-softmax together in row chunks (`linear_token_logps`), never holding the
    (trained positions x vocab) logits; as for `trained_nll_sum`, only for a plain linear head whose output the model
    returns unchanged (checked on one row on the first call), whole on this rank."""
    labels = batch["labels"]
    targets_mask = labels[:, 1:] != IGNORE_INDEX
    device = batch["input_ids"].device
    if "position_ids" in batch:
        starts = sequence_starts(batch["position_ids"])  # each row's first token, restarts and shared-prompt branches
        sequence_of = starts.flatten().cumsum(0).view(starts.shape) - 1  # row-major: sequence index per token
        n_seq = int(starts.sum())
    else:
        sequence_of = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        n_seq = labels.shape[0]
    owner = sequence_of[:, 1:][targets_mask].to(device)  # the sequence of each trained token (the label's own)
    run = _head_at_trained_positions(model, batch, targets_mask, chunked)
    if run is None:  # the model changes its head's output: its own head from now on
        return token_logps(model, batch, chunked=False, entropy=entropy)
    logits, hidden, head, targets = run
    ent = None
    if hidden is not None:
        if entropy:
            logps, ent = linear_token_logps(hidden, head.weight, head.bias, targets, entropy=True)
        else:
            logps = linear_token_logps(hidden, head.weight, head.bias, targets)
    else:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        all_logps = logits.log_softmax(-1)
        logps = all_logps.gather(1, targets[:, None])[:, 0]
        if entropy:
            with torch.no_grad():
                ent = -(all_logps.exp() * all_logps).sum(-1)
    return logps, owner.to(logps.device), ent, n_seq


def sequence_logps(model, batch: dict[str, torch.Tensor], chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of the trained tokens' log-probabilities (`token_logps`, summed per sequence), and how
    many tokens each sum holds."""
    logps, owner, _, n_seq = token_logps(model, batch, chunked)
    logp_sum = logps.new_zeros(n_seq).index_add(0, owner, logps)
    n_tokens = torch.zeros(n_seq, dtype=torch.long, device=logps.device).index_add(0, owner, torch.ones_like(owner))
    return logp_sum, n_tokens


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[targets] per row, in row chunks. The gradient of the hidden states is
    linear in each row's incoming gradient, so forward stores (onehot - softmax) @ weight per row and backward only
    scales it (no recomputation when the head is frozen, as with LoRA); the weight's and bias's gradients, when
    they train, recompute each chunk's softmax in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, entropy):  # noqa: D102 - see linear_token_logps
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        exact = torch.promote_types(compute, torch.float32)
        w = weight.to(compute)
        b = bias.to(compute) if bias is not None else None
        out = torch.empty(hidden.shape[0], dtype=exact, device=hidden.device)
        lse = torch.empty_like(out)
        ent = torch.empty_like(out) if entropy else None
        row_grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows].to(compute), targets[start : start + rows, None]
            logits = F.linear(h, w, b).to(exact)
            logit_t = logits.gather(1, t)
            p = torch.softmax(logits, -1)  # one pass fewer than logsumexp, then exp(logits - lse) for the gradient
            p_t = p.gather(1, t)
            logp = torch.log(p_t)
            far = p_t < TINY  # the target's probability underflowed: its log-prob from the logits themselves
            if far.any():
                rows_far = far[:, 0]
                logp[rows_far] = logit_t[rows_far] - torch.logsumexp(logits[rows_far], -1, keepdim=True)
            out[start : start + rows] = logp[:, 0]
            lse[start : start + rows] = (logit_t - logp)[:, 0]
            if ent is not None:  # H = lse - sum p z
                ent[start : start + rows] = lse[start : start + rows] - (p * logits).sum(-1)
            if row_grad_h is not None:
                p.neg_().scatter_add_(1, t, torch.ones_like(p_t))  # onehot - softmax = d log p_t / d logits
                row_grad_h[start : start + rows] = p.to(compute) @ w
        ctx.save_for_backward(hidden, weight, bias, targets, lse, row_grad_h)
        ctx.rows, ctx.compute = rows, compute
        if ent is None:
            return out
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, grad_entropy=None):  # noqa: D102 - the entropies are not differentiable
        hidden, weight, bias, targets, lse, row_grad_h = ctx.saved_tensors
        grad_h = (row_grad_h * grad_out[:, None].to(row_grad_h.dtype)) if row_grad_h is not None else None
        want_w = ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_w = grad_b = None
        if want_w or want_b:
            compute, exact = ctx.compute, lse.dtype
            w = weight.to(compute)
            b = bias.to(compute) if bias is not None else None
            grad_w = torch.zeros_like(weight, dtype=exact) if want_w else None
            grad_b = torch.zeros_like(bias, dtype=exact) if want_b else None
            for start in range(0, hidden.shape[0], ctx.rows):
                h, t = hidden[start : start + ctx.rows].to(compute), targets[start : start + ctx.rows, None]
                go = grad_out[start : start + ctx.rows, None].to(exact)
                g = torch.exp(F.linear(h, w, b).to(exact) - lse[start : start + ctx.rows, None]).mul_(-go)
                g.scatter_add_(1, t, go)  # go * (onehot - softmax)
                if want_w:
                    grad_w += (g.to(compute).t() @ h).to(exact)
                if want_b:
                    grad_b += g.sum(0)
            grad_w = grad_w.to(weight.dtype) if want_w else None
            grad_b = grad_b.to(bias.dtype) if want_b else None
        return grad_h, grad_w, grad_b, None, None, None


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: int | None = None,
    entropy: bool = False,
):
    """log softmax(hidden_i @ weight.T + bias)[targets_i] for each row i, in fp32 (fp64 for fp64 inputs), computed
    in chunks of `rows` rows (by default as `linear_cross_entropy_sum`'s), never holding (rows x vocab) logits;
    differentiable in hidden, weight and bias. Equal to
    `F.linear(hidden, weight, bias).float().log_softmax(-1).gather(1, targets[:, None])[:, 0]`. With entropy, returns
    (those, each row's entropy in nats), the entropies not differentiable."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (rows, dim) and targets (rows,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    return _LinearTokenLogps.apply(hidden, weight, bias, targets, rows or chunk_rows(weight.shape[0]), entropy)
