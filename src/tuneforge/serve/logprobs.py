"""Token log-probabilities in OpenAI's two wire forms: chat's `logprobs.content` list and the legacy completions'
`tokens` / `token_logprobs` / `top_logprobs` / `text_offset` columns. Entries come from the engine
(`Event.logprobs`: token id, log p, top (id, log p) pairs); a token's text is its own decoding, so a token that
holds part of a UTF-8 character reads as U+FFFD (its `bytes` are those of that text)."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from tuneforge.infer.sequence import TokenLogprob


def _text(tokenizer: PreTrainedTokenizerBase, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: Sequence[TokenLogprob]) -> dict:
    """`{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""

    def one(token: int, logprob: float) -> dict:
        text = _text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [{**one(token, lp), "top_logprobs": [one(t, v) for t, v in top]} for token, lp, top in entries],
        "refusal": None,
    }


def completion_logprobs(tokenizer: PreTrainedTokenizerBase, entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
    """`{tokens, token_logprobs, top_logprobs: [{token: logprob}] (None with logprobs=0), text_offset}`;
    `offset` is where this piece starts in the choice's text (streaming)."""
    tokens, offsets = [], []
    for token, _, _ in entries:
        offsets.append(offset)
        tokens.append(_text(tokenizer, token))
        offset += len(tokens[-1])
    top = []
    for _, _, pairs in entries:
        top.append({})
        for t, v in pairs:  # most likely first; two ids with the same text keep the likelier
            top[-1].setdefault(_text(tokenizer, t), v)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": top if any(pairs for _, _, pairs in entries) else None,
        "text_offset": offsets,
    }
