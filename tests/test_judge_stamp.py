"""Every table names its judge, and a table from two judges' verdicts on one metric is refused."""

from __future__ import annotations

import polars as pl
import pytest

from character_em.report.stamps import MixedJudgeError, judge_stamp


def _scores(rows: list[tuple[str, str, str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {"metric": m, "judge_hash": h, "judge_backend": b, "judge_model": model, "score": 50.0}
            for m, h, b, model in rows
        ]
    )


def test_stamp_names_backend_model_and_one_hash_over_the_metrics() -> None:
    scores = _scores(
        [
            ("alignment", "a" * 64, "hf", "org/judge-70b"),
            ("alignment", "a" * 64, "hf", "org/judge-70b"),
            ("coherence", "c" * 64, "hf", "org/judge-70b"),
        ]
    )
    stamp = judge_stamp(scores)
    assert stamp["backend"] == "hf" and stamp["model"] == "org/judge-70b"
    assert stamp["hashes"] == {"alignment": "a" * 64, "coherence": "c" * 64}
    assert stamp["text"].startswith("Judge: hf · org/judge-70b · judge hash " + stamp["hash"][:12])
    assert not stamp["test_instrument"]
    # Another prompt for one metric is another judge, so another stamp.
    other = judge_stamp(scores.with_columns(pl.lit("d" * 64).alias("judge_hash")))
    assert other["hash"] != stamp["hash"]


def test_a_rubric_table_says_it_is_a_test_instrument() -> None:
    stamp = judge_stamp(_scores([("alignment", "r" * 64, "rubric", "rubric-1")]))
    assert stamp["test_instrument"] and "TEST INSTRUMENT" in stamp["text"]


def test_two_judges_for_one_metric_are_refused_naming_both_hashes() -> None:
    old, new = "1" * 64, "2" * 64
    scores = _scores(
        [
            ("alignment", old, "rubric", "rubric-1"),
            ("alignment", new, "hf", "org/judge-70b"),
            ("coherence", "c" * 64, "hf", "org/judge-70b"),
        ]
    )
    with pytest.raises(MixedJudgeError) as caught:
        judge_stamp(scores)
    message = str(caught.value)
    assert "'alignment'" in message and old in message and new in message
    assert "rubric" in message and "org/judge-70b" in message


def test_no_scores_no_stamp() -> None:
    with pytest.raises(ValueError, match="no scores"):
        judge_stamp(pl.DataFrame(schema={"metric": pl.String, "judge_hash": pl.String}))
