"""The tokenizer the data stage tokenizes with: loaded (hub id or directory), or trained on the data.

The data stage saves the tokenizer it used to `<run>/data/tokenizer/`, and every later stage loads it
from there, so training, generation and serving always agree with the prepared data.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import TuneforgeError
from tuneforge.gguf_path import is_gguf, resolve_gguf_path

TRAINED_SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class TokenizerLoadError(TuneforgeError, RuntimeError):
    """The tokenizer could not be loaded; the message says why and what to do."""


def load_pretrained_tokenizer(source: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if is_gguf(source):  # llama.cpp / Ollama file: its vocabulary and chat template
        return _gguf_tokenizer(source)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise TokenizerLoadError(
            f"could not load the tokenizer {source!r}: {e}\n"
            "If this machine cannot reach the Hugging Face Hub, download the model elsewhere "
            "(`hf download ID --local-dir DIR`) and set model.name_or_path (or model.tokenizer) to that directory."
        ) from None
    if tok.pad_token is None:
        # padding positions are never trained (labels are -100 there), so reusing EOS as pad is safe
        tok.pad_token = tok.eos_token
    return tok


def _gguf_tokenizer(source: str) -> PreTrainedTokenizerBase:
    path = resolve_gguf_path(source)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a damaged file raises anything from gguf-py; said with its name
        raise TokenizerLoadError(
            f"could not read the tokenizer of the GGUF file {source} ({type(e).__name__}: "
            f"{str(e)[:200]}); check the file, or set model.tokenizer to a tokenizer "
            "directory"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on `texts`, with ChatML specials and the chatml template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tuneforge.data.templates import BUILTIN_TEMPLATES

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TRAINED_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = BUILTIN_TEMPLATES["chatml"]
    return tok


def build_tokenizer(cfg: ModelConfig, corpus: Iterable[str]) -> PreTrainedTokenizerBase:
    """Load the configured tokenizer, or train one on `corpus` for a new tiny model."""
    source = cfg.tokenizer or cfg.name_or_path
    if source is not None:
        return load_pretrained_tokenizer(source, cfg)
    return train_bpe_tokenizer(corpus, cfg.init.tokenizer_vocab_size)
