"""Plots, report.md / report.html and `compare`, on run directories written by hand (no training needed)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import yaml

from tuneforge.cli import main
from tuneforge.eval.compare import final_metrics
from tuneforge.eval.plots import eval_tokens_axis, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir: Path, losses: list[float], memory: bool = True) -> Path:
    """A run directory as `tuneforge train` leaves it: 10 steps per logged loss, evals at 0 and the end."""
    run_dir.mkdir(parents=True)
    (run_dir / "data").mkdir()
    steps = [10 * (i + 1) for i in range(len(losses))]
    lines = [{"type": "eval", "step": 0, "eval_loss": 3.0, "eval_ppl": 20.09, "eval_tokens": 50, "exact_match": 0.0}]
    for step, loss in zip(steps, losses):
        rec = {
            "type": "train",
            "step": step,
            "loss": loss,
            "lr": 1e-3 / step,
            "tokens_per_s": 1000.0,
            "trained_tokens_per_s": 250.0,
            "tokens_total": 400 * step,
            "trained_tokens_total": 100 * step,
        }
        if memory:
            rec["peak_mem_gb"] = 1.5
        lines.append(rec)
    lines += [
        {"type": "checkpoint", "step": steps[-1], "path": "x"},
        {"type": "eval", "step": steps[-1], "eval_loss": 1.5, "eval_ppl": 4.48, "eval_tokens": 50},
        {"type": "eval", "step": steps[-1], "eval_loss": 1.5, "eval_ppl": 4.48, "eval_tokens": 50, "exact_match": 0.25},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"type": "tra')  # cut line
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(
            {"model": {"name_or_path": "org/tiny-model"}, "adapter": {"type": "lora", "r": 8}, "train": {"lr": 1e-3}}
        )
    )
    (run_dir / "run_summary.json").write_text(
        json.dumps(
            {
                "before": {"eval_loss": 3.0, "eval_ppl": 20.09, "eval_tokens": 50, "exact_match": 0.0},
                "after": {"eval_loss": 1.5, "eval_ppl": 4.48, "eval_tokens": 50, "exact_match": 0.25},
                "steps": steps[-1],
                "wall_s": 12.5,
                "tokens": 400 * steps[-1],
                "trained_tokens": 100 * steps[-1],
                "tokens_per_s": 960.0,
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "best_step": steps[-1],
                "eval_loss": 1.5,
                "eval_ppl": 4.48,
                "samples": [{"prompt": "Reverse: a b", "reference": "b a", "generated": "b | a"}],
            }
        )
    )
    (run_dir / "data" / "data_report.json").write_text(
        json.dumps(
            {
                "rows_read": 120,
                "chat_template": "tokenizer",
                "train_on": "assistant",
                "dedup": {"exact_removed": 3},
                "train": {
                    "rows": 100,
                    "tokens": 4000,
                    "trained_tokens": 1000,
                    "trained_fraction": 0.25,
                    "length": {"min": 30, "median": 40, "p95": 48, "max": 50},
                },
                "eval": {"rows": 17, "tokens": 680},
                "seconds": {"read": 0.5, "tokenize": 1.0},
            }
        )
    )
    return run_dir


def test_eval_records_get_the_tokens_seen_at_their_step():
    records = [
        {"type": "eval", "step": 0},
        {"type": "train", "step": 10, "tokens_total": 400},
        {"type": "train", "step": 20, "tokens_total": 800},
        {"type": "eval", "step": 20},
        {"type": "eval", "step": 25},
    ]
    assert [r["tokens_total"] for r in eval_tokens_axis(records)] == [0, 800, 800]


def test_report_writes_plots_markdown_and_self_contained_html(tmp_path, capsys):
    run = fake_run(tmp_path / "run-a", [2.5, 2.0, 1.75])
    assert len(read_metrics(run / "metrics.jsonl")) == 7  # the line cut short is skipped
    assert main(["report", str(run)]) == 0
    assert "report.md" in capsys.readouterr().out
    names = ["loss_vs_step", "loss_vs_tokens", "lr", "throughput", "memory"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(f"{n}.png" for n in names)
    for n in names:
        assert (run / "plots" / f"{n}.png").read_bytes()[:8] == PNG

    md = (run / "report.md").read_text()
    assert md.startswith("# Run report: run-a\n")
    for line in [
        "| model | org/tiny-model |",
        "| fine-tuning | lora (r=8) |",
        "| steps | 30 |",
        "| train loss (first -> last) | 2.5 -> 1.75 |",
        "| eval loss / perplexity | 1.5 / 4.48 |",
        "| wall time (training) | 12.5 s |",
        "| data preparation | 1.5 s |",
        "| tokens (trained) | 12,000 (3,000) |",
        "| eval_loss | 3 | 1.5 | -1.5 |",
        "| exact_match | 0 | 0.25 | +0.25 |",
        "| Reverse: a b | b a | b \\| a |",
        "| rows | 100 | 17 |",
        "| length p95 | 48 | - |",
        "![Loss vs optimizer step](plots/loss_vs_step.png)",
        "![Peak memory](plots/memory.png)",
        "  r: 8",
    ]:
        assert line in md, line
    assert "eval_tokens" not in md  # a count, not a metric to compare

    page = (run / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5 and "src='plots/" not in page
    assert base64.b64decode(images[0]) == (run / "plots" / "loss_vs_step.png").read_bytes()
    assert "<td>b | a</td>" in page and "<h2>Sample generations</h2>" in page


def test_report_leaves_out_plots_of_metrics_never_logged(tmp_path):
    run = fake_run(tmp_path / "cpu-run", [2.0, 1.0], memory=False)
    assert main(["report", str(run)]) == 0
    assert not (run / "plots" / "memory.png").exists() and (run / "plots" / "lr.png").exists()
    assert "Peak memory" not in (run / "report.md").read_text()


def test_report_of_a_missing_directory_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_compare_prints_final_metrics_and_overlays_loss_curves(tmp_path, capsys):
    a = fake_run(tmp_path / "run-a", [2.5, 2.0, 1.75])
    b = fake_run(tmp_path / "run-b", [2.4, 1.25])
    assert final_metrics(b) == {
        "steps": 20,
        "train_loss": 1.25,
        "tokens": 8000,
        "tokens_per_s": 960.0,
        "eval_loss": 1.5,
        "eval_ppl": 4.48,
        "exact_match": 0.25,
        "wall_s": 12.5,
    }
    out_png = tmp_path / "cmp" / "loss.png"
    assert main(["compare", str(a), str(b), "--out", str(out_png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run",
        "steps",
        "train_loss",
        "eval_loss",
        "eval_ppl",
        "exact_match",
        "tokens",
        "tokens_per_s",
        "wall_s",
    ]
    assert lines[1].split() == ["run-a", "30", "1.75", "1.5", "4.48", "0.25", "12,000", "960", "12.5"]
    assert lines[2].split() == ["run-b", "20", "1.25", "1.5", "4.48", "0.25", "8,000", "960", "12.5"]
    assert out_png.read_bytes()[:8] == PNG


def test_compare_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    a = fake_run(tmp_path / "run-a", [2.0])
    assert main(["compare", str(a), str(tmp_path)]) == 2
    assert f"{tmp_path}: no metrics.jsonl" in capsys.readouterr().err


def test_a_grpo_runs_report_plots_rewards_lengths_policy_and_time(tmp_path):
    from tuneforge.eval.plots import plot_run

    records = [{"type": "eval", "step": 0, "eval_reward": 0.1, "eval_pass@1": 0.05}]
    for step in range(1, 6):
        records.append(
            {
                "type": "train",
                "step": step,
                "loss": 0.01,
                "lr": 1e-5,
                "reward": 0.1 * step,
                "reward_std": 0.3,
                "rewards/numeric": 0.1 * step,
                "rewards/numeric_std": 0.3,
                "rewards/length": -0.01,
                "rewards/length_std": 0.0,
                "completion_len": 12.0,
                "completion_len_max": 32.0,
                "kl": 0.0,
                "clip_fraction": 0.01,
                "entropy": 0.8,
                "groups_all_equal": 0.5,
                "rollout_s": 3.0,
                "update_s": 1.0,
            }
        )
    records.append({"type": "eval", "step": 5, "eval_reward": 0.6, "eval_pass@1": 0.55})
    drawn = plot_run(records, tmp_path / "plots", "grpo")
    grpo = ["rewards", "completion_length", "policy", "rollout_time"]
    assert list(drawn)[-4:] == grpo
    for name in grpo:
        assert drawn[name].read_bytes()[:8] == PNG
    # an SFT run draws none of them
    assert not set(grpo) & set(plot_run([r for r in records if "reward" not in r], tmp_path / "sft"))
