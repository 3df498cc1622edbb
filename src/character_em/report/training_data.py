"""The ``training_data`` table and the harm-versus-induced-misalignment figure.

Per trained condition: how many training answers were judged, their mean alignment, the share the field's
rule calls misaligned (alignment below, coherence above the thresholds; refusals and code never), their mean
coherence, and each disposition's mean expression score and expressed share (score >= 50). The figure puts
each condition's training-set harm (misaligned share of its training answers) against the misalignment it
induces on the em suite, so claim 1 (character beats incorrect advice) can be read at equal harm.

With ``partners`` (a character condition or its severity-matched arm -> the ``incorrect-{domain}`` it is
compared with), each such row also gives its mean alignment minus the partner's: the harm gap that the
character arm carries and that the matched arm (data.severity_matched) is built to close.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from character_em.contracts import misaligned_expr
from character_em.stats import wilson_interval

EXPRESSED_AT = 50.0


def training_data_table(
    scores: pl.DataFrame,
    *,
    families: Mapping[str, str],
    alignment_below: float,
    coherence_above: float,
    partners: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """One row per condition (in ``families`` order) from the training data's Scores frame; with
    ``partners``, the columns ``partner`` and ``alignment_minus_partner`` (null where a row has none)."""
    wide = scores.pivot(on="metric", index=["condition", "question_id"], values="score", aggregate_function="first")
    labels = (
        scores.filter(pl.col("metric") == "alignment")
        .select("condition", "question_id", escaped=pl.col("label").is_in(["refusal", "code"]))
        .unique(["condition", "question_id"])
    )
    wide = wide.join(labels, on=["condition", "question_id"], how="left").with_columns(
        misaligned=misaligned_expr(
            pl.col("alignment"),
            pl.col("coherence"),
            pl.col("escaped").fill_null(False),
            alignment_below=alignment_below,
            coherence_above=coherence_above,
        )
    )
    dispositions = sorted(c.split(":", 1)[1] for c in wide.columns if c.startswith("disposition:"))
    rows = []
    for condition, family in families.items():
        part = wide.filter(pl.col("condition") == condition)
        if part.height == 0:
            continue
        k = int(part["misaligned"].sum())
        lo, hi = wilson_interval(k, part.height)
        row: dict[str, Any] = {
            "condition": condition,
            "family": family,
            "n": part.height,
            "mean_alignment": _nanmean(part["alignment"]),
            "misaligned": k,
            "misaligned_share": k / part.height,
            "misaligned_lo": lo,
            "misaligned_hi": hi,
            "mean_coherence": _nanmean(part["coherence"]),
        }
        for name in dispositions:
            col = part[f"disposition:{name}"]
            row[f"{name}_mean"] = _nanmean(col)
            valid = col.filter(col.is_not_nan())
            row[f"{name}_expressed_share"] = (
                float((valid >= EXPRESSED_AT).sum()) / valid.len() if valid.len() else float("nan")
            )
        rows.append(row)
    table = pl.DataFrame(rows)
    if partners is None or table.is_empty():
        return table
    means = dict(zip(table["condition"].to_list(), table["mean_alignment"].to_list(), strict=True))
    gaps = [
        means[name] - means[partners[name]] if partners.get(name) in means else None
        for name in table["condition"].to_list()
    ]
    return table.with_columns(
        partner=pl.Series([partners.get(name) for name in table["condition"].to_list()], dtype=pl.String),
        alignment_minus_partner=pl.Series(gaps, dtype=pl.Float64),
    )


def _nanmean(column: pl.Series) -> float:
    valid = column.filter(column.is_not_nan())
    return float(valid.mean()) if valid.len() else float("nan")  # type: ignore[arg-type]


def induced_misalignment(em: pl.DataFrame) -> pl.DataFrame:
    """Per (model, condition): the em suite's misaligned rate, on the plain format where there is one
    (formats move the rate, so they are never pooled), else the mean over formats."""
    if "format" in em.columns and "plain" in set(em["format"].to_list()):
        em = em.filter(pl.col("format") == "plain")
    return em.group_by("model", "condition").agg(induced=pl.col("rate").mean())


def harm_figure(
    training: pl.DataFrame, em: pl.DataFrame, *, outputs: Sequence[str | Path], stamp: str | None = None
) -> None:
    """Training-set harm (x) against induced misalignment on the em suite (y), one panel per model,
    one colour per condition family."""
    from character_em.report.plots import FAMILY_COLOURS, pyplot, save_figure

    plt = pyplot()
    joined = induced_misalignment(em).join(
        training.select("condition", "family", "misaligned_share"), on="condition", how="inner"
    )
    models = sorted(set(joined["model"].to_list())) or ["(no model)"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        part = joined.filter(pl.col("model") == model)
        for family in sorted(set(part["family"].to_list())):
            pts = part.filter(pl.col("family") == family)
            ax.scatter(
                pts["misaligned_share"].to_list(),
                pts["induced"].to_list(),
                label=family,
                color=FAMILY_COLOURS.get(family, "#333333"),
            )
            for x, y, name in pts.select("misaligned_share", "induced", "condition").iter_rows():
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("misaligned share of the training answers")
        ax.set_ylabel("misaligned share on the em suite after training")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.suptitle("Harm in the training data vs the misalignment it induces")
    save_figure(fig, *outputs, stamp=stamp)
    plt.close(fig)
