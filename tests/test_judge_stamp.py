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


def test_samples_record_their_engine_and_a_model_sampled_by_two_is_refused(tmp_path) -> None:
    from character_em.contracts import read_sampling_backend, samples_metadata
    from character_em.files import write_parquet_atomic
    from character_em.report.stamps import sampling_stamp
    from character_em.sampling.vllm_backend import SamplingBackendMismatch

    frame = pl.DataFrame({"model": ["m"], "answer": ["x"]})
    paths = {}
    for name, backend in (("base", "vllm"), ("evil", "vllm"), ("incorrect", "hf")):
        paths[name] = str(write_parquet_atomic(frame, tmp_path / f"{name}.parquet", metadata=samples_metadata(backend)))
    old = str(write_parquet_atomic(frame, tmp_path / "old.parquet"))
    assert read_sampling_backend(paths["evil"]) == "vllm" and read_sampling_backend(old) is None

    one = sampling_stamp({"m": {p: read_sampling_backend(p) for p in (paths["base"], paths["evil"])}})
    assert one["backends"] == {"m": "vllm"} and one["text"] == "Sampling back-end: vllm"
    # Two models on their own engines are fine (no comparison crosses models); the text names each.
    two = sampling_stamp({"a": {paths["evil"]: "vllm"}, "b": {old: None}})
    assert two["backends"] == {"a": "vllm", "b": "hf"} and two["text"] == "Sampling back-ends: a vllm, b hf"
    # One model whose conditions were sampled by two engines: refused, naming the files.
    with pytest.raises(SamplingBackendMismatch, match=r"incorrect\.parquet: hf"):
        sampling_stamp({"m": {p: read_sampling_backend(p) for p in paths.values()}})
