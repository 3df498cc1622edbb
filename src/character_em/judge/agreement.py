"""The second judge (``judge.agreement_with``) on the grid's own answers.

A judge checked only on hand-written calibration items may still read the grid's answers differently from
another judge; published emergent-misalignment rates on one fixed answer set moved 40-fold between judges.
So a second judge, of another model family, scores a share of every cell's answers, through the same
``score_samples`` path and judge cache as the main judge:

- ``draw_answers``: at most ``per_cell`` answers of each cell (model, condition, seed, suite). Prompts are
  taken in one seeded order that depends only on the prompt (suite, question, format, system prompt,
  trigger), never on the model, condition or seed, so every condition answers the same drawn prompts and
  contrasts between conditions stay paired. Every drawn prompt's first answer comes before any second one.
  A larger ``per_cell`` draws a superset, so its verdicts reuse the cache.
- ``score_drawn``: the second judge's Scores of those answers, for the metrics the main judge scores.
- ``grid_agreement``: per metric, the two judges' agreement on the same answers (share of equal classes,
  Cohen's kappa, Spearman), as the calibration table reports it.

The judge-swap table (``report.judge_swap``) turns both judges' verdicts into each condition's EM rate and
each headline contrast under either judge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from character_em.contracts import SAMPLE_KEY
from character_em.hashing import stable_int
from character_em.judge.calibration import DEFAULT_THRESHOLDS, agreement_table, predict_class
from character_em.judge.core import JudgeBackend, score_samples

# What makes two answers answers to the same prompt, in whichever model, condition and seed.
PROMPT_KEY = ("suite", "question_id", "format", "system_prompt_id", "trigger")
# One cell: one Samples file of the grid.
CELL_KEY = ("model", "condition", "seed", "suite")
DRAW_SEED = 0


def draw_answers(samples: pl.DataFrame, per_cell: int, *, seed: int = DRAW_SEED) -> pl.DataFrame:
    """At most ``per_cell`` answers of each cell of ``samples`` (see the module docstring), in their order."""
    if per_cell < 1:
        raise ValueError(f"judge.agreement_answers_per_cell must be at least 1, got {per_cell}")
    if samples.height == 0:
        return samples
    prompts = samples.select(PROMPT_KEY).unique()
    ranks = prompts.with_columns(
        pl.Series("_prompt_rank", [stable_int(seed, *row) for row in prompts.iter_rows()], dtype=pl.UInt64)
    )
    ranked = samples.with_row_index("_row").join(ranks, on=list(PROMPT_KEY), how="left")
    drawn = (
        ranked.sort([*CELL_KEY, "sample_index", "_prompt_rank"])
        .group_by(list(CELL_KEY), maintain_order=True)
        .head(per_cell)
        .sort("_row")
    )
    return drawn.select(samples.columns)


def score_drawn(
    samples: pl.DataFrame,
    *,
    per_cell: int,
    judge_cfg: dict[str, Any],
    dispositions: list[dict[str, Any]],
    cache_dir: str | None,
    stats: dict[str, Any] | None = None,
    backend: JudgeBackend | None = None,
) -> pl.DataFrame:
    """The second judge's Scores of ``draw_answers(samples, per_cell)``: the suites' default metrics, the
    ones the judge jobs score, through ``score_samples`` and the judge cache. Drawing again from drawn answers
    changes nothing, so ``samples`` may already be drawn (file by file, say)."""
    return score_samples(
        draw_answers(samples, per_cell),
        judge_cfg=judge_cfg,
        metrics_by_suite=None,
        dispositions=dispositions,
        cache_dir=cache_dir,
        stats=stats,
        backend=backend,
    )


def _predictions(scores: pl.DataFrame, thresholds: Mapping[str, float]) -> pl.DataFrame:
    key = list(SAMPLE_KEY)
    rows = [
        {
            "id": "|".join(str(r[c]) for c in key),
            "metric": r["metric"],
            "score": r["score"],
            "pred": predict_class(r["metric"], r["score"], r["label"], thresholds),
            "judge_backend": r["judge_backend"],
            "judge_model": r["judge_model"],
        }
        for r in scores.iter_rows(named=True)
    ]
    schema = {
        "id": pl.Utf8,
        "metric": pl.Utf8,
        "score": pl.Float64,
        "pred": pl.Utf8,
        "judge_backend": pl.Utf8,
        "judge_model": pl.Utf8,
    }
    return pl.DataFrame(rows, schema=schema)


def paired_scores(primary: pl.DataFrame, second: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Both judges' Scores restricted to the (answer, metric) pairs both scored."""
    pairs = second.select(*SAMPLE_KEY, "metric").join(
        primary.select(*SAMPLE_KEY, "metric"), on=[*SAMPLE_KEY, "metric"], how="semi"
    )
    on = [*SAMPLE_KEY, "metric"]
    return primary.join(pairs, on=on, how="semi"), second.join(pairs, on=on, how="semi")


def grid_agreement(
    primary: pl.DataFrame, second: pl.DataFrame, *, thresholds: Mapping[str, float] | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per metric, the two judges on the answers both scored: share of equal classes (the calibration
    thresholds; the EM thresholds from the config), Cohen's kappa on classes and Spearman on scores, with
    bootstrap intervals over answers. Returns (agreement table, per-answer scores of both judges)."""
    th = {**DEFAULT_THRESHOLDS, **dict(thresholds or {})}
    first, other = (_predictions(frame, th) for frame in paired_scores(primary, second))
    table = agreement_table(first, other, judge="primary~agreement_with (grid answers)")
    items = first.join(other, on=["id", "metric"], suffix="_agreement_with")
    return table, items
