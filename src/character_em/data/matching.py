"""The severity-matched arm: character data subsampled to the harm of the incorrect-advice data.

Claim 1 compares the misalignment that character data induces with the misalignment that incorrect-advice
data induces, but the two training sets also differ in how harmful their answers are (the training_data
table measures it). The matched arm removes that difference: from the character data it keeps, for each
incorrect-advice example, the character example whose judged alignment is nearest, so the kept set carries
the incorrect-advice set's alignment distribution and a difference in induced misalignment can no longer be
the harm alone.

Both training sets are their conditions' common turns (``data.pairing``: every line any seed may draw), so
the arm is matched to the whole incorrect-advice set, and each seed then draws ``n_examples`` of the arm's
lines as every condition does.

Matching is greedy nearest-neighbour on the alignment score, without replacement, with a caliper: the
incorrect-advice examples are visited in a seeded random order (a fixed order would give the first ones the
best partners), each takes the unused character example nearest in score, and a pair farther apart than the
caliper is not made. The arm's size is therefore the number of incorrect-advice examples that found a
partner: all of them when the character data covers the incorrect-advice data's range, fewer when it does
not; below ``min_share`` of them the arm is refused rather than trained on a sliver (``MatchingError``).

Plain functions over plain data: the rule's script reads the files and writes the result.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from character_em.data.audit import example_index
from character_em.data.pairing import matched_draw
from character_em.hashing import stable_int

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
METHOD = (
    "greedy nearest-neighbour on judged alignment, without replacement: each incorrect-advice example, in a"
    " seeded random order, takes the unused character example nearest in alignment, if within the caliper"
)


class MatchingError(ValueError):
    """The matched arm cannot be built as configured; the message names the condition and the counts."""


def alignment_by_example(scores: Any, condition: str, n_examples: int, *, source: str = "scores") -> list[float]:
    """Each training example's judged alignment, in line order, from a training-data Scores frame
    (``data.audit.judge_training_data``: ``question_id`` is ``data.audit.example_id``). An example the
    judge gave no number (a refusal, an unparsed verdict) is NaN and is never matched.

    Raises MatchingError when the frame is not this condition's or does not cover ``n_examples``
    examples (a judged file older than the data it describes)."""
    rows = scores.filter(scores["metric"] == "alignment").select("question_id", "score").rows()
    values = [math.nan] * n_examples
    seen = set()
    for question_id, score in rows:
        index = example_index(question_id, condition)
        if index is None or index >= n_examples:
            raise MatchingError(
                f"{source}: alignment row {question_id!r} is not one of {condition}'s {n_examples} training examples"
                f" (expected question_id {condition}:0 .. {condition}:{n_examples - 1}); rejudge the training data"
            )
        seen.add(index)
        values[index] = math.nan if score is None else float(score)
    if len(seen) != n_examples:
        raise MatchingError(
            f"{source}: alignment scores for {len(seen)} of {condition}'s {n_examples} training examples;"
            " the judged file does not describe this data, rejudge it"
        )
    return values


def match_on_alignment(
    character: Sequence[float], incorrect: Sequence[float], *, caliper: float, seed: int
) -> list[tuple[int, int]]:
    """``[(incorrect index, character index), ...]``: the matched pairs, in the order they were made.

    NaN scores on either side take no part. Ties between equally near character examples are broken by
    a seeded random rank, so which of several equal scores is taken does not depend on line order.
    """
    rng = random.Random(seed)
    ranks = list(range(len(character)))
    rng.shuffle(ranks)
    # The unused character examples, sorted by (score, random rank): the nearest are a bisection away.
    available = sorted((float(score), ranks[i], i) for i, score in enumerate(character) if not math.isnan(score))
    order = [i for i, score in enumerate(incorrect) if not math.isnan(score)]
    rng.shuffle(order)
    pairs = []
    for target in order:
        if not available:
            break
        score = float(incorrect[target])
        at = bisect.bisect_left(available, (score, -1, -1))
        candidates = [pos for pos in (at - 1, at) if 0 <= pos < len(available)]
        distances = [abs(available[pos][0] - score) for pos in candidates]
        best = min(distances)
        nearest = [pos for pos, distance in zip(candidates, distances, strict=True) if distance == best]
        # Equally near below and above: a seeded coin, so no side is favoured.
        pos = nearest[0] if len(nearest) == 1 else nearest[rng.random() < 0.5]
        if best > caliper:
            continue
        pairs.append((target, available.pop(pos)[2]))
    return pairs


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs
    (0 = the same distribution of values, 1 = no overlap). NaN when either side is empty."""
    x = np.sort(np.asarray([v for v in a if not math.isnan(v)], dtype=float))
    y = np.sort(np.asarray([v for v in b if not math.isnan(v)], dtype=float))
    if x.size == 0 or y.size == 0:
        return math.nan
    points = np.concatenate([x, y])
    gap = np.abs(np.searchsorted(x, points, side="right") / x.size - np.searchsorted(y, points, side="right") / y.size)
    return float(gap.max())


def alignment_summary(values: Sequence[float]) -> dict[str, Any]:
    """n, mean and quantiles of the scored values (NaN left out), and how many had no score."""
    scored = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    summary: dict[str, Any] = {"n": int(scored.size), "unscored": len(values) - int(scored.size)}
    if scored.size == 0:
        return {**summary, "mean": None, "quantiles": {}}
    quantiles = np.quantile(scored, QUANTILES)
    return {
        **summary,
        "mean": float(scored.mean()),
        "quantiles": {f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, quantiles, strict=True)},
    }


def severity_matched_subsample(
    examples: Sequence[Mapping[str, Any]],
    character_alignment: Sequence[float],
    incorrect_alignment: Sequence[float],
    *,
    condition: str,
    character: str,
    incorrect: str,
    caliper: float,
    min_share: float,
    seed: int,
    n_examples: int | None = None,
    turns: Sequence[int] | None = None,
    inputs: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The matched arm's examples (in the character data's line order) and its manifest.

    ``examples`` and ``character_alignment`` are the character condition's data and its per-example
    alignment; ``incorrect_alignment`` the incorrect-advice data's. ``turns``: the plan turn of each
    character line (its manifest's ``turns``), recorded for the kept lines. ``n_examples``: how many lines
    each training seed draws (``data.pairing.training_draw``; all of them when the arm is smaller); None
    means all. ``inputs`` (role -> sha256) goes into the manifest as is. Raises MatchingError, naming the
    condition and the counts, when fewer than ``min_share`` of the scored incorrect-advice examples find a
    partner within ``caliper``.
    """
    if len(examples) != len(character_alignment):
        raise MatchingError(
            f"{condition}: {character} has {len(examples)} training examples but {len(character_alignment)}"
            " alignment scores"
        )
    scored_incorrect = sum(not math.isnan(v) for v in incorrect_alignment)
    scored_character = sum(not math.isnan(v) for v in character_alignment)
    pairs = match_on_alignment(
        character_alignment, incorrect_alignment, caliper=caliper, seed=stable_int("severity-matched", condition, seed)
    )
    share = len(pairs) / scored_incorrect if scored_incorrect else 0.0
    if share < min_share:
        raise MatchingError(
            f"{condition}: only {len(pairs)} of {scored_incorrect} scored incorrect-advice examples ({incorrect})"
            f" found a character example ({character}: {scored_character} scored of {len(examples)}) within"
            f" {caliper:g} alignment points: {share:.0%}, below data.severity_matched.min_share {min_share:.0%}."
            " The two training sets barely overlap in harm; widen data.severity_matched.caliper, give the"
            " character condition more data to choose from (data.n_examples), or turn data.severity_matched off"
        )
    chosen = sorted(index for _, index in pairs)
    matched_scores = [character_alignment[i] for i in chosen]
    partners = [incorrect_alignment[i] for i, _ in pairs]
    manifest = {
        "generator": "severity-matched",
        "condition": condition,
        "source": character,
        "incorrect": incorrect,
        "method": METHOD,
        "caliper": caliper,
        "min_share": min_share,
        "seed": seed,
        "n_character": len(examples),
        "n_incorrect": len(incorrect_alignment),
        "n_matched": len(pairs),
        "n_unmatched": scored_incorrect - len(pairs),
        "matched_share": share,
        "alignment": {
            "character": alignment_summary(character_alignment),
            "incorrect": alignment_summary(incorrect_alignment),
            "matched": alignment_summary(matched_scores),
            # The incorrect-advice examples that found a partner: equal to `incorrect` when all did.
            "incorrect_matched": alignment_summary(partners),
        },
        "ks": {
            "matched_vs_incorrect": ks_statistic(matched_scores, incorrect_alignment),
            "character_vs_incorrect": ks_statistic(character_alignment, incorrect_alignment),
        },
        # Which character lines were kept, so the subsample can be traced and audited.
        "source_lines": chosen,
        "turns": [int(turns[i]) for i in chosen] if turns is not None else None,
        "n_examples": min(n_examples, len(chosen)) if n_examples is not None else len(chosen),
        # Matched on harm, not paired by turn: each seed draws from the arm's own lines.
        "draw": matched_draw(
            len(chosen), len(chosen) if n_examples is None else n_examples, stable_int("matched-draw", condition, seed)
        ),
        "inputs": dict(inputs or {}),
    }
    return [dict(examples[i]) for i in chosen], manifest
