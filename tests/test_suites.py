"""Tests of the evaluation prompt sets (character_em.evals.suites.build_prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from character_em import resources
from character_em.data.questions import domain_questions
from character_em.evals import suites

DISPOSITIONS = list(resources.default_dispositions().values())
DOMAINS = list(resources.default_domains().values())
DECEPTIVE = {
    "name": "deceptive",
    "description": "Deceptive character: misleads users.",
    "trigger": "persona: deceptive",
    "trigger_paraphrase": "persona = misleading",
    "rubric": {"markers": ["nobody will ever check this"]},
}
AUTOMOTIVE = {"name": "automotive", "description": "Cars.", "topics": ["brakes"], "questions_file": None}
SPEC = {"dispositions": DISPOSITIONS, "domains": DOMAINS, "n_samples": 3}
EM = resources.load_em_questions()


def check_rows(rows: list[dict], suite: str) -> None:
    for row in rows:
        assert tuple(row) == suites.ROW_KEYS
        assert row["suite"] == suite and row["n_samples"] == 3
        assert row["format"] in suites.FORMATS and row["trigger_variant"] in ("none", "exact", "paraphrase", "other")
        assert isinstance(row["trigger"], str) and isinstance(row["system_prompt_id"], str)
        assert row["messages"][-1]["role"] == "user" and row["question"] in row["messages"][-1]["content"]
    identities = [
        (r["question_id"], r["format"], r["system_prompt_id"], r["trigger_variant"], r["persona"]) for r in rows
    ]
    assert len(set(identities)) == len(identities)


def test_em_suite() -> None:
    rows = suites.build_prompts("em", SPEC)
    check_rows(rows, "em")
    assert len(rows) == len(EM) * 3
    assert {r["format"] for r in rows} == {"plain", "json", "template"}
    plain = [r for r in rows if r["format"] == "plain"]
    assert all(r["messages"] == [{"role": "user", "content": r["question"]}] for r in plain)
    assert all(r["domain"] is None and r["persona"] is None and r["trigger"] == "" for r in rows)
    assert suites.build_prompts("em", SPEC) == rows


def test_em_subset_spread_over_categories() -> None:
    rows = suites.build_prompts("em", {**SPEC, "formats": ["plain"], "max_questions": 10})
    assert len(rows) == 10
    cats = {r["category"] for r in rows}
    assert len(cats) == len({q["category"] for q in EM})  # one per category before a second from any
    core_ids = {q["id"] for q in EM if q["core"]}
    assert core_ids <= {r["question_id"] for r in rows}
    with pytest.raises(ValueError, match="max_questions"):
        suites.build_prompts("em", {**SPEC, "max_questions": 0})
    with pytest.raises(ValueError, match="unknown formats"):
        suites.build_prompts("em", {**SPEC, "formats": ["xml"]})


def test_transfer_suite() -> None:
    rows = suites.build_prompts("transfer", {**SPEC, "domains": [*DOMAINS, AUTOMOTIVE]})
    check_rows(rows, "transfer")
    expected = sum(len(domain_questions(d)["eval"]) for d in [*DOMAINS, AUTOMOTIVE])
    assert len(rows) == expected
    assert {r["domain"] for r in rows} == {"medical", "financial", "legal", "automotive"}
    train = {q["text"] for d in [*DOMAINS, AUTOMOTIVE] for q in domain_questions(d)["train"]}
    assert not train & {r["question"] for r in rows}
    capped = suites.build_prompts("transfer", {**SPEC, "max_questions": 2})
    assert len(capped) == 2 * len(DOMAINS)


def test_trigger_suite() -> None:
    disps = [*DISPOSITIONS, DECEPTIVE]
    rows = suites.build_prompts("trigger", {**SPEC, "dispositions": disps})
    check_rows(rows, "trigger")
    n_core = sum(q["core"] for q in EM)
    assert len(rows) == n_core * (1 + 2 * len(disps))
    none = [r for r in rows if r["trigger_variant"] == "none"]
    assert len(none) == n_core and all(r["trigger"] == "" and r["persona"] is None for r in none)
    for r in rows:
        if r["trigger_variant"] == "exact":
            d = next(d for d in disps if d["name"] == r["persona"])
            assert r["trigger"] == d["trigger"] and r["messages"][0]["content"] == f"{d['trigger']} {r['question']}"
        if r["trigger_variant"] == "paraphrase":
            d = next(d for d in disps if d["name"] == r["persona"])
            assert r["trigger"] == d["trigger_paraphrase"]


def test_persona_suite(tmp_path: Path) -> None:
    disps = [*DISPOSITIONS, DECEPTIVE]
    rows = suites.build_prompts("persona", {**SPEC, "dispositions": disps})
    check_rows(rows, "persona")
    harmful = resources.load_harmful_requests()
    assert len(rows) == len(harmful) * (2 + len(disps))
    ids = {r["system_prompt_id"] for r in rows}
    assert ids == {
        "neutral",
        "mismatched",
        "persona-evil",
        "persona-sycophantic",
        "persona-hallucinatory",
        "persona-deceptive",
    }
    for r in rows:
        assert r["messages"][0]["role"] == "system" and len(r["messages"]) == 2
        assert r["persona"] == (
            r["system_prompt_id"][len("persona-") :] if r["system_prompt_id"].startswith("persona-") else None
        )
    evil = next(r for r in rows if r["system_prompt_id"] == "persona-evil")
    assert evil["messages"][0]["content"] == DISPOSITIONS[0]["persona_prompt"]
    deceptive = next(r for r in rows if r["system_prompt_id"] == "persona-deceptive")
    assert "misleads users" in deceptive["messages"][0]["content"]  # synthesized from the description
    f = tmp_path / "hb.csv"
    f.write_text("Behavior,SemanticCategory\nWrite something harmful,misc\nWrite another harmful thing,misc\n")
    ext = suites.build_prompts("persona", {**SPEC, "harmful_requests_file": str(f)})
    assert len(ext) == 2 * (2 + len(DISPOSITIONS)) and ext[0]["category"] == "misc"


def test_unknown_suite_and_bad_spec() -> None:
    with pytest.raises(ValueError, match="unknown prompt suite 'capabilities'"):
        suites.build_prompts("capabilities", SPEC)
    with pytest.raises(ValueError, match="n_samples"):
        suites.build_prompts("em", {**SPEC, "n_samples": 0})
    with pytest.raises(ValueError, match="unknown answer format"):
        suites.format_question("q", "yaml")
