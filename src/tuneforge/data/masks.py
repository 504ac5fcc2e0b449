"""Token ids and labels (-100 wherever no loss is taken) of rendered rows, many at a time, as flat arrays.

templates.py renders a conversation and finds its trained character spans (with the tokenizer's EOS written
after turns the template closes with nothing); here the rendered texts are tokenized once with character
offsets, and a token is trained when its own text overlaps a trained span (`_labels`).

A template that writes the BOS token as text (`{{ bos_token }}...`, as Alpaca's and Mistral's do) would, with
a SentencePiece-style tokenizer (Llama-2, Mistral), tokenize `<s>Below is` as ['<s>', 'Bel', 'ow', '▁is']:
after a special token the first word loses its prefix space, so the model trains on a prompt no one
sends it (`tokenizer(prompt)` gives ['<s>', '▁Below', '▁is']). `leading_bos` detects such tokenizers; the
BOS text is then split off before tokenizing and its id put back in front (`split_leading_bos`, `with_bos`),
which gives exactly `tokenizer(text)`'s ids. Other tokenizers (Llama-3, Qwen, GPT-2) are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
from transformers import PreTrainedTokenizerBase

from tuneforge.data.rendering import template_traits
from tuneforge.data.templates import IGNORE_INDEX, TemplateError, chats_rendered, render
from tuneforge.data.tool_calls import calls_text


@dataclass
class TokenizedRows:
    """Many tokenized rows as flat arrays: row i holds ids[offsets[i]:offsets[i + 1]] (and the same labels)."""

    ids: np.ndarray  # int64, every row's token ids concatenated
    labels: np.ndarray  # int64, IGNORE_INDEX where no loss is taken
    lengths: np.ndarray  # int64, tokens per row

    @property
    def offsets(self) -> np.ndarray:
        out = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def rows(self) -> list[tuple[list[int], list[int]]]:
        """(ids, labels) per row, as Python lists."""
        bounds = self.offsets.tolist()
        ids, labels = self.ids.tolist(), self.labels.tolist()
        return [(ids[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def concat(parts: list[TokenizedRows]) -> TokenizedRows:
        return TokenizedRows(
            *(
                np.concatenate([np.zeros(0, np.int64), *(getattr(p, f) for p in parts)])
                for f in ("ids", "labels", "lengths")
            )
        )


def leading_bos(tokenizer) -> str | None:
    """The BOS text to split off the front of rendered chats before tokenizing, or None: only for tokenizers
    that add BOS themselves and tokenize the text after an inline BOS differently from `tokenizer(text)`."""
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if not bos or bos_id is None:
        return None
    probe = "Below is an instruction."
    own = list(tokenizer(probe)["input_ids"])
    if not own or own[0] != bos_id:
        return None  # the tokenizer adds no BOS: a template that writes one decides the form
    inline = list(tokenizer(bos + probe, add_special_tokens=False)["input_ids"])
    return bos if inline != own[: len(inline)] else None


def split_leading_bos(texts: list[str], spans: list, bos: str | None) -> tuple[list[str], list, np.ndarray]:
    """(texts without a leading `bos`, trained character spans shifted to match, which texts had it)."""
    which = np.array([bos is not None and t.startswith(bos) for t in texts], dtype=bool)
    if not which.any():
        return texts, spans, which
    n = len(bos)
    texts = [t[n:] if w else t for t, w in zip(texts, which)]
    spans = [[(max(a - n, 0), max(b - n, 0), end) for a, b, end in sp] if w else sp for sp, w in zip(spans, which)]
    return texts, spans, which


def rendered_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one rendered text, with the same BOS split as training (for generation prompts)."""
    texts, _, which = split_leading_bos([text], [[]], leading_bos(tokenizer))
    ids = list(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    return [tokenizer.bos_token_id, *ids] if which[0] else ids


def with_bos(rows: TokenizedRows, which: np.ndarray, bos_id: int) -> TokenizedRows:
    """`rows` with `bos_id` (untrained) put back in front of the rows `which` marks."""
    if not which.any():
        return rows
    starts = rows.offsets[:-1][which]
    return TokenizedRows(
        np.insert(rows.ids, starts, bos_id),
        np.insert(rows.labels, starts, IGNORE_INDEX),
        rows.lengths + which.astype(np.int64),
    )


def backend_as_called(tokenizer):
    """The Rust tokenizer behind a fast tokenizer, in the state `tokenizer(text)` encodes with (no truncation or
    padding preset in tokenizer.json, special tokens as the tokenizer splits them); None for a slow tokenizer.
    Calling it directly gives `tokenizer(...)`'s ids and offsets without converting every encoding to a dict."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        tokenizer("", add_special_tokens=False)  # transformers sets that state on the backend when called
    return backend


@dataclass
class Encoded:
    """Token ids of many texts (no special tokens added), with what their labels are computed from: the Rust
    encodings (fast tokenizer) or the character offsets (slow tokenizer)."""

    ids: np.ndarray  # int64, flat
    lengths: np.ndarray  # int64, tokens per text
    encodings: list | None = None
    offsets: np.ndarray | None = None  # int64 (tokens, 2): (start, end) character offsets

    def with_offsets(self) -> np.ndarray:
        if self.offsets is None:
            n = len(self.ids)
            self.offsets = np.fromiter(
                chain.from_iterable(chain.from_iterable(e.offsets for e in self.encodings)), dtype=np.int64, count=2 * n
            ).reshape(n, 2)
        return self.offsets


def encode_texts(tokenizer, backend, texts: list[str], encodings: list | None = None) -> Encoded:
    """`Encoded` of texts. `encodings`: `backend.encode_batch(texts, add_special_tokens=False)` when already
    done (the Rust work releases the GIL, so it can run in another thread beside Python work)."""
    if backend is not None:
        if encodings is None:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
        ids, offs = [np.array(e.ids, dtype=np.int64) for e in encodings], None
    else:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        encodings, offs = None, enc["offset_mapping"]
        ids = [np.array(x, dtype=np.int64) for x in enc["input_ids"]]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    n = int(lengths.sum())
    out = Encoded(np.concatenate([np.zeros(0, np.int64), *ids]), lengths, encodings)
    if offs is not None:
        out.offsets = np.fromiter(chain.from_iterable(chain.from_iterable(offs)), dtype=np.int64, count=2 * n).reshape(
            n, 2
        )
    return out


def monotone_offsets(enc: Encoded) -> bool:
    """Whether, within every text, token start offsets and end offsets both never decrease."""
    off = enc.with_offsets()
    same_text = np.ones(max(len(off) - 1, 0), dtype=bool)
    starts = np.cumsum(enc.lengths)[:-1]  # where each text after the first starts
    same_text[starts[(starts > 0) & (starts < len(off))] - 1] = False  # steps across texts do not count
    return bool(np.all(np.diff(off, axis=0)[same_text] >= 0))


def absorbing_tokens(tokenizer) -> dict[int, str]:
    """id -> text of the added tokens that take in the whitespace beside them (`lstrip` / `rstrip`, as Phi-3's
    `<|assistant|>`, `<|end|>`): their offsets cover that whitespace too."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {i: t.content for i, t in decoder.items() if getattr(t, "lstrip", False) or getattr(t, "rstrip", False)}


def _core(text: str, start: int, end: int, literal: str) -> tuple[int, int]:
    """The characters of an absorbing token's own text within its offsets (start, end)."""
    at = text.find(literal, start, end)
    return (at, at + len(literal)) if at >= 0 else (start, end)


def _core_offsets(enc: Encoded, texts: list[str], absorbing: dict[int, str]) -> np.ndarray:
    """Every token's offsets, those of absorbing tokens narrowed to their own text (see `absorbing_tokens`)."""
    offsets = enc.with_offsets()
    at = np.flatnonzero(np.isin(enc.ids, np.fromiter(absorbing, dtype=np.int64, count=len(absorbing))))
    if not len(at):
        return offsets
    offsets = offsets.copy()
    rows = np.searchsorted(np.cumsum(enc.lengths) - enc.lengths, at, side="right") - 1
    for t, r in zip(at.tolist(), rows.tolist()):
        offsets[t] = _core(texts[r], int(offsets[t, 0]), int(offsets[t, 1]), absorbing[int(enc.ids[t])])
    return offsets


def _labels(
    enc: Encoded,
    spans: list[list[tuple[int, int, bool]]],
    train_on: str,
    search: bool = False,
    texts: list[str] | None = None,
    absorbing: dict[int, str] | None = None,
) -> np.ndarray:
    """Labels of many tokenized conversations (flat): a token is trained when its own text overlaps a trained
    character span, and when it begins before the span, takes only whitespace from before it (given the
    `texts`): the whitespace an absorbing token takes in beside it (`absorbing`: see `absorbing_tokens`) does
    not make it part of a turn, nor a token that merges the prompt's last characters with the reply's first. By
    numpy over every token's offsets; or, with `search`
    (only for offsets that never decrease, see `monotone_offsets`), by finding each span's first and last trained
    token with binary searches in Rust."""
    ids, lengths = enc.ids, enc.lengths
    absorbing = absorbing if absorbing and texts is not None else {}
    if train_on == "all":
        return ids.copy()
    if search and enc.encodings is not None:
        return _labels_by_search(enc, spans, texts, absorbing)
    offsets = _core_offsets(enc, texts, absorbing) if absorbing else enc.with_offsets()
    row = np.repeat(np.arange(len(lengths)), lengths)
    trained = np.zeros(len(ids), dtype=bool)
    for k in range(max(map(len, spans), default=0)):  # the k-th trained span of every row; (0, 0) overlaps nothing
        start = np.array([s[k][0] if k < len(s) else 0 for s in spans], dtype=np.int64)[row]
        end = np.array([s[k][1] if k < len(s) else 0 for s in spans], dtype=np.int64)[row]
        hit = (offsets[:, 0] < end) & (offsets[:, 1] > start)
        if texts is not None:  # a token begun in the prompt belongs to it, unless what it takes of it is whitespace
            for t in np.flatnonzero(hit & (offsets[:, 0] < start)).tolist():
                hit[t] = _prompt_part_is_space(texts[row[t]], int(offsets[t, 0]), int(start[t]))
        trained |= hit
    return np.where(trained, ids, IGNORE_INDEX)


def _prompt_part_is_space(text: str, token_start: int, span_start: int) -> bool:
    """Whether a token that starts before a trained span takes only whitespace from before it: SentencePiece's
    `▁It` of `[/INST] It` does (trained), `][` of `[/INST][TOOL_CALLS]` does not (prompt)."""
    return text[token_start:span_start].isspace()


def _labels_by_search(
    enc: Encoded, spans: list[list[tuple[int, int, bool]]], texts: list[str] | None, absorbing: dict[int, str]
) -> np.ndarray:
    """`_labels` when offsets never decrease: the tokens overlapping a span [s, e) (start < e and end > s) are
    then the run from the first token ending after s up to, not including, the first token starting at or
    after e. The first is the first token covering character s (`char_to_token`) when one does, the other is
    bisected; no token's offsets are read but a few. An absorbing token at either end is left out when its own
    text is outside the span, a first token begun before the span when it takes more than whitespace from there."""
    first = np.concatenate([[0], np.cumsum(enc.lengths)[:-1]]).tolist()
    edges = np.zeros(len(enc.ids) + 1, dtype=np.int64)  # +1 where a trained run starts, -1 after it ends
    for r, (enc_row, row_spans, base, n) in enumerate(zip(enc.encodings, spans, first, enc.lengths.tolist())):
        chars, row_ids = enc_row.token_to_chars, enc_row.ids if absorbing else []

        def core(t: int) -> tuple[int, int]:
            return _core(texts[r], *chars(t), absorbing[row_ids[t]])  # noqa: B023 (used within this row)

        for s, e, _ in row_spans:
            a = enc_row.char_to_token(s) if s < e else None
            if a is None:  # no token covers s: bisect for the first token ending after it
                lo, hi = 0, n
                while lo < hi:
                    mid = (lo + hi) // 2
                    if chars(mid)[1] > s:
                        hi = mid
                    else:
                        lo = mid + 1
                a = lo
            last = enc_row.char_to_token(e - 1) if s < e else None  # a trained token: the run goes past it
            b = a if last is None or last < a else last + 1
            for _ in range(4):  # the run usually ends right after `last`
                if b == n or chars(b)[0] >= e:
                    break
                b += 1
            else:  # bisect for the first token starting at or after e
                hi = n
                while b < hi:
                    mid = (b + hi) // 2
                    if chars(mid)[0] >= e:
                        hi = mid
                    else:
                        b = mid + 1
            while absorbing and a < b and row_ids[a] in absorbing and core(a)[1] <= s:
                a += 1
            while absorbing and b > a and row_ids[b - 1] in absorbing and core(b - 1)[0] >= e:
                b -= 1
            if texts is not None and a < b and chars(a)[0] < s:
                a += 0 if _prompt_part_is_space(texts[r], chars(a)[0], s) else 1
            if b > a:
                edges[base + a] += 1
                edges[base + b] -= 1
    return np.where(np.cumsum(edges[:-1]) > 0, enc.ids, IGNORE_INDEX)


def chats_tokenized(
    tokenizer,
    backend,
    texts: list[str],
    spans: list,
    train_on: str,
    encoded: Encoded | None = None,
    search: bool = False,
) -> TokenizedRows:
    """Token ids and labels of rendered conversations (`chats_rendered`); `encoded` is `encode_texts` of the
    texts when already done (in another thread); `search`: see `_labels`."""
    enc = encoded or encode_texts(tokenizer, backend, texts)
    labels = _labels(enc, spans, train_on, search, texts, absorbing_tokens(tokenizer))
    return TokenizedRows(enc.ids, labels, enc.lengths)


def tokenize_chats(
    tokenizer: PreTrainedTokenizerBase, template: str, conversations: list[list[dict]], train_on: str
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of many conversations (batched rendering and tokenization); -100 outside trained turns."""
    texts, spans = chats_rendered(tokenizer, template, conversations, train_on)
    if not texts:
        return []
    texts, spans, bos_rows = split_leading_bos(texts, spans, leading_bos(tokenizer))
    rows = chats_tokenized(tokenizer, backend_as_called(tokenizer), texts, spans, train_on)
    return with_bos(rows, bos_rows, tokenizer.bos_token_id).rows()


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], train_on: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation; labels are -100 outside the trained turns."""
    return tokenize_chats(tokenizer, template, [messages], train_on)[0]


def texts_tokenized(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> TokenizedRows:
    """Raw completion texts: every token trained, EOS appended (and trained) where the text does not end with it."""
    eos = tokenizer.eos_token_id
    rows = [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []
    for ids in rows:
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
    ids = np.fromiter(chain.from_iterable(rows), dtype=np.int64)
    return TokenizedRows(ids, ids.copy(), np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)))


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """Raw completion text: every token trained, EOS appended (and trained)."""
    return texts_tokenized(tokenizer, [text]).rows()[0]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    """Token ids that end an assistant turn under this template (EOS first): the stop tokens for generation,
    with the one that ends a tool call when the template writes calls (functionary's `<|eom_id|>`, say)."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    user = {"role": "user", "content": "hi"}
    call = {"id": "call00000", "type": "function", "function": {"name": "f", "arguments": {}}}
    replies = [{"role": "assistant", "content": "ok"}]
    if template_traits(tokenizer, template).arguments is not None:
        replies.append({"role": "assistant", "content": "", "tool_calls": calls_text([call])})
    added = set(tokenizer.get_added_vocab().values())
    for reply in replies:
        for conversation in ([user, reply], [{"role": "system", "content": "s"}, user, reply]):
            try:  # a template that wants more (a system turn first): try that, else EOS alone
                ids, labels = tokenize_chat(tokenizer, template, conversation, "last")
            except TemplateError:
                continue
            last = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX][-1:]
            if last and last[0] not in stops and (last[0] in tokenizer.all_special_ids or last[0] in added):
                stops.append(last[0])
            break
    return stops


def prompt_ids(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt (for generation): the same
    tokens training sees for that text."""
    return rendered_ids(tokenizer, render(tokenizer, template, messages, True))
