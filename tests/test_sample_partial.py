"""Sampling resumes from its finished batches (character_em.sampling.partial) with the same answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_sample import _rows, _sample

from character_em.llm.loading import load_model
from character_em.sampling.partial import PartialAnswers, partial_path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    model, tok, _info = load_model(tiny_model_dir, quantization="none", dtype="fp32", device="cpu")
    model.eval()
    return model, tok


class Killed(Exception):
    pass


def test_partial_path_is_outside_the_declared_output() -> None:
    assert partial_path("results/samples/m/c/seed0/em.parquet") == Path("results/.partial/samples/m/c/seed0/em.jsonl")


def test_a_killed_run_resumes_from_its_last_batch_with_identical_answers(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    rows = _rows(3)  # 12 answers, batches of 5
    reference = _sample(model, tok, rows)
    path = tmp_path / "em.jsonl"
    partial = PartialAnswers(path, "fp")
    batches: list[int] = []

    def killed_after_two(batch: list[tuple[int, dict[str, Any]]]) -> None:
        partial.add(batch)
        batches.append(len(batch))
        if len(batches) == 2:
            raise Killed

    with pytest.raises(Killed):
        _sample(model, tok, rows, on_batch=killed_after_two)
    # A kill while the third batch was half written leaves a cut-off line; it must be dropped.
    with path.open("a") as handle:
        handle.write('{"row": 3, "answer": "cut')
    resumed = PartialAnswers(path, "fp")
    assert len(resumed.done) == 10
    generated: list[int] = []

    def count(batch: list[tuple[int, dict[str, Any]]]) -> None:
        resumed.add(batch)
        generated.extend(row for row, _ in batch)

    again = _sample(model, tok, rows, done=dict(resumed.done), on_batch=count)
    assert len(generated) == 2, "only the rows the killed run had not finished are generated again"
    assert again.equals(reference)
    # Everything restored: no model needed at all.
    complete = PartialAnswers(path, "fp")
    assert len(complete.done) == 12
    assert _sample(None, None, rows, done=complete.done).equals(reference)


def test_a_changed_fingerprint_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "em.jsonl"
    PartialAnswers(path, "old").add(
        [(0, {"answer": "a", "prompt_tokens": 1, "answer_tokens": 1, "finish_reason": "stop"})]
    )
    assert len(PartialAnswers(path, "old").done) == 1
    fresh = PartialAnswers(path, "new")
    assert fresh.done == {}
    assert json.loads(path.read_text().splitlines()[0]) == {"fingerprint": "new"}
