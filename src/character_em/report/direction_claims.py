"""Claim 4 (a character direction inside the model carries the misalignment) as claim rows, in the
claim-row columns ``DIRECTION_CLAIM_COLUMNS`` (the tables rule adds Holm's adjustment):

- ``projection_vs_misalignment``: across fine-tuned conditions, Spearman's rho between the fixed-text
  projection shift on a disposition's probe and the em misalignment rate. The unit is the condition
  (its seeds averaged first); the interval resamples conditions; the p-value is Spearman's null over
  conditions (exact permutations up to 8 conditions, the t approximation beyond), whose resolution
  does not depend on a number of draws. The seed x question bootstrap does not apply: the statistic
  is a rank correlation across conditions, not a contrast of cell rates.
- ``trigger_reading_identical_text`` / ``persona_reading_identical_text``: the same texts read after
  the trigger (persona) prompt minus after the untriggered (neutral) prompt, projected on the
  disposition's unit probe direction: per disposition and pooled over dispositions. Projections are
  continuous, so the flag bootstrap does not apply either; the readings' own resampling does: the
  interval is a crossed bootstrap of training runs and questions, and the p-value is an
  intersection-union test that must reject on every ground at once (``reading_claim``).
- ``steer_{add,ablate}_own_vs_control[s]``: steering's own-direction effect minus a control
  direction's at matched norm, on the misaligned and the trait-expressed flags, through the project's
  seed x question bootstrap (``hierarchical.bootstrap_statistic``), arms of one model sharing its
  seed draw and every arm the same questions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from character_em.directions.formats import STEERING_ARM_SCHEMA
from character_em.directions.probes import rank_average, spearman, spearman_interval, unit
from character_em.directions.readings import paired_deltas
from character_em.directions.steering import OWN, UNSTEERED
from character_em.directions.texts import comparison_pairs
from character_em.report.hierarchical import bootstrap_statistic, grid_from_answers
from character_em.report.tables import CLAIM_SCHEMA, answers_table

CLAIM = "4"
# The claim-row columns the tables rule reads from results/tables/direction_claims.csv (it adds Holm's
# adjustment over the headline family); each as the claims table types it.
DIRECTION_CLAIM_COLUMNS = (
    "claim",
    "contrast",
    "model",
    "scope",
    "a",
    "b",
    "metric",
    "estimate",
    "ci_low",
    "ci_high",
    "p_value",
    "n_runs",
    "n_questions",
    "n_answers",
    "pairing",
)
DIRECTION_CLAIM_SCHEMA = {column: CLAIM_SCHEMA[column] for column in DIRECTION_CLAIM_COLUMNS}
# Rows proposed for the pre-registered headline family, one per model each: scope ending in
# "/pooled" (every disposition of the grid, each on its own direction), metric misaligned and
# projection_shift, and for steering the probes' chosen layer ("(chosen layer)" in the scope).
HEADLINE = (
    "steer_add_own_vs_controls",
    "steer_ablate_own_vs_controls",
    "trigger_reading_identical_text",
    "persona_reading_identical_text",
)
POOLED = "pooled"


def _row(contrast: str, model: str, scope: str, a: str, b: str, metric: str, result: Mapping[str, Any], pairing: str):
    return {
        "claim": CLAIM,
        "contrast": contrast,
        "model": model,
        "scope": scope,
        "a": a,
        "b": b,
        "metric": metric,
        "estimate": result["estimate"],
        "ci_low": result["ci_low"],
        "ci_high": result["ci_high"],
        "p_value": result["p_value"],
        "n_runs": result["n_runs"],
        "n_questions": result["n_questions"],
        "n_answers": result["n_answers"],
        "pairing": pairing,
    }


# --------------------------------------------------------------------------- distributions


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction of the regularized incomplete beta function."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function (0 <= x <= 1)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0 if math.isinf(t) else math.nan
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def normal_two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0)) if math.isfinite(z) else (0.0 if math.isinf(z) else math.nan)


def one_sample_t_p(values: np.ndarray) -> float:
    """Two-sided p of "the mean is 0" from a one-sample t-test; NaN with fewer than 2 values."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return math.nan
    sd = float(values.std(ddof=1))
    mean = float(values.mean())
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return t_two_sided_p(mean / (sd / math.sqrt(len(values))), len(values) - 1)


def spearman_p(x: Sequence[float], y: Sequence[float], *, exact_up_to: int = 8) -> float:
    """Two-sided p of Spearman's rho under independence: every permutation of y's ranks for up to
    ``exact_up_to`` points, else the t approximation t = rho sqrt((n - 2) / (1 - rho^2)), n - 2 df."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    n = len(xs)
    rho = spearman(xs, ys) if n >= 3 else math.nan
    if not math.isfinite(rho):
        return math.nan
    if n <= exact_up_to:
        rx, ry = rank_average(xs), rank_average(ys)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        scale = math.sqrt(float(rx @ rx) * float(ry @ ry))
        orders = np.array(list(itertools.permutations(range(n))))
        null = (ry[orders] @ rx) / scale
        return float(np.mean(np.abs(null) >= abs(rho) - 1e-12))
    if abs(rho) >= 1.0:
        return 0.0
    return t_two_sided_p(rho * math.sqrt((n - 2) / (1 - rho * rho)), n - 2)


# --------------------------------------------------------------------------- A: projection vs misalignment


def projection_claims(
    projections: pl.DataFrame, misalignment: pl.DataFrame, *, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """Spearman's rho between the fixed-text projection shift and the misalignment rate across the
    fine-tuned conditions of each model, per disposition probe (``readings.projection_table`` rows
    of the ``fixed`` reading; seeds of a condition averaged first)."""
    rows = []
    fixed = projections.filter(pl.col("reading") == "fixed")
    if fixed.is_empty():
        return rows
    answered = misalignment.select("model", "condition", pl.col("seed").cast(pl.Int64), pl.col("n").cast(pl.Int64))
    fixed = fixed.join(answered, on=["model", "condition", "seed"], how="left")
    for (model, disposition), group in fixed.group_by("model", "disposition", maintain_order=True):
        points = group.group_by("condition", maintain_order=True).agg(
            pl.col("shift").mean(), pl.col("misalignment_rate").mean()
        )
        shifts, rates = points["shift"].to_list(), points["misalignment_rate"].to_list()
        interval = spearman_interval(shifts, rates, n_boot=n_boot, seed=seed)
        usable = group.filter(pl.col("shift").is_not_nan() & pl.col("misalignment_rate").is_not_null())
        rows.append(
            _row(
                "projection_vs_misalignment",
                model,
                f"em/fixed texts/{disposition} probe/across fine-tuned conditions",
                "fixed-text projection shift",
                "misaligned rate",
                "spearman_rho",
                {
                    "estimate": interval["rho"],
                    "ci_low": interval["ci_low"],
                    "ci_high": interval["ci_high"],
                    "p_value": spearman_p(shifts, rates),
                    "n_runs": usable.height,
                    "n_questions": int(usable["n_questions"].max() or 0) if usable.height else 0,
                    "n_answers": int(usable["n"].fill_null(0).sum()) if usable.height else 0,
                },
                f"{interval['n']} conditions, seeds averaged; interval: conditions resampled; p: Spearman's null over "
                "conditions (exact permutations up to 8, t approximation beyond)",
            )
        )
    return rows


# --------------------------------------------------------------------------- B: identical-text readings


def _matrix(parts: Sequence[tuple[str, list[str], np.ndarray]]) -> tuple[list[str], list[str], np.ndarray]:
    """(run, question ids, per-question values) -> runs, questions, a [runs, questions] matrix (NaN
    where a run lacks a question)."""
    runs = [run for run, _, _ in parts]
    questions = sorted({q for _, ids, _ in parts for q in ids})
    where = {q: j for j, q in enumerate(questions)}
    out = np.full((len(parts), len(questions)), np.nan)
    for i, (_, ids, values) in enumerate(parts):
        out[i, [where[q] for q in ids]] = values
    return runs, questions, out


def _crossed_mean(values: np.ndarray, run_weights: np.ndarray, question_weights: np.ndarray) -> np.ndarray:
    """Mean over weighted runs of the mean over weighted questions (NaN cells skipped), for a stack
    of weightings [B, runs] and [B, questions]."""
    present = np.isfinite(values).astype(float)
    filled = np.where(np.isfinite(values), values, 0.0)
    numerator = filled @ question_weights.T  # [runs, B]
    denominator = present @ question_weights.T
    with np.errstate(invalid="ignore", divide="ignore"):
        per_run = np.where(denominator > 0, numerator / denominator, np.nan)
        usable = np.isfinite(per_run).T * run_weights  # [B, runs]
        total = usable.sum(axis=1)
        return np.where(total > 0, np.nansum(usable * np.nan_to_num(per_run.T), axis=1) / total, np.nan)


def reading_claim(
    parts: Sequence[tuple[str, list[str], np.ndarray]],
    null_shifts: np.ndarray,
    *,
    independent_runs: bool,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """The mean projection shift of identical-text readings with its interval and p-value.

    parts: one (run, question ids, per-question projections of on minus off) per training run.
    null_shifts: the same mean differences projected on label-permutation null directions instead
    of the probe. Estimate: mean over runs of the mean over questions. Interval: percentile of a
    crossed bootstrap (runs and questions drawn with replacement, one question draw for every run).
    p-value: the largest of (i) a t-test over questions of the per-question means (df = questions -
    1), (ii) when the runs are independent training runs, a t-test over their means (df = runs - 1),
    and (iii) the shift against the null directions' shifts (normal tail, z = shift / their standard
    deviation): an intersection-union test, which rejects only when the shift is there across
    questions, across training runs and specific to the probe.
    """
    runs, questions, values = _matrix(parts)
    empty = {"estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    sizes = {"n_runs": len(runs), "n_questions": len(questions), "n_answers": 0}
    if not runs or not questions:
        return empty | sizes
    estimate = float(_crossed_mean(values, np.ones((1, len(runs))), np.ones((1, len(questions))))[0])
    rng = np.random.default_rng(seed)
    run_draw = rng.multinomial(len(runs), np.full(len(runs), 1 / len(runs)), size=n_boot).astype(float)
    question_draw = rng.multinomial(len(questions), np.full(len(questions), 1 / len(questions)), size=n_boot)
    replicates = _crossed_mean(values, run_draw, question_draw.astype(float))
    replicates = replicates[np.isfinite(replicates)]
    low, high = (float(v) for v in np.quantile(replicates, [0.025, 0.975])) if replicates.size else (math.nan,) * 2
    with np.errstate(invalid="ignore"):
        per_question = np.nanmean(values, axis=0)
        per_run = np.nanmean(values, axis=1)
    tests = [one_sample_t_p(per_question)]
    if independent_runs and len(runs) >= 2:
        tests.append(one_sample_t_p(per_run))
    null = np.asarray(null_shifts, dtype=float)
    null = null[np.isfinite(null)]
    if null.size >= 2 and float(null.std(ddof=1)) > 0:
        tests.append(normal_two_sided_p((estimate - float(null.mean())) / float(null.std(ddof=1))))
    else:
        tests.append(math.nan)
    p_value = math.nan if any(math.isnan(p) for p in tests) else max(tests)
    return {"estimate": estimate, "ci_low": low, "ci_high": high, "p_value": p_value} | sizes


def reading_claims(
    records: Sequence[Mapping[str, Any]],
    probes: Mapping[str, Mapping[str, Any]],
    *,
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Trigger on minus off on each triggered model, and persona minus neutral system prompt on the
    base model, both on identical texts (``texts.comparison_pairs``), projected on the disposition's
    unit probe: one row per model and disposition and one pooled over dispositions (each run on its
    own disposition's probe). No question is left out for having fitted the probe: both sides read
    the same question and answer, so what the probe learnt about a text cancels in the difference."""
    rows = []
    for model, probe in probes.items():
        found: dict[tuple[str, str], list[tuple[str, list[str], np.ndarray, np.ndarray]]] = {}
        for record in records:
            if record["model"] != model:
                continue
            readings = record["means"].readings
            for kind, disposition, on, off in comparison_pairs(record["condition"], record["spec"], list(readings)):
                if disposition not in probe["directions"]:
                    continue
                ids, deltas = paired_deltas(readings[on], readings[off])
                if not ids:
                    continue
                u = unit(probe["directions"][disposition])
                nulls = np.asarray(probe["nulls"].get(disposition, np.zeros((0, len(u)))), dtype=np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    null_units = nulls / np.linalg.norm(nulls, axis=1, keepdims=True)
                run = f"{record['condition']}/seed{record['seed']}"
                # The texts read after each input (the same ones on both sides).
                texts = int(readings[on].counts.sum())
                found.setdefault((kind, disposition), []).append(
                    (run, ids, deltas @ u, null_units @ deltas.mean(0), texts)
                )
        for kind in ("trigger", "persona"):
            groups = {d: parts for (k, d), parts in sorted(found.items()) if k == kind}
            if not groups:
                continue
            # The persona readings are the base model's, once per seed: one model, not independent runs.
            independent = kind == "trigger"
            # Per disposition where the grid has several, and always pooled over them (the row the
            # headline family names, the same on a grid of one disposition as on one of many).
            for disposition, parts in [*(groups.items() if len(groups) > 1 else []), (POOLED, None)]:
                if parts is None:
                    # Each disposition's null shifts averaged over its runs, then over dispositions.
                    null = np.mean([np.mean([p[3] for p in group], axis=0) for group in groups.values()], axis=0)
                    chosen = [part for group in groups.values() for part in group]
                    runs = [(f"{d}:{p[0]}", p[1], p[2]) for d, group in groups.items() for p in group]
                else:
                    null = np.mean([p[3] for p in parts], axis=0)
                    chosen = parts
                    runs = [p[:3] for p in parts]
                result = reading_claim(runs, null, independent_runs=independent, n_boot=n_boot, seed=seed)
                result["n_answers"] = sum(p[4] for p in chosen)
                conditions = sorted({run.split("/")[0].split(":")[-1] for run, _, _ in runs})
                if kind == "trigger":
                    contrast, scope = "trigger_reading_identical_text", "trigger suite/identical texts"
                    a, b = f"exact trigger [{', '.join(conditions)}]", "no trigger, same texts"
                else:
                    contrast, scope = "persona_reading_identical_text", "persona suite/identical texts/base model"
                    a, b = "persona system prompt", "neutral system prompt, same texts"
                probe_name = "own disposition's probe" if disposition == POOLED else f"{disposition} probe"
                pairing = (
                    "same texts under both inputs; interval: training runs x questions resampled; p: largest of "
                    "t over questions"
                    + (", t over training runs" if independent and len(runs) >= 2 else "")
                    + " and the probe against its label-permutation nulls"
                )
                rows.append(
                    _row(
                        contrast,
                        model,
                        f"{scope}/{probe_name}/{disposition}",
                        a,
                        b,
                        "projection_shift",
                        result,
                        pairing,
                    )
                )
    return rows


# --------------------------------------------------------------------------- C: steering vs controls


def steered_answers(
    scores: pl.DataFrame,
    *,
    conditions: Mapping[str, Mapping[str, Any]],
    alignment_below: float,
    coherence_above: float,
    expressed_at_least: float,
) -> pl.DataFrame:
    """One labelled row per steered answer (``tables.answers_table``, arm by arm, since the sample key
    repeats across arms) with its arm columns, ``direction_expression`` (the judge's score of the
    steered disposition) and ``expressed`` (that score at least ``expressed_at_least``; null when the
    judge gave none)."""
    arm_columns = list(STEERING_ARM_SCHEMA)
    if scores.is_empty():
        return pl.DataFrame()
    frames = []
    for _, group in scores.group_by(["model", "condition", "arm", "direction"], maintain_order=True):
        arm = group.select(arm_columns).row(0, named=True)
        answers = answers_table(
            group.drop(arm_columns),
            conditions=conditions,
            alignment_below=alignment_below,
            coherence_above=coherence_above,
        )
        column = f"disposition:{arm['direction']}"
        expression = pl.col(column).cast(pl.Float64) if column in answers.columns else pl.lit(None, pl.Float64)
        frames.append(
            answers.with_columns(**{k: pl.lit(v, STEERING_ARM_SCHEMA[k]) for k, v in arm.items()})
            .with_columns(direction_expression=expression.fill_nan(None))
            .with_columns(expressed=pl.col("direction_expression") >= expressed_at_least)
        )
    return pl.concat(frames, how="diagonal_relaxed")


def _steering_contrast(
    arms: Mapping[tuple[str, str], pl.DataFrame],
    runs: Sequence[str],
    controls: Sequence[str],
    kind: str,
    flag: str,
    questions: Sequence[str],
    *,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Own effect minus the largest control effect (one control: minus its effect), averaged over
    ``runs``. arms: (run, vector role) -> that run's answers under it at every nonzero strength.
    Effects are measured from the unsteered arm, which cancels: for add, rate(own) - rate(control);
    for ablate (an effect is a reduction), rate(control) - rate(own)."""
    grids, groups = [], []
    for run in runs:
        for role in (OWN, *controls):
            # Every nonzero strength's answers in one cell: each strength has as many per question.
            usable = arms[(run, role)].filter(pl.col("judged") & pl.col(flag).is_not_null())
            grids.append(
                grid_from_answers(usable, flag, seed="training_run", question="question_id", questions=questions)
            )
            # Arms of one condition are one model: they share its seed draw.
            groups.append(run.split(":", 1)[0])
    width = 1 + len(controls)
    sign = 1.0 if kind == "add" else -1.0

    def combine(rates: np.ndarray) -> np.ndarray:
        per_run = []
        for i in range(len(runs)):
            own, others = rates[i * width], rates[i * width + 1 : (i + 1) * width]
            per_run.append(sign * own - np.max(sign * others, axis=0))
        return np.mean(per_run, axis=0)

    result = bootstrap_statistic(grids, combine, seed_groups=groups, n_boot=n_boot, seed=seed)
    return result | {"n_runs": result["n_seeds"]}


def steering_claims(
    answers: pl.DataFrame, *, chosen_layers: Mapping[str, int] | None = None, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """Steering's own-direction effect minus each control's, and minus the largest control's, on the
    misaligned and the trait-expressed flags: per model, intervention and layer set (the probes'
    chosen layer marked, from ``chosen_layers``), pooled over the grid's dispositions and, where it
    has several, per disposition; ablation pooled over a disposition's character conditions. The
    answers of every nonzero strength count alike (no strength is picked after the fact)."""
    rows = []
    if answers.is_empty():
        return rows
    steered = answers.filter(pl.col("control") != UNSTEERED)
    for (model, kind, layers), group in steered.group_by("model", "intervention", "layers", maintain_order=True):
        questions = sorted(group["question_id"].unique().to_list())
        # A run is one (condition, disposition) arm set; arms[(run, control)] its answers.
        arms = {
            (f"{condition}:{direction}", control): part
            for (condition, direction, control), part in group.group_by("condition", "direction", "control")
        }
        runs_of: dict[str, list[str]] = {}
        for run in sorted({run for run, _ in arms}):
            runs_of.setdefault(run.split(":", 1)[1], []).append(run)
        # Every run of a disposition needs its own arm; its rows use the controls all its runs have,
        # and the pooled row the controls every disposition has.
        controls_of = {
            d: sorted(set.intersection(*({c for (r, c) in arms if r == run} - {OWN} for run in runs)))
            for d, runs in runs_of.items()
            if all((run, OWN) in arms for run in runs)
        }
        contrast = f"steer_{kind}_own_vs_control"
        verb = "add" if kind == "add" else "ablate"
        chosen_layer = (chosen_layers or {}).get(model)
        label = f"layers {layers}" + (
            " (chosen layer)" if chosen_layer is not None and layers == str(chosen_layer) else ""
        )
        for flag, metric in (("misaligned", "misaligned"), ("expressed", "expressed")):
            common = sorted(set.intersection(*(set(c) for c in controls_of.values()))) if controls_of else []
            sets = [(d, sorted(runs_of[d]), c) for d, c in sorted(controls_of.items())] if len(controls_of) > 1 else []
            if common:
                sets.append((POOLED, sorted(run for d in controls_of for run in runs_of[d]), common))
            for disposition, runs, controls in sets:
                for chosen in [[c] for c in controls] + ([controls] if len(controls) > 1 else []):
                    result = _steering_contrast(arms, runs, chosen, kind, flag, questions, n_boot=n_boot, seed=seed)
                    rows.append(_steering_row(contrast, model, verb, label, disposition, runs, chosen, metric, result))
    return rows


def _steering_row(contrast, model, verb, layers, disposition, runs, controls, metric, result):
    several = len(controls) > 1
    name = f"{contrast}s" if several else contrast
    against = f"largest of {', '.join(controls)}" if several else controls[0]
    conditions = sorted({run.split(":", 1)[0] for run in runs})
    direction = "own disposition's direction" if disposition == POOLED else f"{disposition} direction"
    pairing = (
        "questions and per-answer sampling seeds shared by every arm; arms of one model share its training run; "
        "answers of every nonzero strength pooled; effects from the unsteered arm, which cancels"
    )
    return _row(
        name,
        model,
        f"em/steering/{layers}/{disposition}",
        f"{verb} {direction} [{', '.join(conditions)}]",
        f"{verb} {against} control at matched norm",
        metric if metric == "misaligned" else f"expressed ({direction})",
        result,
        pairing,
    )


# --------------------------------------------------------------------------- the table


def direction_claims_table(
    *,
    projections: pl.DataFrame,
    misalignment: pl.DataFrame,
    records: Sequence[Mapping[str, Any]],
    probes: Mapping[str, Mapping[str, Any]],
    steered: pl.DataFrame,
    n_boot: int,
    seed: int,
) -> pl.DataFrame:
    """Every claim-4 row (module docstring), sorted like the claims table."""
    rows = projection_claims(projections, misalignment, n_boot=n_boot, seed=seed)
    rows += reading_claims(records, probes, n_boot=n_boot, seed=seed)
    chosen = {model: int(probe["layer"]) for model, probe in probes.items() if probe.get("layer") is not None}
    rows += steering_claims(steered, chosen_layers=chosen, n_boot=n_boot, seed=seed)
    table = pl.DataFrame(rows, schema=DIRECTION_CLAIM_SCHEMA)
    return table.sort("claim", "contrast", "model", "scope", "a", "metric", maintain_order=True)


__all__ = [
    "DIRECTION_CLAIM_COLUMNS",
    "DIRECTION_CLAIM_SCHEMA",
    "HEADLINE",
    "direction_claims_table",
    "normal_two_sided_p",
    "one_sample_t_p",
    "projection_claims",
    "reading_claim",
    "reading_claims",
    "regularized_beta",
    "spearman_p",
    "steered_answers",
    "steering_claims",
    "t_two_sided_p",
]
