"""The `data:` section of a run config: sources, quality filters, deduplication, decontamination, packing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneforge.config.section import Section


# ---------------------------------------------------------------------------- data
class SyntheticConfig(Section):
    """A built-in, generated, verifiable instruction task (see tuneforge.data.synthetic)."""

    task: Literal["reverse_words", "sort_words", "add", "extract_numbers"] = Field(
        "reverse_words",
        description="Which generated task to produce: reverse_words / sort_words / add draw from a "
        "few dozen words or small numbers; extract_numbers lists the numbers of each sentence of `text` (real "
        "writing, an open vocabulary).",
    )
    rows: int = Field(2000, gt=0, description="Number of rows to generate.")
    seed: int = Field(0, description="Generator seed; the same seed gives the same rows.")
    text: str | None = Field(
        None,
        description='extract_numbers: a UTF-8 .txt file (or .jsonl of {"text": ...}) whose distinct '
        "sentences become the rows, one row per sentence.",
    )

    @model_validator(mode="after")
    def _text_for_text_tasks(self) -> SyntheticConfig:
        if self.task == "extract_numbers" and self.text is None:
            raise ValueError(
                "synthetic task extract_numbers needs `text`: a text file whose sentences it uses "
                "(e.g. ../shared/data/text/wiki_demo.txt)"
            )
        if self.task != "extract_numbers" and self.text is not None:
            raise ValueError(f"synthetic task {self.task} generates its own words; `text` is for extract_numbers")
        return self


class DatasetSource(Section):
    path: str | None = Field(
        None,
        description="A .json/.jsonl/.csv/.parquet file, a directory saved with datasets' save_to_disk, "
        "or a directory of such files.",
    )
    synthetic: SyntheticConfig | None = Field(None, description="Generate a built-in task instead of reading a file.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "completion", "preference", "kto"] = Field(
        "auto",
        description="Row layout: alpaca (instruction/input/output), messages (role/content list), "
        "sharegpt (conversations of from/value), completion (raw text); preference pairs ({prompt, chosen, "
        "rejected}, {conversations, chosen, rejected}, or {chosen, rejected} transcripts sharing their prompt), "
        "kto ({messages, label}: unpaired rows, label true = desirable). auto detects it from the columns. "
        "All sources of a run are of one kind: SFT, preference or KTO.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map tuneforge's field names to yours, e.g. {instruction: question, output: answer}. "
        "Fields: instruction, input, output, system, messages, conversations, text, prompt, chosen, rejected, label.",
    )
    split: str = Field("train", description="Split to use when `path` is a DatasetDict directory.")
    max_rows: int | None = Field(None, gt=0, description="Read at most this many rows (first N).")
    samples: int | None = Field(
        None,
        gt=0,
        description="Mixing: train on exactly this many rows of this source after filtering and deduplication: "
        "a seeded sample when fewer than available, whole repeats plus a sample when more (upsampling).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSource:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of `path` (a data file or directory) or `synthetic` (a built-in task)")
        return self


class QualityConfig(Section):
    """Row filters applied before tokenization; each reports how many rows it removed, with examples."""

    min_response_chars: int = Field(
        1,
        ge=0,
        description="Drop rows whose trained text (response) is shorter; 1 drops empty/whitespace-only responses.",
    )
    max_response_chars: int | None = Field(
        None, gt=0, description="Drop rows whose response is longer than this many characters."
    )
    min_prompt_chars: int = Field(0, ge=0, description="Drop chat rows whose prompt (system + user turns) is shorter.")
    max_repeated_line_frac: float | None = Field(
        0.5,
        gt=0,
        le=1,
        description="Drop rows where more than this fraction of non-empty lines are repeats of earlier lines.",
    )
    max_repeated_ngram_frac: float | None = Field(
        0.6,
        gt=0,
        le=1,
        description="Drop rows where more than this fraction of word 3-grams are repeats (degenerate loops).",
    )
    max_garbage_char_frac: float | None = Field(
        0.2,
        gt=0,
        le=1,
        description="Drop rows where more than this fraction of characters are control/unprintable or U+FFFD.",
    )
    score_column: str | None = Field(
        None, description="A numeric column of your data to threshold on (e.g. quality_score)."
    )
    min_score: float | None = Field(
        None, description="Keep rows with score_column > min_score (rows without a score are dropped)."
    )
    min_tokens: int = Field(2, ge=1, description="Drop rows shorter than this many tokens after tokenization.")


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop exact duplicates after normalising case, whitespace and punctuation.")
    near: bool = Field(False, description="Drop near-duplicates found with MinHash LSH (datasketch).")
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Estimated Jaccard similarity at or above which rows are near-duplicates."
    )
    shingle_words: int = Field(3, ge=1, description="Word n-gram size of the MinHash shingles.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (more = more accurate, slower).")
    fields: Literal["prompt", "response", "all"] = Field(
        "all", description="What is compared: the prompt (system + user turns), the response, or both."
    )


class DecontamConfig(Section):
    against_eval: bool = Field(True, description="Drop training rows that share an n-gram with the eval split.")
    files: list[str] = Field(
        default_factory=list, description="Benchmark files (json/jsonl/csv/parquet); every string field is used."
    )
    ngram: int = Field(13, ge=3, description="Word n-gram length; texts shorter than this are compared whole.")
    shared_ngram_fraction: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="An n-gram found in more than this share of the reference texts (and in at "
        "least 5) is a shared template, e.g. an instruction every row repeats, and is ignored; 1.0 ignores none.",
    )


class DataConfig(Section):
    train: list[DatasetSource] = Field(..., min_length=1, description="Training sources, concatenated in order.")
    eval: DatasetSource | None = Field(None, description="Held-out evaluation source; else see eval_fraction.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of training rows held out for evaluation when `eval` is not set."
    )
    chat_template: str = Field(
        "auto",
        description="auto = the tokenizer's own chat template, else the built-in alpaca template; "
        "or a built-in name (alpaca, chatml, chatml-tools), or a path to a .jinja file.",
    )
    train_on: Literal["assistant", "last", "all"] = Field(
        "assistant",
        description="Where loss is taken: every assistant turn (+ its end-of-turn token), only the last "
        "assistant turn, or every token.",
    )
    max_seq_len: int = Field(1024, gt=8, description="Longest tokenized row, in tokens.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with a row longer than max_seq_len: cut it at the end, or drop it."
    )
    num_proc: int = Field(
        1,
        ge=1,
        description="Worker processes for quality filters and dedup hashes (>1), and for tokenization from 4 up "
        "(below 4, one process tokenizes with the Rust tokenizer on every core, which measured faster).",
    )
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Quality filters.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near-duplicate removal.")
    decontaminate: DecontamConfig = Field(
        default_factory=DecontamConfig, description="Removal of training rows that overlap eval data or benchmarks."
    )
    packing: bool = Field(
        False,
        description="Pack tokenized samples into rows of max_seq_len (best-fit decreasing); samples never attend "
        "to each other.",
    )
    skip_invalid: bool = Field(
        False,
        description="Skip malformed rows (unreadable lines, fields of the wrong type or missing, rows of "
        "another format than their source's, rows the chat template refuses), counted with reasons and file:line "
        "in the report, instead of failing on the first one.",
    )
    max_invalid_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="With skip_invalid: stop with an error when more than this share of one "
        "source's rows are invalid (most likely the wrong format or columns, not a few bad rows); 1.0 never stops.",
    )
    seed: int = Field(42, description="Seed of the train/eval split.")
    streaming: bool = Field(
        False,
        description="Read raw-text (completion) sources as a stream, chunk by chunk, for corpora larger than "
        "memory: quality filters, exact dedup, decontamination, tokenization and packing (within each chunk) never "
        "hold the corpus in memory. Needs data.eval (a file) for held-out rows.",
    )
    stream_chunk_rows: int = Field(
        10_000, ge=100, description="Rows per chunk with data.streaming (also the packing window)."
    )

    @model_validator(mode="after")
    def _pairs_not_packed(self) -> DataConfig:
        pairs = [
            s.path for s in [*self.train, *([self.eval] if self.eval else [])] if s.format in ("preference", "kto")
        ]
        if pairs and self.packing:
            raise ValueError(
                f"data.packing: true cannot pack preference or KTO data ({', '.join(map(str, pairs))}): a pair is "
                "never split, and tuneforge does not pack pairs; set data.packing: false"
            )
        if pairs and self.streaming:
            raise ValueError("data.streaming: true reads raw-text (completion) sources only; set data.streaming: false")
        return self

    @model_validator(mode="after")
    def _streamable(self) -> DataConfig:
        if not self.streaming:
            return self
        refused = [
            why
            for why, bad in (
                ("data.dedup.near (near-duplicates are found across the whole corpus)", self.dedup.near),
                ("data.eval_fraction (a split needs the whole corpus; give data.eval instead)", self.eval_fraction > 0),
                ("per-source `samples` (mixing needs each source's size)", any(s.samples for s in self.train)),
                ("`synthetic` sources (nothing to stream)", any(s.synthetic for s in self.train)),
            )
            if bad
        ]
        if refused:
            raise ValueError(
                "data.streaming=true cannot be combined with "
                + "; ".join(refused)
                + ". Set data.streaming=false, or drop those settings"
            )
        return self
