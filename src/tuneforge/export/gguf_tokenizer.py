"""The tokenizer part of a GGUF file, read from a model directory's tokenizer.json (needs the `gguf` package).

llama.cpp knows two kinds of BPE tokenizer, and says which one a file holds in `tokenizer.ggml.model`:
  gpt2   byte-level BPE (GPT-2, Llama-3, Qwen2, and the tokenizers tuneforge trains for new models): the
         vocabulary in its byte-level spelling plus the merges; `tokenizer.ggml.pre` names the regex that
         splits text before BPE, and must be one llama.cpp implements, or it would tokenize differently.
  llama  SentencePiece-style BPE with byte fallback (Llama-2, Mistral): pieces with U+2581 for spaces,
         <0xNN> byte tokens, and scores that order the merges (llama.cpp merges the best-scoring pair).
Token types mark control (special) tokens, user-defined (added, not special) tokens, byte tokens and the
padding slots between the tokenizer's size and the embedding's (written as [PAD<id>], unused).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from tuneforge.export.errors import GGUFExportError

# the pre-tokenizer regexes of tokenizer.json that llama.cpp implements under these `tokenizer.ggml.pre` names
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
KNOWN_PRE = "GPT-2 byte-level, Llama-3 (llama-bpe), Qwen2 (qwen2), and SentencePiece-style BPE (Llama-2, Mistral)"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE = "\u2581"  # SentencePiece's visible space
T = gguf.TokenType


@dataclass
class Vocab:
    """Everything `tokenizer.*` in the GGUF file: tokens by id, their types, scores (llama) or merges (gpt2)."""

    model: str  # gpt2 | llama
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _merge_text(merge) -> str:
    """One merge as llama.cpp stores it: "left right" (spaces inside a part written as U+0120, as gguf-py does)."""
    if isinstance(merge, str):
        return merge
    return " ".join(part.replace(" ", chr(ord(" ") + 256)) for part in merge)


def _pre_name(tj: dict, where: Path) -> str:
    """`tokenizer.ggml.pre` for a byte-level BPE tokenizer, or an error naming the ones this exporter knows."""
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"  # GPT-2's own regex, no prefix space
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    ):
        name = SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise GGUFExportError(
        f"{where}: its pre-tokenizer {json.dumps(pre)[:300]} is not one this exporter can name for llama.cpp (known: "
        f"{KNOWN_PRE}); llama.cpp would split text differently from training. Use llama.cpp's "
        "convert_hf_to_gguf.py on the exported directory, which knows more tokenizers."
    )


def _space_prefix(tj: dict) -> bool:
    """Whether the SentencePiece-style tokenizer puts a space before the text (Metaspace or a Prepend normalizer)."""
    pre = tj.get("pre_tokenizer") or {}
    for step in [pre, *pre.get("pretokenizers", [])]:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    norm = tj.get("normalizer") or {}
    return any(step.get("type") == "Prepend" for step in [norm, *norm.get("normalizers", [])])


def read_vocab(model_dir: Path, vocab_size: int, stop_ids: list[int]) -> Vocab:
    """The GGUF vocabulary of `model_dir` (tokenizer.json, plus the tokenizer for special ids and the chat
    template), padded to the embedding's `vocab_size`. `stop_ids`: end-of-turn ids (generation_config)."""
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise GGUFExportError(
            f"{path} is missing: GGUF export reads the fast tokenizer's tokenizer.json; save the "
            "tokenizer with transformers (tokenizer.save_pretrained) into the model directory"
        )
    tj = json.loads(path.read_text(encoding="utf-8"))
    bpe = tj.get("model", {})
    if bpe.get("type") != "BPE":
        raise GGUFExportError(
            f"{path}: tokenizer model {bpe.get('type')!r} is not supported for GGUF (known: {KNOWN_PRE})"
        )
    spm = bool(bpe.get("byte_fallback"))
    by_id = {int(i): t for t, i in bpe.get("vocab", {}).items()}
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(
            f"{path}: token id {max(by_id)} does not fit the model's embedding ({vocab_size} rows); "
            "resize the embedding to the tokenizer (model.resize_token_embeddings) and export again"
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    merges = [_merge_text(m) for m in bpe.get("merges", [])]
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        score = -1000.0
        if text is None:
            text, kind = f"[PAD{i}]", T.UNUSED
        elif i == tok.unk_token_id:
            kind, score = T.UNKNOWN, 0.0
        elif i in added:
            kind = T.CONTROL if added[i].get("special") else T.USER_DEFINED
            if kind == T.USER_DEFINED:
                text = text.replace(SPACE, " ")  # llama.cpp matches user-defined tokens on raw text
        elif spm and BYTE_TOKEN.fullmatch(text):
            kind, score = T.BYTE, 0.0
        else:
            kind, score = T.NORMAL, -float(rank.get(text, -1) + 1)  # earlier merge = higher score; pieces: 0
        tokens.append(text)
        types.append(int(kind))
        scores.append(score)

    special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    eot = next((t for t in stop_ids if t != tok.eos_token_id), None)
    if eot is not None:
        special["eot"] = eot  # llama.cpp stops on eos and eot
    probe = tok("a")["input_ids"]
    template = tok.chat_template if isinstance(tok.chat_template, str) and tok.chat_template else None
    return Vocab(
        model="llama" if spm else "gpt2",
        pre="default" if spm else _pre_name(tj, path),
        tokens=tokens,
        types=types,
        scores=scores if spm else None,
        merges=[] if spm else merges,
        special_ids={k: int(v) for k, v in special.items() if v is not None},
        add_bos=bool(probe) and probe[0] == tok.bos_token_id,
        add_eos=bool(probe) and probe[-1] == tok.eos_token_id and tok.eos_token_id != tok.bos_token_id,
        add_space_prefix=_space_prefix(tj) if spm else None,
        chat_template=template,
    )


def metadata(vocab: Vocab) -> dict[str, object]:
    """The `tokenizer.*` keys and values, as they are written to and read back from the file."""
    K = gguf.Keys.Tokenizer
    kv: dict[str, object] = {K.MODEL: vocab.model, K.PRE: vocab.pre, K.LIST: vocab.tokens, K.TOKEN_TYPE: vocab.types}
    if vocab.scores is not None:
        kv[K.SCORES] = vocab.scores
    if vocab.merges:
        kv[K.MERGES] = vocab.merges
    ids = {"bos": K.BOS_ID, "eos": K.EOS_ID, "eot": K.EOT_ID, "unk": K.UNK_ID, "pad": K.PAD_ID}
    kv.update({ids[k]: v for k, v in vocab.special_ids.items()})
    kv[K.ADD_BOS], kv[K.ADD_EOS] = vocab.add_bos, vocab.add_eos
    if vocab.add_space_prefix is not None:
        kv[K.ADD_PREFIX] = vocab.add_space_prefix
    if vocab.chat_template:
        kv[K.CHAT_TEMPLATE] = vocab.chat_template
    return kv


def detokenize(tokens: list[str], model: str, ids: list[int]) -> str:
    """Text of `ids` spelled with the GGUF token list, the way llama.cpp turns tokens back into bytes."""
    if model == "gpt2":
        decoder = {c: b for b, c in _bytes_to_unicode().items()}
        data = bytearray()
        for i in ids:
            text = tokens[i]
            data += bytes(decoder[c] for c in text) if all(c in decoder for c in text) else text.encode()
        return data.decode("utf-8", errors="replace")
    data = bytearray()
    for i in ids:
        text = tokens[i]
        data += bytes([int(text[3:5], 16)]) if BYTE_TOKEN.fullmatch(text) else text.replace(SPACE, " ").encode()
    return data.decode("utf-8", errors="replace")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every byte as one of these)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
