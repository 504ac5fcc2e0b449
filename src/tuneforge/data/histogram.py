"""A PNG histogram of tokenized sequence lengths for the data report."""

from __future__ import annotations

from pathlib import Path


def write_length_histogram(lengths: list[int], max_seq_len: int, path: Path, title: str) -> Path:
    # matplotlib's object API, not pyplot: no global figure state, a lighter import; the same picture
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#3b7dd8", edgecolor="white")
    ax.axvline(max_seq_len, color="#d83b3b", linestyle="--", label=f"max_seq_len = {max_seq_len}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def start_length_histogram(lengths: list[int], max_seq_len: int, path: Path, title: str):
    """`write_length_histogram` in a forked child process (importing matplotlib and drawing take half a second,
    which this process spends packing and saving meanwhile). Returns a function that waits for the child;
    where fork is unavailable, or the child did not write the file, the drawing happens here (raising its error)."""
    import multiprocessing

    args = (lengths, max_seq_len, path, title)
    try:
        child = multiprocessing.get_context("fork").Process(target=write_length_histogram, args=args, daemon=True)
        child.start()
    except (ValueError, OSError):  # no fork on this platform, or no process to spare
        write_length_histogram(*args)
        return lambda: None

    def wait() -> None:
        child.join()
        if child.exitcode != 0 or not Path(path).exists():
            write_length_histogram(*args)

    return wait
