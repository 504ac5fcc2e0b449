"""Where each trained assistant turn is in a rendered conversation: character spans for the loss mask.

A trained turn is what the model must write after the generation prompt: its reply and the end-of-turn marker
after it (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...), plus any text a template puts between the generation prompt
and the reply (Command-R's `<|START_RESPONSE|>`, functionary's `all\\n`), but not whitespace a template writes
there (its indentation) nor whitespace after the marker. The reply is located in the one full rendering of the
conversation, two ways:

- by prefixes (most templates): the conversation up to turn i with the generation prompt (`before`) is a prefix
  of the conversation through turn i (`through`), which is a prefix of the full rendering up to the reply's end;
  the reply is the first place its text appears after `before`.
- from the full rendering alone, when a template renders a turn differently depending on what follows it (the
  community templates without jinja whitespace control, whose newlines depend on the next turn; Mistral's, which
  move the system message into the last user turn; DeepSeek-R1's, whose generation prompt opens `<think>`): the
  conversation is rendered once more with every trained reply replaced by a marker, and the text around the
  markers, the template's own, is matched against the full rendering; what lies between is each reply as the
  template wrote it.

The end-of-turn marker is the text after the reply that stays the same whether another message follows or not
(compared token by token, so that a shared `<|` of two different special tokens is not counted), less trailing
whitespace. A turn that neither way locates (an empty reply, such as a tool call without text, in a template
whose turns depend on what follows) is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.rendering import TemplateError, end_marker, render_many

SENTINEL = "@@tuneforge-turn-{}@@"  # stands in for a reply; no template trims or escapes it
FOLLOW = "@@tuneforge-next@@"  # the user turn that follows a conversation's last turn, to find its end

Span = tuple[int, int, bool]  # (start, end, whether the template closed the turn with a marker)


@dataclass
class Chat:
    """A conversation as its template gets it (`tool_calls.for_template`)."""

    messages: list[dict]
    tools: list[dict] | None = None


def _variants(content: str) -> list[str]:
    """How a template may have written a reply: as it is, or with whitespace trimmed at one or both ends."""
    return [c for c in dict.fromkeys((content, content.rstrip(), content.lstrip(), content.strip())) if c]


def _content_at(text: str, start: int, content: str) -> tuple[int, int] | None:
    """(start, end) of the first place a reply is written in `text` from `start` on; an empty reply is at start."""
    if not content:
        return start, start
    for c in _variants(content):
        at = text.find(c, start)
        if at >= 0:
            return at, at + len(c)
    return None


def _start(full: str, before: str, content_start: int) -> int:
    """Where the trained turn starts: right after the generation prompt when that is a prefix of the rendering
    and text other than whitespace lies between it and the reply (a response marker the model writes), else
    at the reply."""
    if full.startswith(before) and len(before) <= content_start and full[len(before) : content_start].strip():
        return len(before)
    return content_start


def _by_prefixes(tokenizer, before: str, through: str, full: str, other: str | None, content: str) -> Span | None:
    """The turn's span in `full` when the renderings are prefixes of each other, else None. `other`: the
    rendering with another message after the turn (None when the template refuses one)."""
    if not through.startswith(before):
        return None
    at = _content_at(through, len(before), content)
    if at is None or full[: at[1]] != through[: at[1]]:
        return None
    cs, ce = at
    if other is not None and other[:ce] != through[:ce]:
        other = None
    marker = end_marker(tokenizer, through[ce:], other[ce:] if other is not None else None)
    return _start(full, before, cs), ce + len(marker), bool(marker.strip())


def _split(text: str, keys: list[str]) -> list[str] | None:
    """The text around each of `keys` (each must appear once, in order), or None."""
    parts, pos = [], 0
    for key in keys:
        at = text.find(key, pos)
        if at < 0 or text.count(key) != 1:
            return None
        parts.append(text[pos:at])
        pos = at + len(key)
    return [*parts, text[pos:]]


def _after(text: str | None, key: str) -> str | None:
    """The text after `key` when it appears once, else None."""
    if text is None or text.count(key) != 1:
        return None
    return text[text.index(key) + len(key) :]


def _marked(chat: Chat, turns: list[int]) -> tuple[list[int], list[dict]]:
    """The turns with text among `turns`, and the messages with each of their replies replaced by a marker."""
    ids = [i for i in turns if chat.messages[i].get("content")]
    marked = [dict(m, content=SENTINEL.format(i)) if i in ids else m for i, m in enumerate(chat.messages)]
    return ids, marked


def _marked_renders(
    tokenizer, template: str, wanted: list[tuple[Chat, list[int]]], needs_tools: bool
) -> list[tuple[list[str] | None, str | None]]:
    """For each (conversation, turns): the renderings with markers (the whole conversation, then through each
    turn before the last message; None where the template refuses them), and the whole one followed by a user
    turn when a turn is its last message (None: refused)."""
    per_chat, followed = [], []
    for chat, turns in wanted:
        ids, marked = _marked(chat, turns)
        last = len(marked) - 1
        per_chat.append([(marked, False, chat.tools)] + [(marked[: i + 1], False, chat.tools) for i in ids if i < last])
        followed.append(Chat(marked, chat.tools) if ids and ids[-1] == last else None)
    try:
        flat = render_many(tokenizer, template, [r for reqs in per_chat for r in reqs], needs_tools)
        texts, at = [], 0
        for reqs in per_chat:
            texts.append(flat[at : at + len(reqs)])
            at += len(reqs)
    except Exception:  # some conversation is refused with markers: find which, one by one
        texts = []
        for reqs in per_chat:
            try:
                texts.append(render_many(tokenizer, template, reqs, needs_tools))
            except Exception:
                texts.append(None)
    follows = iter(_follow_renders(tokenizer, template, [c for c in followed if c is not None], needs_tools))
    return [(t, next(follows) if c is not None else None) for t, c in zip(texts, followed)]


class _Layout:
    """A conversation's trained replies located in its full rendering through a rendering with markers in their
    place (see the module's docstring); `marked`, `follow`: `_marked_renders` of it."""

    def __init__(self, tokenizer, chat: Chat, turns: list[int], full: str, marked: list[str] | None, follow):
        msgs, last = chat.messages, len(chat.messages) - 1
        self.tokenizer, self.full = tokenizer, full
        self.ids = _marked(chat, turns)[0] if marked is not None else []
        throughs = [i for i in self.ids if i < last]
        self.after = {i: _after(t, SENTINEL.format(i)) for i, t in zip(throughs, (marked or [])[1:])}
        if self.ids and self.ids[-1] == last:
            self.after[last] = _after(follow, SENTINEL.format(last))
        self.parts = _split(marked[0], [SENTINEL.format(i) for i in self.ids]) if self.ids else None
        self.contents = self._align(msgs) if self.parts is not None else {}

    def _align(self, msgs: list[dict]) -> dict[int, tuple[int, int]]:
        """(start, end) in the full rendering of each reply, by the template's text around the markers."""
        full, parts, out = self.full, self.parts, {}
        if not full.startswith(parts[0]):
            return {}
        pos = len(parts[0])
        for k, i in enumerate(self.ids):
            around, last = parts[k + 1], k == len(self.ids) - 1
            end = len(full) - len(around) if last and full.endswith(around) else -1
            for c in _variants(msgs[i]["content"]):
                if (pos + len(c) == end) if last else full.startswith(c + around, pos):
                    end = pos + len(c)
                    break
            else:  # the template changed the reply (cut its reasoning, say): it ends where its text resumes
                if not last:
                    end = full.find(around, pos)
            if end < pos:
                return out
            out[i] = (pos, end)
            pos = end + len(around)
        return out

    def span(self, i: int, before: str) -> Span:
        if i not in self.contents:
            why = "it has no text" if i not in self.ids else "its text cannot be matched in the rendering"
            raise TemplateError(
                f"the chat template renders assistant turn {i} differently depending on what follows it, and "
                f"{why}, so its tokens cannot be located; use data.chat_template: chatml (or alpaca), or a "
                "template file"
            )
        cs, ce = self.contents[i]
        tail = self.parts[self.ids.index(i) + 1]
        marker = end_marker(self.tokenizer, tail, self.after.get(i))
        return _start(self.full, before, cs), ce + len(marker), bool(marker.strip())


def _follow_renders(tokenizer, template: str, chats: list[Chat], needs_tools: bool) -> list[str | None]:
    """Each conversation followed by a user turn; None where the template refuses a trailing user turn."""
    followed = [([*c.messages, {"role": "user", "content": FOLLOW}], False, c.tools) for c in chats]
    try:
        return list(render_many(tokenizer, template, followed, needs_tools))
    except Exception:  # some conversation is refused: find which, one by one
        out: list[str | None] = []
        for request in followed:
            try:
                out.append(render_many(tokenizer, template, [request], needs_tools)[0])
            except Exception:
                out.append(None)
        return out


def assistant_spans_many(
    tokenizer, template: str, chats: list[Chat], train_on: str, needs_tools: bool = False
) -> list[tuple[str, list[Span]]]:
    """Render each conversation and return (text, [(start, end, has_end_marker)]) of its trained turns."""
    requests: list[tuple[list[dict], bool, list[dict] | None]] = []

    def need(msgs: list[dict], generation_prompt: bool, tools) -> int:
        requests.append((msgs, generation_prompt, tools))
        return len(requests) - 1

    plans, ends_last = [], []
    for chat in chats:
        msgs, tools = chat.messages, chat.tools
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if train_on == "last":
            turns = turns[-1:]
        full = need(msgs, False, tools)
        steps = [
            (i, need(msgs[:i], True, tools), full if i == len(msgs) - 1 else need(msgs[: i + 1], False, tools))
            for i in turns
        ]
        plans.append((full, turns, steps))
        ends_last.append(bool(turns) and turns[-1] == len(msgs) - 1)
    texts = render_many(tokenizer, template, requests, needs_tools)
    followed = iter(_follow_renders(tokenizer, template, [c for c, last in zip(chats, ends_last) if last], needs_tools))
    found, pending = [], []  # spans (None: to be located from the full rendering), conversations that need that
    for k, (chat, (full_k, _, steps), last) in enumerate(zip(chats, plans, ends_last)):
        msgs, full = chat.messages, texts[full_k]
        follow = next(followed) if last else None
        spans = [
            _by_prefixes(
                tokenizer,
                texts[before_k],
                texts[through_k],
                full,
                follow if i == len(msgs) - 1 else full,
                msgs[i].get("content") or "",
            )
            for i, before_k, through_k in steps
        ]
        found.append(spans)
        if None in spans:
            pending.append(k)
    marked = _marked_renders(tokenizer, template, [(chats[k], plans[k][1]) for k in pending], needs_tools)
    for k, (marked_texts, follow) in zip(pending, marked):
        full_k, turns, steps = plans[k]
        layout = _Layout(tokenizer, chats[k], turns, texts[full_k], marked_texts, follow)
        found[k] = [sp or layout.span(i, texts[before_k]) for sp, (i, before_k, _) in zip(found[k], steps)]
    return [(texts[full_k], spans) for (full_k, _, _), spans in zip(plans, found)]
