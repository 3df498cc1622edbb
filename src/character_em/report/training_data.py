"""The ``training_data`` table and the harm-versus-induced-misalignment figure.

Per trained condition: how many training answers were judged, their mean alignment, the share the field's
rule calls misaligned (alignment below, coherence above the thresholds; refusals and code never), their mean
coherence, and each disposition's mean expression score and expressed share (score >= 50). The figure puts
each condition's training-set harm (misaligned share of its training answers) against the misalignment it
induces on the em suite, so claim 1 (character beats incorrect advice) can be read at equal harm.

With ``partners`` (a character condition or its severity-matched arm -> the ``incorrect-{domain}`` it is
compared with), each such row also gives the harm gap that is left: the mean judged alignment of the
examples the arm trained on minus that of its partner's, with a 95% interval. The examples trained on are
each training seed's draw (``data.pairing.training_draw``), each seed weighted equally; a line in several
seeds' draws counts for each. Where both sides trained on the same user turns (a character arm and its
incorrect-advice partner: rule select_data pairs them), the gap is a paired difference per turn; the
severity-matched arm is matched on harm rather than paired by turn, so its gap is the difference of two
independent means. The interval treats each training line (each turn, when paired) as the unit, with the
variance of a weighted mean; it describes the training sets, not a population of writers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from character_em.contracts import misaligned_expr
from character_em.data.audit import example_index
from character_em.data.pairing import training_draw
from character_em.stats import wilson_interval

EXPRESSED_AT = 50.0


Z_95 = 1.959963984540054  # the normal 97.5% quantile: 95% intervals


def training_data_table(
    scores: pl.DataFrame,
    *,
    families: Mapping[str, str],
    alignment_below: float,
    coherence_above: float,
    partners: Mapping[str, str] | None = None,
    manifests: Mapping[str, Mapping[str, Any]] | None = None,
    seeds: Sequence[int] = (0,),
    redraw_per_seed: bool = True,
) -> pl.DataFrame:
    """One row per condition (in ``families`` order) from the training data's Scores frame.

    The descriptive columns cover every judged line of each ``train.jsonl``. With ``partners``, the columns
    ``partner``, ``alignment_minus_partner`` with ``_lo`` and ``_hi`` (its 95% interval), ``gap_pairing``
    (``turns`` or ``independent``) and ``n_trained`` (examples per seed), null where a row has none. The gap
    is taken over what each seed trained on when ``manifests`` (condition -> its train.jsonl manifest) are
    given, with ``seeds`` and ``redraw_per_seed`` as in training; without them, over every judged line."""
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
    sets = {name: _trained_set(scores, name, (manifests or {}).get(name), seeds, redraw_per_seed) for name in families}
    columns: dict[str, list[Any]] = {k: [] for k in ("partner", "gap", "lo", "hi", "pairing", "n_trained")}
    for name in table["condition"].to_list():
        partner = partners.get(name)
        gap = harm_gap(sets[name], sets[partner]) if partner in sets else None
        columns["partner"].append(partner)
        columns["gap"].append(gap["estimate"] if gap else None)
        columns["lo"].append(gap["lo"] if gap else None)
        columns["hi"].append(gap["hi"] if gap else None)
        columns["pairing"].append(gap["pairing"] if gap else None)
        columns["n_trained"].append(sets[name]["n_trained"])
    return table.with_columns(
        partner=pl.Series(columns["partner"], dtype=pl.String),
        alignment_minus_partner=pl.Series(columns["gap"], dtype=pl.Float64),
        alignment_minus_partner_lo=pl.Series(columns["lo"], dtype=pl.Float64),
        alignment_minus_partner_hi=pl.Series(columns["hi"], dtype=pl.Float64),
        gap_pairing=pl.Series(columns["pairing"], dtype=pl.String),
        n_trained=pl.Series(columns["n_trained"], dtype=pl.Float64),
    )


def _trained_set(
    scores: pl.DataFrame,
    condition: str,
    manifest: Mapping[str, Any] | None,
    seeds: Sequence[int],
    redraw_per_seed: bool,
) -> dict[str, Any]:
    """A condition's per-line alignment and the lines (with their turns) each seed trained on."""
    rows = scores.filter((pl.col("condition") == condition) & (pl.col("metric") == "alignment"))
    alignment: dict[int, float] = {}
    for question_id, score in rows.select("question_id", "score").iter_rows():
        line = example_index(question_id, condition)
        if line is not None:
            alignment[line] = math.nan if score is None else float(score)
    if manifest is None:
        draws = [{"lines": sorted(alignment), "turns": None}]
    else:
        draws = [training_draw(manifest, seed=seed, redraw_per_seed=redraw_per_seed) for seed in seeds]
    n_trained = float(np.mean([len(d["lines"]) for d in draws])) if draws else None
    return {"alignment": alignment, "draws": draws, "n_trained": n_trained}


def harm_gap(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mean judged alignment of what ``a`` trained on minus ``b``'s, each seed weighted equally, with a 95%
    normal interval from the variance of a weighted mean over lines (``_trained_set``'s dicts).

    Paired by turn when every seed's draws of ``a`` and ``b`` hold the same turns; else independent. Lines
    the judge gave no number (refusals, code) are left out, on both sides of a pair. None when a side has
    no scored line."""
    turns_a = [d.get("turns") for d in a["draws"]]
    turns_b = [d.get("turns") for d in b["draws"]]
    paired = (
        len(turns_a) == len(turns_b)
        and all(ta is not None and tb is not None for ta, tb in zip(turns_a, turns_b, strict=True))
        and all(sorted(ta) == sorted(tb) for ta, tb in zip(turns_a, turns_b, strict=True))  # type: ignore[type-var]
    )
    if paired:
        values: list[dict[Any, float]] = []
        for draw_a, draw_b in zip(a["draws"], b["draws"], strict=True):
            by_turn_b = dict(zip(draw_b["turns"], draw_b["lines"], strict=True))
            diffs = {}
            for turn, line in zip(draw_a["turns"], draw_a["lines"], strict=True):
                x, y = a["alignment"].get(line, math.nan), b["alignment"].get(by_turn_b[turn], math.nan)
                if not (math.isnan(x) or math.isnan(y)):
                    diffs[turn] = x - y
            values.append(diffs)
        estimate, variance = _weighted_mean(values)
        pairing = "turns"
    else:
        mean_a, var_a = _weighted_mean([_scored(a, draw) for draw in a["draws"]])
        mean_b, var_b = _weighted_mean([_scored(b, draw) for draw in b["draws"]])
        estimate, variance = mean_a - mean_b, var_a + var_b
        pairing = "independent"
    if math.isnan(estimate):
        return None
    half = Z_95 * math.sqrt(variance)
    return {"estimate": estimate, "lo": estimate - half, "hi": estimate + half, "pairing": pairing}


def _scored(side: Mapping[str, Any], draw: Mapping[str, Any]) -> dict[Any, float]:
    values = {line: side["alignment"].get(line, math.nan) for line in draw["lines"]}
    return {line: v for line, v in values.items() if not math.isnan(v)}


def _weighted_mean(draws: Sequence[Mapping[Any, float]]) -> tuple[float, float]:
    """The mean over draws of each draw's mean (unit -> value), and its variance with units as
    independent: sum of w^2 (x - mean)^2 with the small-sample factor m / (m - 1)."""
    draws = [d for d in draws if d]
    if not draws:
        return math.nan, math.nan
    weights: dict[Any, float] = {}
    value: dict[Any, float] = {}
    for draw in draws:
        for unit, x in draw.items():
            weights[unit] = weights.get(unit, 0.0) + 1.0 / (len(draw) * len(draws))
            value[unit] = x
    w = np.array(list(weights.values()))
    x = np.array([value[u] for u in weights])
    mean = float(np.sum(w * x))
    m = len(w)
    variance = float(np.sum(w**2 * (x - mean) ** 2)) * (m / (m - 1) if m > 1 else math.nan)
    return mean, variance


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
    if stamp:
        fig.text(0.0, -0.02, stamp, fontsize=6, ha="left", va="top")
    fig.suptitle("Harm in the training data vs the misalignment it induces")
    save_figure(fig, *outputs)
    plt.close(fig)
