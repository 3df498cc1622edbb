"""The exact audit of first-token verdicts: how far the one-pass score of a judge whose tokenizer spells
0..100 as single tokens is from the exact definition (every reply a whole token sequence ended by an
end-of-turn token), on the seeded random subsample that each wave's judge job scored both ways
(``judge.core.score_wave``, ``judge.audit_fraction``).

The two definitions differ by design, not by error: first-token scoring leaves out the probability that the
judge ends its turn after the number. The table measures that difference on the grid's own answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import polars as pl

__all__ = ["AUDIT_TABLE_COLUMNS", "audit_table", "audit_markdown"]

AUDIT_TABLE_COLUMNS = [
    "judge_backend",
    "judge_model",
    "metric",
    "n",
    "n_scored",
    "max_abs_diff",
    "mean_abs_diff",
    "label_agreement",
]


def audit_table(audits: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """One row per (judge, metric) and one per judge over every metric ("all"): audited verdicts ``n``;
    ``n_scored`` of them with a score on both sides; the largest and mean |first-token - exact| over
    those; and the share of the ``n`` whose label (ok, refusal, code, invalid) is the same."""
    frames = [a for a in audits if a.height]
    if not frames:
        return pl.DataFrame(schema=dict.fromkeys(AUDIT_TABLE_COLUMNS, pl.Utf8)).cast(
            {"n": pl.Int64, "n_scored": pl.Int64, "max_abs_diff": pl.Float64, "mean_abs_diff": pl.Float64}
            | {"label_agreement": pl.Float64}
        )
    rows = pl.concat(frames, how="diagonal_relaxed").with_columns(
        pl.when(pl.col("score_first_token").is_nan() | pl.col("score_exact").is_nan())
        .then(None)
        .otherwise((pl.col("score_first_token") - pl.col("score_exact")).abs())
        .alias("abs_diff"),
        (pl.col("label_first_token") == pl.col("label_exact")).alias("same_label"),
    )
    everything = rows.with_columns(pl.lit("all").alias("metric"))
    out = (
        pl.concat([rows, everything])
        .group_by(["judge_backend", "judge_model", "metric"], maintain_order=True)
        .agg(
            pl.len().alias("n"),
            pl.col("abs_diff").drop_nulls().len().alias("n_scored"),
            pl.col("abs_diff").max().alias("max_abs_diff"),
            pl.col("abs_diff").mean().alias("mean_abs_diff"),
            pl.col("same_label").mean().alias("label_agreement"),
        )
        .sort(["judge_backend", "judge_model", pl.col("metric") == "all", "metric"])
    )
    return out.select(AUDIT_TABLE_COLUMNS).cast({"n": pl.Int64, "n_scored": pl.Int64})


def audit_markdown(table: pl.DataFrame, fraction: float) -> str:
    judges = sorted({f"{b} · {m}" for b, m in zip(table["judge_backend"], table["judge_model"], strict=True)})
    head = f"Judge: {', '.join(judges)}" if judges else "Judge: none audited"
    lines = [
        head,
        "",
        "# Exact audit of first-token verdicts",
        "",
        f"A seeded random {fraction:.1%} of the first-token verdicts of every judge job, scored again by the exact",
        "definition on the same engine. |diff|: first-token score minus exact score, over verdicts scored on",
        "both sides; label agreement over all audited verdicts.",
        "",
    ]
    if table.is_empty():
        lines.append(
            "Nothing to audit: the judge scored every verdict exactly (its tokenizer splits numbers, or "
            "judge.scoring is exact), or judge.audit_fraction drew no verdict."
        )
        return "\n".join(lines) + "\n"
    lines += [
        "| judge | metric | n | scored both ways | max abs diff | mean abs diff | label agreement |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in table.iter_rows(named=True):
        lines.append(
            f"| {row['judge_backend']} · {row['judge_model']} | {row['metric']} | {row['n']:,} | {row['n_scored']:,} "
            f"| {_num(row['max_abs_diff'])} | {_num(row['mean_abs_diff'])} | {row['label_agreement']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"
