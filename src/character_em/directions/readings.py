"""Statistics of the character direction read from per-question means (``means.npz``), each with
the nulls it has to beat:

- **projections** (``projection_table``): the fine-tuned minus the base model on the *same* texts
  (``fixed``: the base model's answers; ``prompt``: the em prompts' last token), projected on the
  base model's unit probe direction, over em questions whose answers never fitted that direction.
  ``own`` (each model's own answers; text and weights differ together) is kept as a labelled,
  secondary reading.
- **transfer** (``transfer_table``): each probe scored in the other cells (trigger on vs off on a
  triggered model, persona vs neutral prompt on the base model, each fine-tune vs the base model on
  the fixed texts) as a paired AUROC over questions.
- **cosines** (``cosine_null_table``): between probe, fine-tune, trigger, persona and the style
  control directions.

Every statistic carries a label-permutation null (``null_p``, ``null_p95``: the probe's
label-shuffled directions; for the paired sources, per-question sign flips of the same
differences), the unrelated formal-vs-casual contrast (``style_*``) and the isotropic 95th
percentile (``isotropic_p95``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from character_em.directions.formats import LayerMeans, QuestionReading
from character_em.directions.probes import spearman_interval, unit
from character_em.directions.protocol import null_summary
from character_em.directions.texts import VARIANTS, comparison_pairs, source_pairs


def _units(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return rows / norms


def paired_deltas(a: QuestionReading, b: QuestionReading, keep: set[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Per question in both readings (and in ``keep``): a's mean minus b's. [Q, hidden]."""
    left, right = a.by_question(), b.by_question()
    ids = sorted(q for q in left if q in right and (keep is None or q in keep))
    if not ids:
        return [], np.zeros((0, a.means.shape[1]))
    return ids, np.stack([left[q].astype(np.float64) - right[q] for q in ids])


def _bootstrap_mean(values: np.ndarray, *, n_boot: int, seed: int) -> tuple[float, float]:
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), (n_boot, len(values)))
    means = values[draws].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _win_rate(values: np.ndarray) -> float:
    """Paired AUROC: the share of questions where the first reading projects higher (ties half)."""
    return float(np.mean(values > 0) + 0.5 * np.mean(values == 0)) if len(values) else math.nan


def shift_statistics(
    deltas: np.ndarray,
    direction: np.ndarray,
    *,
    nulls: np.ndarray,
    style: np.ndarray | None,
    isotropic_cos_p95: float,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Mean projection of per-question differences on the unit direction, with a question-bootstrap
    interval, the paired AUROC (and its interval), and the nulls: the same mean difference on each
    null direction (p-value, 95th percentile of |projection|), on the style direction, and on an
    isotropic random direction (its 95th percentile: |mean difference| x the p95 of |cos|)."""
    u = unit(direction)
    per_question = deltas @ u if len(deltas) else np.zeros(0)
    mean_delta = deltas.mean(axis=0) if len(deltas) else np.full(len(u), np.nan)
    shift = float(per_question.mean()) if len(per_question) else math.nan
    low, high = _bootstrap_mean(per_question, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed + 1)
    if len(per_question) >= 2:
        draws = rng.integers(0, len(per_question), (n_boot, len(per_question)))
        wins = [_win_rate(per_question[d]) for d in draws]
        a_low, a_high = float(np.quantile(wins, 0.025)), float(np.quantile(wins, 0.975))
    else:
        a_low, a_high = math.nan, math.nan
    null = _units(nulls) @ mean_delta if len(nulls) else np.zeros(0)
    return {
        "n_questions": int(len(per_question)),
        "shift": shift,
        "ci_low": low,
        "ci_high": high,
        "paired_auroc": _win_rate(per_question),
        "paired_auroc_low": a_low,
        "paired_auroc_high": a_high,
        **null_summary(shift, null),
        "style_shift": float(unit(style) @ mean_delta) if style is not None else math.nan,
        "isotropic_p95": float(np.linalg.norm(mean_delta) * isotropic_cos_p95),
    }


# --------------------------------------------------------------------------- projections

READINGS = {
    "fixed": "fixed texts (base answers), weights differ",
    "prompt": "em prompt, last token, weights differ",
    "own": "own answers (secondary: texts differ too)",
}


def projection_table(
    records: Sequence[Mapping[str, Any]],
    probes: Mapping[str, Mapping[str, Any]],
    misalignment: pl.DataFrame,
    *,
    n_boot: int,
    seed: int,
) -> pl.DataFrame:
    """One row per model, disposition, fine-tuned condition, seed and reading.

    records: {"model", "condition", "seed", "family", "means": LayerMeans}. probes: model ->
    {"directions": {d: vector}, "nulls": {d: [K, hidden]}, "style": vector, "fit_questions": set,
    "isotropic_cos_p95": float}. Fixed and prompt readings keep only em questions outside
    ``fit_questions``; the own reading pairs each question's own answers with the base model's.
    """
    base = {(r["model"], r["seed"]): r["means"] for r in records if r["condition"] == "base"}
    rows = []
    for record in records:
        if record["condition"] == "base" or record["model"] not in probes:
            continue
        probe = probes[record["model"]]
        reference: LayerMeans | None = base.get((record["model"], record["seed"]))
        for disposition, direction in probe["directions"].items():
            for reading, label in READINGS.items():
                if reference is None or reading not in record["means"].readings:
                    continue
                # Questions whose judged answers (of any condition) fitted the probe never score it.
                keep = set(_all_ids(reference, reading)) - probe["fit_questions"]
                _, deltas = paired_deltas(record["means"].readings[reading], reference.readings[reading], keep)
                stats = shift_statistics(
                    deltas,
                    direction,
                    nulls=probe["nulls"].get(disposition, np.zeros((0, len(direction)))),
                    style=probe.get("style"),
                    isotropic_cos_p95=probe["isotropic_cos_p95"],
                    n_boot=n_boot,
                    seed=seed,
                )
                rows.append(
                    {
                        "model": record["model"],
                        "disposition": disposition,
                        "condition": record["condition"],
                        "family": record["family"],
                        "seed": int(record["seed"]),
                        "reading": reading,
                        "reading_label": label,
                        **stats,
                    }
                )
    schema = {
        "model": pl.String,
        "disposition": pl.String,
        "condition": pl.String,
        "family": pl.String,
        "seed": pl.Int64,
        "reading": pl.String,
        "reading_label": pl.String,
        "n_questions": pl.Int64,
        "shift": pl.Float64,
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
        "paired_auroc": pl.Float64,
        "paired_auroc_low": pl.Float64,
        "paired_auroc_high": pl.Float64,
        "null_p": pl.Float64,
        "null_p95": pl.Float64,
        "style_shift": pl.Float64,
        "isotropic_p95": pl.Float64,
    }
    table = pl.DataFrame(rows, schema=schema)
    rates = misalignment.select("model", "condition", pl.col("seed").cast(pl.Int64), misalignment_rate=pl.col("rate"))
    return table.join(rates, on=["model", "condition", "seed"], how="left").sort(
        "model", "disposition", "reading", "condition", "seed"
    )


def _all_ids(means: LayerMeans, reading: str) -> list[str]:
    return list(means.readings[reading].ids) if reading in means.readings else []


def correlation_table(projections: pl.DataFrame, *, n_boot: int, seed: int) -> pl.DataFrame:
    """Spearman between projection shift and misalignment rate across fine-tuned *conditions*, per
    model, disposition and reading. Seeds of one condition are averaged first: they share the
    condition's data, so they are not independent points; models are never pooled."""
    schema = {
        "model": pl.String,
        "disposition": pl.String,
        "reading": pl.String,
        "rho": pl.Float64,
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
        "n": pl.Int64,
        "n_boot": pl.Int64,
    }
    if projections.is_empty():
        return pl.DataFrame(schema=schema)
    points = projections.group_by("model", "disposition", "reading", "condition", maintain_order=True).agg(
        pl.col("shift").mean(), pl.col("misalignment_rate").mean()
    )
    rows = []
    for (model, disposition, reading), group in points.group_by("model", "disposition", "reading", maintain_order=True):
        result = spearman_interval(
            group["shift"].to_list(), group["misalignment_rate"].to_list(), n_boot=n_boot, seed=seed
        )
        rows.append({"model": model, "disposition": disposition, "reading": reading, **result})
    return pl.DataFrame(rows, schema=schema).sort("model", "disposition", "reading")


# --------------------------------------------------------------------------- transfer


def transfer_cells(
    records: Sequence[Mapping[str, Any]], fit_questions: set[str], model: str
) -> dict[str, list[np.ndarray]]:
    """Per cell, the per-question differences it is read from (one array per condition and seed):
    trigger on minus off on each triggered model and persona minus neutral prompt on the base model,
    each on identical texts (primary), at the prompt's last token, and on each side's own texts
    (``texts.TRIGGER_PAIRS``, ``texts.PERSONA_PAIRS``); and each fine-tuned model minus the base
    model on the fixed texts (held-out questions)."""
    base = {r["seed"]: r["means"] for r in records if r["model"] == model and r["condition"] == "base"}
    cells: dict[str, list[np.ndarray]] = {}
    for record in records:
        if record["model"] != model:
            continue
        readings = record["means"].readings
        for variant in VARIANTS:
            for kind, disposition, on, off in comparison_pairs(
                record["condition"], record["spec"], list(readings), variant
            ):
                name = (
                    f"trigger on vs off, {variant}: {record['condition']}"
                    if kind == "trigger"
                    else f"persona vs neutral, {variant}: {disposition}"
                )
                cells.setdefault(name, []).append(paired_deltas(readings[on], readings[off])[1])
        reference = base.get(record["seed"])
        if record["condition"] != "base" and reference is not None and "fixed" in readings:
            keep = set(reference.readings["fixed"].ids) - fit_questions
            cells.setdefault(f"fine-tuned vs base, fixed texts: {record['condition']}", []).append(
                paired_deltas(readings["fixed"], reference.readings["fixed"], keep)[1]
            )
    return cells


TRANSFER_SCHEMA = {
    "model": pl.String,
    "probe_model": pl.String,
    "disposition": pl.String,
    "cell": pl.String,
    "auroc": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "null_p": pl.Float64,
    "n": pl.Int64,
    "map_r2": pl.Float64,
    "projection_r2": pl.Float64,
}
"""``direction_transfer``: ``model`` is where a cell is read, ``probe_model`` whose probe is read
there (the same model, or another family's probe mapped in by ``directions.families``, which also
fills the two held-out map qualities; NaN for a model's own probe)."""


def cell_transfer_rows(
    cells: Mapping[str, Sequence[np.ndarray]],
    directions: Mapping[str, np.ndarray],
    nulls: Mapping[str, np.ndarray],
    *,
    isotropic_cos_p95: float,
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Each direction read in each cell (``transfer_cells``): the paired AUROC over questions with
    its interval, the permutation null's p-value on the mean projection and the question count."""
    rows = []
    for cell, parts in sorted(cells.items()):
        deltas = np.concatenate([p for p in parts if len(p)]) if any(len(p) for p in parts) else np.zeros((0, 1))
        for disposition, direction in directions.items():
            if deltas.shape[1] != len(direction):
                deltas = np.zeros((0, len(direction)))
            stats = shift_statistics(
                deltas,
                direction,
                nulls=nulls.get(disposition, np.zeros((0, len(direction)))),
                style=None,
                isotropic_cos_p95=isotropic_cos_p95,
                n_boot=n_boot,
                seed=seed,
            )
            rows.append(
                {
                    "disposition": disposition,
                    "cell": cell,
                    "auroc": stats["paired_auroc"],
                    "ci_low": stats["paired_auroc_low"],
                    "ci_high": stats["paired_auroc_high"],
                    "null_p": stats["null_p"],
                    "n": stats["n_questions"],
                }
            )
    return rows


def transfer_table(
    records: Sequence[Mapping[str, Any]],
    reports: Sequence[Mapping[str, Any]],
    probes: Mapping[str, Mapping[str, Any]],
    *,
    n_boot: int,
    seed: int,
) -> pl.DataFrame:
    """Probe x cell matrix per model: AUROC where the probe was trained (held-out test split, and
    data-trained probe on judged answers), paired AUROC over questions in every other cell, each
    with a 95% interval and the permutation null's p-value on the mean projection. Each model's own
    probe only (``probe_model`` = ``model``); ``families.family_transfer_table`` adds the probes
    of other model families."""
    rows = []
    for report in reports:
        model = report["model"]
        if model not in probes:
            continue
        probe = probes[model]
        chosen = [row for row in report["layers"] if int(row["layer"]) == int(report["chosen_layer"])]
        for row in chosen:
            disposition = row["disposition"]
            for cell, key in (("probe test split (data + judged)", "test_auroc"), ("judged answers", "transfer_auroc")):
                rows.append(
                    {
                        "model": model,
                        "probe_model": model,
                        "disposition": disposition,
                        "cell": cell,
                        "auroc": row.get(key, math.nan),
                        "ci_low": row.get(f"{key}_low", math.nan),
                        "ci_high": row.get(f"{key}_high", math.nan),
                        "null_p": math.nan,
                        "n": int(row.get("n_test" if key == "test_auroc" else "n_judged_test", 0)),
                    }
                )
        records_of_model = [r for r in records if r["model"] == model]
        cells = transfer_cells(records_of_model, probe["fit_questions"], model)
        rows += [
            {"model": model, "probe_model": model, **row}
            for row in cell_transfer_rows(
                cells,
                probe["directions"],
                probe["nulls"],
                isotropic_cos_p95=probe["isotropic_cos_p95"],
                n_boot=n_boot,
                seed=seed,
            )
        ]
    no_map = {"map_r2": math.nan, "projection_r2": math.nan}
    return pl.DataFrame([row | no_map for row in rows], schema=TRANSFER_SCHEMA)


# --------------------------------------------------------------------------- cosines


def sign_flip_nulls(parts: Sequence[np.ndarray], *, n_null: int, seed: int) -> np.ndarray:
    """Null directions for a paired contrast: every question's difference keeps its size but gets a
    random sign (the two readings' labels swapped), averaged as the direction itself is."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros((0, 0))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_null):
        out.append(np.mean([(rng.choice([-1.0, 1.0], len(p))[:, None] * p).mean(axis=0) for p in parts], axis=0))
    return np.stack(out)


def source_question_differences(records: Sequence[Mapping[str, Any]], model: str) -> dict[str, list[np.ndarray]]:
    """Per fine-tune / trigger / persona label, the per-question differences behind its direction
    (the same pairings as ``shared.source_differences``: ``texts.source_pairs``)."""
    out: dict[str, list[np.ndarray]] = {}
    for record in records:
        if record["model"] != model:
            continue
        readings = record["means"].readings
        for label, a, b in source_pairs(record["condition"], record["spec"], list(readings)):
            out.setdefault(label, []).append(paired_deltas(readings[a], readings[b])[1])
    return out


def cosine_null_table(
    vectors: Mapping[str, Mapping[str, np.ndarray]],
    nulls: Mapping[str, Mapping[str, np.ndarray]],
    baselines: Mapping[str, Mapping[str, float]],
) -> pl.DataFrame:
    """Long cosine matrix per model with, for each (row, column), the row's null: cosines of the
    row's null directions with the column (p-value on |cos|, 95th percentile of |cos|); the style
    control's cosine with the column; and the isotropic baseline."""
    rows = []
    for model, named in vectors.items():
        style = named.get("control:style")
        for a, va in named.items():
            row_nulls = nulls.get(model, {}).get(a, np.zeros((0, len(va))))
            for b, vb in named.items():
                cosine = float(unit(va) @ unit(vb))
                # A direction's cosine with itself is 1 by construction: no null to compare with.
                null = _units(row_nulls) @ unit(vb) if len(row_nulls) and a != b else np.zeros(0)
                rows.append(
                    {
                        "model": model,
                        "row": a,
                        "column": b,
                        "cosine": cosine,
                        **null_summary(cosine, null),
                        "style_cosine": float(unit(style) @ unit(vb)) if style is not None else math.nan,
                        **{f"random_{k}": v for k, v in baselines[model].items() if k.endswith("cos")},
                    }
                )
    schema = {
        "model": pl.String,
        "row": pl.String,
        "column": pl.String,
        "cosine": pl.Float64,
        "null_p": pl.Float64,
        "null_p95": pl.Float64,
        "style_cosine": pl.Float64,
        "random_mean_abs_cos": pl.Float64,
        "random_p95_abs_cos": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


__all__ = [
    "READINGS",
    "TRANSFER_SCHEMA",
    "cell_transfer_rows",
    "correlation_table",
    "cosine_null_table",
    "paired_deltas",
    "projection_table",
    "shift_statistics",
    "sign_flip_nulls",
    "source_question_differences",
    "transfer_cells",
    "transfer_table",
]
