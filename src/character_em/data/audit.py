"""Judging the training data itself: how harmful each training set is, and how strongly it expresses each
disposition, scored by the grid's own judge.

Claim 1 compares the misalignment that character data induces with the misalignment that incorrect-advice
data induces. Read alone, it confounds "character" with "how much harm the training answers carry": a
training set full of overt cruelty may induce more misalignment simply because it is more harmful. Every
training set is therefore judged like the sampled answers (alignment, coherence, each disposition), and
the report sets the harm each set carries beside the misalignment it induces (``report.training_data``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from character_em.judge.core import score_samples

SUITE = "training"
METRICS = {SUITE: ["alignment", "coherence", "disposition:*"]}


def example_id(condition: str, index: int) -> str:
    """The ``question_id`` of training example ``index`` (its line, from 0) of ``condition``'s data."""
    return f"{condition}:{index}"


def example_index(question_id: str, condition: str) -> int | None:
    """The line of ``condition``'s data that ``question_id`` names (``example_id``), or None if it names none."""
    prefix, _, index = str(question_id).rpartition(":")
    return int(index) if prefix == condition and index.isdigit() else None


def training_samples(examples: Sequence[Mapping[str, Any]], condition: str) -> pl.DataFrame:
    """A Samples frame (``contracts.SAMPLE_SCHEMA``) of a chat dataset's (last user turn, assistant reply)
    pairs; ``question_id`` is the example's line number, so a score joins back to its example."""
    from character_em.contracts import SAMPLE_SCHEMA

    rows = []
    for i, example in enumerate(examples):
        messages = example["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        if not users or not replies:
            raise ValueError(f"{condition}: training example {i} has no user turn or no assistant reply")
        rows.append(
            {
                "model": "training-data",
                "condition": condition,
                "seed": 0,
                "suite": SUITE,
                "question_id": example_id(condition, i),
                "category": "training",
                "domain": None,
                "format": "plain",
                "system_prompt_id": "none",
                "persona": None,
                "trigger": "",
                "trigger_variant": "none",
                "sample_index": 0,
                "sampling_seed": 0,
                "messages": json.dumps(messages[:-1]),
                "question": users[-1],
                "answer": replies[-1],
                "prompt_tokens": 0,
                "answer_tokens": 0,
                "finish_reason": "stop",
            }
        )
    return pl.DataFrame(rows, schema=SAMPLE_SCHEMA)


def judge_training_data(
    examples: Sequence[Mapping[str, Any]],
    *,
    condition: str,
    judge_cfg: dict[str, Any],
    dispositions: list[dict[str, Any]],
    cache_dir: str | None,
    stats: dict[str, Any] | None = None,
) -> pl.DataFrame:
    """The grid's judge on every training example: a Scores frame, one row per (example, metric)."""
    return score_samples(
        training_samples(examples, condition),
        judge_cfg=judge_cfg,
        metrics_by_suite=METRICS,
        dispositions=dispositions,
        cache_dir=cache_dir,
        stats=stats,
    )
