"""The printed summary of a data report (data_report.json): rows read and dropped, tokens, lengths, packing;
pairs and their tokens for preference data, desirable and undesirable rows for KTO data."""

from __future__ import annotations

from tuneforge.data.preference import prepared_kind


def summary(report: dict) -> str:
    kind = prepared_kind(report)
    lines = [
        f"data: {kind} data, template={report['chat_template']} train_on={report['train_on']} "
        f"max_seq_len={report['max_seq_len']}"
    ]
    if "rows_read" in report:
        inv, q, dd, dc = report["invalid"], report["quality"], report["dedup"], report["decontamination"]
        read = report["rows_read"] + inv["skipped"] - inv.get("template", 0)  # refused rows were read (and valid)
        lines.append(f"  read {read} rows; skipped invalid: {inv['skipped']} {inv['reasons'] or ''}")
        lines.append(
            "  sources: "
            + "; ".join(
                f"{x['source']} {x['rows_read']} read -> {x.get('rows_trained', '?')} trained"
                for x in report["sources"]
                if "rows_trained" in x
            )
        )
        lines.append("  quality filters removed: " + (", ".join(f"{k} {v['removed']}" for k, v in q.items()) or "none"))
        lines.append(
            f"  duplicates removed: exact {dd['exact_removed']}, near {dd['near_removed']}; "
            f"contaminated rows removed: {dc['removed']}"
        )
    for split in ("train", "eval"):
        r = report.get(split)
        if r:
            ln = r["length"]
            if kind != "sft":
                lines.append(_pairs_line(split, r, kind))
                continue
            lines.append(
                f"  {split}: {r['rows']} rows ({r['rows_in']} in), {r['tokens']} tokens, {r['trained_tokens']} trained "
                f"({100 * r['trained_fraction']:.0f}%), {r['truncated_rows']} truncated, "
                f"{r['dropped_overlong_rows']} dropped "
                f"as too long, {r['dropped_short_or_untrained_rows']} dropped as too short or with nothing to train; "
                f"length min/median/p95/max {ln['min']}/{ln['median']}/{ln['p95']}/{ln['max']}"
            )
            if "packing" in r:
                pk = r["packing"]
                lines.append(
                    f"  packing: {pk['samples']} samples -> {pk['rows']} rows; "
                    f"efficiency {100 * pk['efficiency']:.1f}% "
                    f"(unpacked, padded to max_seq_len: {100 * pk['efficiency_unpacked']:.1f}%)"
                )
    if report.get("seconds"):
        lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def _pairs_line(split: str, r: dict, kind: str) -> str:
    """The summary line of a split of preference pairs or KTO rows."""
    ln = r["length"]
    what = (
        f"{r['pairs']} pairs ({r['rows_in']} in), {r['chosen_tokens']} chosen + {r['rejected_tokens']} rejected tokens"
        if kind == "preference"
        else f"{r['rows']} rows ({r['rows_in']} in; {r['desirable']} desirable, {r['undesirable']} undesirable), "
        f"{r['trained_tokens']} completion tokens"
    )
    return (
        f"  {split}: {what}, {r['prompt_tokens']} prompt tokens (once per row), {r['tokens']} tokens in all; "
        f"{r['truncated_rows']} truncated, {r['dropped_overlong_rows']} dropped as too long, "
        f"{r['dropped_short_or_untrained_rows']} dropped as too short; longest sequence per row "
        f"min/median/p95/max {ln['min']}/{ln['median']}/{ln['p95']}/{ln['max']}"
    )
