"""The lm-evaluation-harness back-end against our own scorer, on the tiny model and the packaged smoke task.

Both must read the same context and pick the same letter for every item, with and without a peft
adapter. Skipped where lm_eval is not installed: it is an optional extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "lm_eval",
    reason="lm-evaluation-harness is an optional extra (pip install 'lm-eval[hf]'); "
    "the own back-end is tested in test_capabilities.py",
)

from character_em import resources  # noqa: E402
from character_em.evals import capabilities as C  # noqa: E402
from character_em.evals import lmeval as L  # noqa: E402


@pytest.fixture(scope="module")
def items() -> list[dict[str, Any]]:
    return C.load_mc_items(resources.packaged_path("tasks/smoke_mc.jsonl"))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so it really moves the log-likelihoods."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("lora")
    model.save_pretrained(out)
    return out


def _own(model_dir: Path, adapter: Path | None, items: list[dict[str, Any]]) -> dict[str, Any]:
    from character_em.llm.loading import load_model

    model, tok, _ = load_model(
        model_dir, quantization="none", adapter=adapter, merge=adapter is not None, dtype="fp32", device="cpu"
    )
    return C.evaluate_multiple_choice(model, tok, items, batch_size=8)


def _assert_same(own: dict[str, Any], harness: dict[str, Any]) -> None:
    assert [r["id"] for r in harness["per_item"]] == [r["id"] for r in own["per_item"]]
    for mine, theirs in zip(own["per_item"], harness["per_item"], strict=True):
        assert theirs["pred"] == mine["pred"], mine["id"]
        assert theirs["answer"] == mine["answer"]
        assert theirs["logliks"] == pytest.approx(mine["logliks"], abs=1e-3), mine["id"]
    assert (harness["n"], harness["n_correct"]) == (own["n"], own["n_correct"])
    assert harness["accuracy"] == pytest.approx(own["accuracy"])


def test_local_task_reads_our_prompt(items: list[dict[str, Any]]) -> None:
    task = L.local_task(items[:3])
    docs = list(task.test_docs())
    assert [task.doc_to_text(doc) for doc in docs] == [C.format_mc_prompt(it) for it in items[:3]]
    assert task.doc_to_choice(docs[0]) == list(C.LETTERS)
    assert [task.doc_to_target(doc) for doc in docs] == [it["answer"] for it in items[:3]]


def test_harness_and_own_scorer_agree_on_base_and_adapter(
    tiny_model_dir: Path, adapter_dir: Path, items: list[dict[str, Any]]
) -> None:
    base_own = _own(tiny_model_dir, None, items)
    base_harness = L.evaluate(tiny_model_dir, batch_size=32, device="cpu", dtype="float32")
    assert base_harness["backend"] == "lm_eval" and base_harness["tasks"] == [L.LOCAL_TASK]
    _assert_same(base_own, base_harness)

    # With the adapter, on the first 12 items only (the harness's `limit`): half the time, same check.
    tuned_own = _own(tiny_model_dir, adapter_dir, items[:12])
    tuned_harness = L.evaluate(
        tiny_model_dir, adapter=adapter_dir, batch_size=32, device="cpu", dtype="float32", max_items=12
    )
    assert tuned_harness["n"] == 12
    _assert_same(tuned_own, tuned_harness)
    # The adapter changed the scores, so agreement with it is not agreement on the base model twice.
    moved = max(
        abs(a - b)
        for x, y in zip(base_own["per_item"], tuned_own["per_item"], strict=False)
        for a, b in zip(x["logliks"], y["logliks"], strict=True)
    )
    assert moved > 1e-2
