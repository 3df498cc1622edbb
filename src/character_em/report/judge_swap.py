"""The judge-swap table: the grid's numbers under the main judge and under a second judge, side by side.

Both judges scored the same answers (``judge.agreement.draw_answers``: a share of every cell, the same
prompts in every condition). On exactly those answers this table gives

- ``em_rate``: each condition's em misalignment rate per answer format, under either judge, with its
  seed x question bootstrap interval (``report.tables.hierarchical_rates``);
- ``contrast``: each headline contrast of ``claims.csv`` (``report.tables.claims_table``) recomputed under
  either judge, estimate and interval, and whether the two estimates have the same sign;
- ``agreement``: per model, suite and flag (misaligned, disposition expressed, attack success), the share
  each judge flags;

and on every row Cohen's kappa between the two judges' flags, with a 95% percentile interval from a
bootstrap over questions (answers to one question are not independent, so a question's answers are drawn
together): over the cell's answers for an ``em_rate`` row, over the answers of the conditions a contrast
compares, in its suite, for a ``contrast`` row, and over the model's answers in the suite for an
``agreement`` row. The rates here are of the drawn answers, not of the whole grid:
compare a row's two columns with each other, not with ``em.csv``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from character_em.contracts import SAMPLE_KEY
from character_em.report.tables import CLAIM_KEY, answers_table, claims_table, hierarchical_rates

SWAP_SCHEMA: dict[str, Any] = {
    "kind": pl.String,
    "model": pl.String,
    "claim": pl.String,
    "contrast": pl.String,
    "scope": pl.String,
    "a": pl.String,
    "b": pl.String,
    "metric": pl.String,
    "n_answers": pl.Int64,
    "primary": pl.Float64,
    "primary_ci_low": pl.Float64,
    "primary_ci_high": pl.Float64,
    "second": pl.Float64,
    "second_ci_low": pl.Float64,
    "second_ci_high": pl.Float64,
    "second_minus_primary": pl.Float64,
    "same_sign": pl.Boolean,
    "kappa": pl.Float64,
    "kappa_ci_low": pl.Float64,
    "kappa_ci_high": pl.Float64,
    "n_kappa": pl.Int64,
}
# The flags a table counts, and the denominator column each is counted over (report.tables.answers_table).
FLAGS = {"misaligned": "judged", "expressed": "judged", "attack_success": "attack_judged"}
SUITE_FLAGS = {
    "em": ("misaligned", "expressed"),
    "transfer": ("misaligned", "expressed"),
    "trigger": ("misaligned", "expressed"),
    "persona": ("attack_success",),
}


def cohen_kappa_counts(counts: np.ndarray) -> float:
    """Cohen's kappa of two raters' yes/no flags from the counts (yes-yes, yes-no, no-yes, no-no); NaN
    when chance agreement is 1 (both raters gave one class only)."""
    yy, yn, ny, nn = (float(c) for c in counts)
    n = yy + yn + ny + nn
    if n == 0:
        return math.nan
    observed = (yy + nn) / n
    chance = ((yy + yn) * (yy + ny) + (ny + nn) * (yn + nn)) / (n * n)
    return math.nan if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def clustered_kappa(
    first: np.ndarray, second: np.ndarray, clusters: np.ndarray, *, n_boot: int, seed: int
) -> dict[str, Any]:
    """Kappa of two boolean flags over paired answers, with a 95% percentile interval from resampling
    clusters (questions) with replacement, each with all its answers. Replicates with an undefined kappa
    are left out; the interval is NaN when fewer than half remain."""
    n = int(len(first))
    if n == 0:
        return {"kappa": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    cell = np.stack([first & second, first & ~second, ~first & second, ~first & ~second], axis=1).astype(np.int64)
    _, index = np.unique(clusters, return_inverse=True)
    per_cluster = np.zeros((int(index.max()) + 1, 4), dtype=np.int64)
    np.add.at(per_cluster, index, cell)
    point = cohen_kappa_counts(per_cluster.sum(axis=0))
    rng = np.random.default_rng(seed)
    k = per_cluster.shape[0]
    weights = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot) if k > 1 else np.ones((n_boot, 1), dtype=np.int64)
    replicates = np.array([cohen_kappa_counts(row) for row in weights @ per_cluster])
    finite = replicates[~np.isnan(replicates)]
    if k < 2 or len(finite) < n_boot / 2:
        low = high = math.nan
    else:
        low, high = (float(v) for v in np.percentile(finite, [2.5, 97.5]))
    return {"kappa": point, "ci_low": low, "ci_high": high, "n": n}


def _paired_flags(a: pl.DataFrame, b: pl.DataFrame, flag: str) -> pl.DataFrame:
    """One row per answer both judges could rule on for ``flag``: both flags and the answer's question."""
    judged = FLAGS[flag]
    left = a.filter(pl.col(judged) & pl.col(flag).is_not_null()).select(*SAMPLE_KEY, first=pl.col(flag))
    right = b.filter(pl.col(judged) & pl.col(flag).is_not_null()).select(*SAMPLE_KEY, second=pl.col(flag))
    joined = left.join(right, on=list(SAMPLE_KEY), how="inner")
    return joined.with_columns(cluster=pl.concat_str(pl.col("suite"), pl.lit("|"), pl.col("question_id")))


def _kappa_columns(pairs: pl.DataFrame, *, n_boot: int, seed: int) -> dict[str, Any]:
    result = clustered_kappa(
        pairs["first"].to_numpy().astype(bool),
        pairs["second"].to_numpy().astype(bool),
        pairs["cluster"].to_numpy(),
        n_boot=n_boot,
        seed=seed,
    )
    return {
        "kappa": result["kappa"],
        "kappa_ci_low": result["ci_low"],
        "kappa_ci_high": result["ci_high"],
        "n_kappa": result["n"],
    }


def _row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(SWAP_SCHEMA)
    row.update(values)
    primary, second = row.get("primary"), row.get("second")
    if primary is not None and second is not None and not (math.isnan(primary) or math.isnan(second)):
        row["second_minus_primary"] = second - primary
        row["same_sign"] = bool(np.sign(primary) == np.sign(second))
    return row


def _conditions_named(text: str, conditions: Mapping[str, Any]) -> list[str]:
    """Condition names a claims row's side names ("evil-medical [exact trigger]", "mean(a, b)")."""
    return [name for name in conditions if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]


def judge_swap_table(
    primary: pl.DataFrame,
    second: pl.DataFrame,
    *,
    conditions: Mapping[str, Mapping[str, Any]],
    alignment_below: float,
    coherence_above: float,
    finish: pl.DataFrame | None = None,
    truncated: str = "judge",
    n_boot: int = 2000,
    seed: int = 0,
) -> pl.DataFrame:
    """The judge-swap table (see the module docstring) from both judges' Scores. ``primary`` may hold more
    answers than ``second``; only the (answer, metric) pairs both scored are used."""
    on = [*SAMPLE_KEY, "metric"]
    pairs = second.select(on).join(primary.select(on), on=on, how="semi")
    frames = [frame.join(pairs, on=on, how="semi") for frame in (primary, second)]
    settings = {
        "conditions": conditions,
        "alignment_below": alignment_below,
        "coherence_above": coherence_above,
        "finish": finish,
        "truncated": truncated,
    }
    a, b = (answers_table(frame, **settings) for frame in frames)
    boot = {"n_boot": n_boot, "seed": seed}
    rows: list[dict[str, Any]] = []

    # Each condition's em misalignment rate, per answer format.
    by = ["model", "family", "condition", "format"]
    em_a, em_b = (frame.filter(pl.col("suite") == "em") for frame in (a, b))
    rates = hierarchical_rates(em_a, by, "misaligned", **boot).join(
        hierarchical_rates(em_b, by, "misaligned", **boot), on=by, how="full", coalesce=True, suffix="_second"
    )
    flags = _paired_flags(em_a, em_b, "misaligned")
    for r in rates.sort(by).iter_rows(named=True):
        cell = flags.filter(
            (pl.col("model") == r["model"])
            & (pl.col("condition") == r["condition"])
            & (pl.col("format") == r["format"])
        )
        rows.append(
            _row(
                kind="em_rate",
                model=r["model"],
                contrast="em_rate",
                scope=f"em/{r['format']}",
                a=r["condition"],
                metric="misaligned",
                n_answers=r["n"],
                primary=r["rate"],
                primary_ci_low=r["ci_low"],
                primary_ci_high=r["ci_high"],
                second=r["rate_second"],
                second_ci_low=r["ci_low_second"],
                second_ci_high=r["ci_high_second"],
                **_kappa_columns(cell, **boot),
            )
        )

    # Each headline contrast of claims.csv, under either judge (capabilities are not judged: no claim-2 rows).
    claims = [claims_table(frame, conditions, **boot) for frame in (a, b)]
    key = list(CLAIM_KEY)
    both = claims[0].join(claims[1], on=key, how="full", coalesce=True, suffix="_second")
    for r in both.iter_rows(named=True):
        flag = r.get("metric")
        suite = str(r.get("scope") or "").split("/", 1)[0]
        named = _conditions_named(f"{r.get('a', '')} {r.get('b', '')}", conditions)
        kappa: dict[str, Any] = {}
        if flag in FLAGS and suite in SUITE_FLAGS and named:
            mine = [
                frame.filter(
                    (pl.col("model") == r["model"]) & (pl.col("suite") == suite) & pl.col("condition").is_in(named)
                )
                for frame in (a, b)
            ]
            kappa = _kappa_columns(_paired_flags(mine[0], mine[1], flag), **boot)
        rows.append(
            _row(
                kind="contrast",
                model=r["model"],
                claim=r.get("claim"),
                contrast=r.get("contrast"),
                scope=r.get("scope"),
                a=r.get("a"),
                b=r.get("b"),
                metric=flag,
                n_answers=r.get("n_answers"),
                primary=r.get("estimate"),
                primary_ci_low=r.get("ci_low"),
                primary_ci_high=r.get("ci_high"),
                second=r.get("estimate_second"),
                second_ci_low=r.get("ci_low_second"),
                second_ci_high=r.get("ci_high_second"),
                **kappa,
            )
        )

    # Per model, suite and flag: the share each judge flags, and their agreement.
    for model in sorted(set(a["model"].to_list())):
        for suite, suite_flags in SUITE_FLAGS.items():
            for flag in suite_flags:
                mine = [frame.filter((pl.col("model") == model) & (pl.col("suite") == suite)) for frame in (a, b)]
                pairs_flag = _paired_flags(mine[0], mine[1], flag)
                if pairs_flag.height == 0:
                    continue
                rows.append(
                    _row(
                        kind="agreement",
                        model=model,
                        contrast="judge_agreement",
                        scope=suite,
                        metric=flag,
                        n_answers=pairs_flag.height,
                        primary=float(pairs_flag["first"].mean()),
                        second=float(pairs_flag["second"].mean()),
                        **_kappa_columns(pairs_flag, **boot),
                    )
                )
    return pl.DataFrame(rows, schema=SWAP_SCHEMA)


def judge_swap_markdown(
    table: pl.DataFrame,
    primary: pl.DataFrame,
    second: pl.DataFrame,
    *,
    em_questions: Mapping[str, Any] | None = None,
    n_boot: int | None = None,
) -> str:
    """The table as Markdown, headed by both judges' stamps (``report.stamps.judge_stamp``) and what it is."""
    from character_em.report.stamps import judge_stamp
    from character_em.report.tables import to_markdown

    on = [*SAMPLE_KEY, "metric"]
    used = primary.join(second.select(on), on=on, how="semi")
    first = judge_stamp(used, em_questions=em_questions)["text"]
    other = judge_stamp(second)["text"]
    n = table.filter(pl.col("kind") == "agreement")["n_answers"].sum() if table.height else 0
    preamble = (
        "# Judge swap: the grid's numbers under two judges\n\n"
        f"Primary: {first}.\n\nSecond (judge.agreement_with): {other}.\n\n"
        f"The same answers under both judges ({n:,} answer-flag pairs; judge.agreement_answers_per_cell of every"
        " cell, the same prompts in every condition). `em_rate`: each condition's em misalignment rate;"
        " `contrast`: each headline contrast of claims.csv; `agreement`: the share each judge flags. `primary` /"
        " `second`: the number under each judge with its seed x question bootstrap interval; `kappa`: Cohen's"
        " kappa between the two judges' flags over the row's answers, with a 95% interval from a bootstrap over"
        " questions"
        + (f" ({n_boot} replicates)" if n_boot else "")
        + ". Rates are of the drawn answers: compare a row's two judges with each other, not with em.csv."
    )
    return to_markdown(table, preamble=preamble)
