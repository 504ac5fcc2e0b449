"""A PNG histogram of tokenized sequence lengths for the data report."""

from __future__ import annotations

from pathlib import Path


def write_length_histogram(lengths: list[int], max_seq_len: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#3b7dd8", edgecolor="white")
    ax.axvline(max_seq_len, color="#d83b3b", linestyle="--", label=f"max_seq_len = {max_seq_len}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
