"""Which judge made a table: the stamp every table header and figure carries, and the refusal to build a
table from the verdicts of two judges. Likewise which engine sampled the answers (``sampling_stamp``).

A judge is its hash (``judge.core.judge_hash``: back-end, model, weights, scoring method, prompt). One
metric scored by two hashes, say half the grid judged before a prompt change and half after, or a rubric
smoke run mixed into a real one, would average two instruments into one number; the tables refuse it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from character_em.hashing import canonical_json, sha256_text
from character_em.sampling.vllm_backend import check_one_backend

TEST_INSTRUMENTS = ("rubric",)


# The Scores columns a judge stamp reads (a caller may read only these).
STAMP_COLUMNS = ("metric", "judge_hash", "judge_backend", "judge_model")


class MixedJudgeError(ValueError):
    """One metric's scores come from more than one judge hash."""


def judge_stamp(scores: pl.DataFrame, *, em_questions: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The judge behind a Scores frame (``contracts.SCORE_SCHEMA``).

    Returns ``{"backend", "model", "hash", "hashes", "test_instrument", "text"}``: ``hashes`` maps each
    metric to its judge hash, ``hash`` is one id over all of them (its first 12 hex digits are printed),
    ``text`` is the line for table headers and figures. ``em_questions`` (``config.em_questions``: the em
    suite's question file, or None for the packaged set, and its sha256) is named in the text and kept as
    ``"em_questions"``. Raises ``MixedJudgeError`` naming the metric and both hashes (with their back-ends
    and models) when a metric was scored by two judges, and ``ValueError`` for an empty frame.
    """
    if scores.height == 0:
        raise ValueError("judge_stamp: no scores, so no judge to name")
    judges = scores.select(*STAMP_COLUMNS).unique().sort("metric", "judge_hash")
    hashes: dict[str, str] = {}
    for metric, group in judges.group_by("metric", maintain_order=True):
        name = metric[0] if isinstance(metric, tuple) else metric
        if group.height > 1:
            first, second = group.row(0, named=True), group.row(1, named=True)
            raise MixedJudgeError(
                f"metric {name!r} was scored by {group.height} judges: {first['judge_hash']}"
                f" ({first['judge_backend']} {first['judge_model']}) and {second['judge_hash']}"
                f" ({second['judge_backend']} {second['judge_model']}). A table averages one judge's verdicts;"
                " rerun the judge jobs with one judge (snakemake --forcerun judge) or remove the stale scores."
            )
        hashes[str(name)] = str(group["judge_hash"][0])
    backends = sorted(set(judges["judge_backend"].to_list()))
    models = sorted(set(judges["judge_model"].to_list()))
    combined = sha256_text(canonical_json(hashes))
    test_instrument = any(b in TEST_INSTRUMENTS for b in backends)
    text = f"Judge: {', '.join(backends)} · {', '.join(models)} · judge hash {combined[:12]}"
    if test_instrument:
        text += " (TEST INSTRUMENT: keyword counts, not a judgement; never report these numbers)"
    if em_questions is not None:
        text += ". " + questions_stamp(em_questions)
    return {
        "backend": ", ".join(backends),
        "model": ", ".join(models),
        "hash": combined,
        "hashes": hashes,
        "test_instrument": test_instrument,
        "text": text,
        **({"em_questions": dict(em_questions)} if em_questions is not None else {}),
    }


def questions_stamp(em_questions: Mapping[str, Any]) -> str:
    """The em question set in a table's stamp: its file (or "packaged") and the first 12 hex digits of its
    sha256, so two tables made from different question sets never pass for one another."""
    source = em_questions.get("questions_file") or "packaged"
    return f"EM questions: {source} (sha256 {str(em_questions['questions_sha256'])[:12]})"


def sampling_stamp(backends: Mapping[str, Mapping[str, str | None]]) -> dict[str, Any]:
    """The sampling back-end of each model's answers: ``backends`` maps model -> {Samples file -> back-end}.

    Every comparison in the tables is within one model (conditions against each other and the base), so
    each model's files must share one back-end; ``check_one_backend`` raises ``SamplingBackendMismatch``
    naming the files otherwise (say half of them sampled before a switch to vLLM). A file without the
    footer key counts as ``hf``, the default. Returns ``{"backends": {model: back-end}, "text"}``.
    """
    found = {model: check_one_backend(sides) for model, sides in sorted(backends.items()) if sides}
    kinds = sorted(set(found.values()))
    if len(kinds) == 1:
        text = f"Sampling back-end: {kinds[0]}"
    else:
        text = "Sampling back-ends: " + ", ".join(f"{model} {backend}" for model, backend in found.items())
    return {"backends": found, "text": text}
