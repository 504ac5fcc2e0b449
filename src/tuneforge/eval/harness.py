"""Optional bridge to lm-evaluation-harness (`pip install lm-eval`) for standard benchmarks on a trained run.

tuneforge does not depend on it: its tasks download their datasets from the Hugging Face Hub, which many
training machines cannot reach. When it is installed, `tuneforge eval RUN --lm-eval hellaswag,arc_easy`
runs those tasks on the in-memory model (adapter applied) and adds their scores to the table.
"""

from __future__ import annotations

import importlib.util

from tuneforge.errors import InputError


class LmEvalMissing(InputError, RuntimeError):
    """lm-eval is not installed."""


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise LmEvalMissing(
            "--lm-eval needs lm-evaluation-harness, which is not installed: pip install lm-eval "
            "(its tasks download datasets from the Hugging Face Hub, so this needs network access)"
        )


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict[str, float]:
    """Scores as {"lm_eval/<task>/<metric>": value}, standard errors left out."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit)["results"]
    out = {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            metric = name.split(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not metric.endswith("_stderr"):
                out[f"lm_eval/{task}/{metric}"] = float(value)
    return out
