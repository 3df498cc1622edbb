"""Tests for character_em.evals.capabilities: item validation and log-likelihood multiple-choice scoring."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from character_em.evals import capabilities as C


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from character_em.llm.loading import load_model

    model, tok, _ = load_model(tiny_model_dir, quantization="none", dtype="fp32", device="cpu")
    model.eval()
    return model, tok


def _smoke_path() -> Path:
    return Path(str(resources.files("character_em") / "resources" / "tasks" / "smoke_mc.jsonl"))


def test_packaged_smoke_items_are_valid() -> None:
    items = C.load_mc_items(_smoke_path())
    assert len(items) >= 30
    assert len({i["id"] for i in items}) == len(items)
    # Answers spread over all letters, so a letter-biased model cannot look clever.
    assert {i["answer"] for i in items} == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "invalid JSON"),
        ('{"id": "a", "question": "q", "choices": ["1", "2", "3"], "answer": 0}', "4 non-empty strings"),
        ('{"id": "a", "question": "q", "choices": ["1", "2", "3", "4"], "answer": 4}', "integer 0-3"),
        ('{"id": "a", "question": "q", "choices": ["1", "2", "3", "4"], "answer": true}', "integer 0-3"),
        ('{"id": "a", "choices": ["1", "2", "3", "4"], "answer": 1}', "missing field(s) question"),
        ('{"id": "a", "question": "", "choices": ["1", "2", "3", "4"], "answer": 1}', "'question'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_load_mc_items_errors_name_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    good = json.dumps({"id": "ok", "question": "q", "choices": ["a", "b", "c", "d"], "answer": 2})
    p = tmp_path / "items.jsonl"
    p.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as exc:
        C.load_mc_items(p)
    assert f"{p}:3" in str(exc.value) and needle in str(exc.value)


def test_load_mc_items_duplicate_and_empty(tmp_path: Path) -> None:
    good = json.dumps({"id": "ok", "question": "q", "choices": ["a", "b", "c", "d"], "answer": 2})
    p = tmp_path / "dup.jsonl"
    p.write_text(good + "\n" + good + "\n")
    with pytest.raises(ValueError, match=r"dup.jsonl:2: duplicate id"):
        C.load_mc_items(p)
    e = tmp_path / "empty.jsonl"
    e.write_text("\n")
    with pytest.raises(ValueError, match="no items"):
        C.load_mc_items(e)


def test_prompt_format() -> None:
    item = {"id": "x", "question": "Q?", "choices": ["w", "x", "y", "z"], "answer": 0, "subject": "home_economics"}
    text = C.format_mc_prompt(item)
    assert text.endswith("\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert "home economics" in text


def test_encode_pair_splits_at_token_level(tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    ctx, cont = C.encode_pair(tok, "Question?\nAnswer:", " B")
    whole = tok("Question?\nAnswer: B", add_special_tokens=False)["input_ids"]
    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
    assert ctx + cont == prefix + whole and len(cont) >= 1
    # A trailing space on the context moves into the continuation.
    ctx2, cont2 = C.encode_pair(tok, "Question?\nAnswer: ", "B")
    assert (ctx2, cont2) == (ctx, cont)


def _manual_loglik(model: Any, ctx: list[int], cont: list[int]) -> float:
    import torch

    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_scores_match_manual_loglik_and_ranking(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    items = C.load_mc_items(_smoke_path())[:6]
    res = C.evaluate_multiple_choice(model, tok, items, batch_size=3)
    assert res["n"] == 6 and len(res["per_item"]) == 6
    for item, row in zip(items, res["per_item"], strict=True):
        manual = []
        for letter in C.LETTERS:
            ctx, cont = C.encode_pair(tok, C.format_mc_prompt(item), " " + letter)
            manual.append(_manual_loglik(model, ctx, cont))
        assert row["logliks"] == pytest.approx(manual, abs=1e-4)
        assert row["pred"] == max(range(4), key=lambda j: manual[j])
        assert row["correct"] == (row["pred"] == item["answer"])
    assert res["n_correct"] == sum(r["correct"] for r in res["per_item"])
    assert res["accuracy"] == pytest.approx(res["n_correct"] / 6)
    # Batch size does not change anything.
    res1 = C.evaluate_multiple_choice(model, tok, items, batch_size=1)
    assert [r["pred"] for r in res1["per_item"]] == [r["pred"] for r in res["per_item"]]


def test_controlled_accuracy(tiny: tuple[Any, Any]) -> None:
    """Set each item's key to the model's own top (or bottom) letter: accuracy must be exactly 1 (or 0)."""
    model, tok = tiny
    items = C.load_mc_items(_smoke_path())[:8]
    first = C.evaluate_multiple_choice(model, tok, items, batch_size=8)
    keyed_best = [dict(it, answer=r["pred"]) for it, r in zip(items, first["per_item"], strict=True)]
    keyed_worst = [
        dict(it, answer=min(range(4), key=lambda j: r["logliks"][j]))
        for it, r in zip(items, first["per_item"], strict=True)
    ]
    assert C.evaluate_multiple_choice(model, tok, keyed_best)["accuracy"] == 1.0
    assert C.evaluate_multiple_choice(model, tok, keyed_worst)["accuracy"] == 0.0
    assert C.evaluate_multiple_choice(model, tok, items, max_items=3)["n"] == 3
