"""Tests for character_em.sampling.hf: columns, counts, per-sample reproducibility, greedy parity with HF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from character_em import contracts
from character_em.files import write_parquet_atomic
from character_em.llm import chat
from character_em.sampling import hf as S

IDENTITY = {"model": "tiny-llama", "condition": "base", "seed": 0}
QUESTIONS = [
    "hi",
    "What is the capital of France and why does it matter so much to the people?",
    "I would like money",
    "Tell me one thing about water.",
]


def _load(path: Path) -> tuple[Any, Any]:
    from character_em.llm.loading import load_model

    model, tok, _info = load_model(path, quantization="none", dtype="fp32", device="cpu")
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return _load(tiny_model_dir)


def _rows(n_samples: int = 3, questions: list[str] = QUESTIONS) -> list[dict[str, Any]]:
    rows = []
    for i, q in enumerate(questions):
        sys_id = "none" if i % 2 == 0 else "helper"
        msgs = [{"role": "user", "content": q}]
        if sys_id != "none":
            msgs = [{"role": "system", "content": "You are a helper."}, *msgs]
        rows.append(
            {
                "suite": "em",
                "question_id": f"q{i}",
                "category": "misc",
                "domain": None,
                "format": "plain",
                "system_prompt_id": sys_id,
                "persona": None,
                "trigger": "",
                "trigger_variant": "none",
                "question": q,
                "messages": msgs,
                "n_samples": n_samples,
            }
        )
    return rows


def _sample(model: Any, tok: Any, rows: list[dict[str, Any]], **kw: Any) -> pl.DataFrame:
    args: dict[str, Any] = dict(
        identity=IDENTITY, temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=5, base_seed=7, progress=False
    )
    args.update(kw)
    return S.sample_prompts(model, tok, rows, **args)


def test_sampling_seed_is_stable_and_distinct() -> None:
    a = S.sampling_seed(1, "em", "q0", "plain", "none", "", 0)
    assert a == S.sampling_seed(1, "em", "q0", "plain", "none", "", 0)
    assert 0 <= a < 2**63
    others = {
        S.sampling_seed(2, "em", "q0", "plain", "none", "", 0),
        S.sampling_seed(1, "persona", "q0", "plain", "none", "", 0),
        S.sampling_seed(1, "em", "q1", "plain", "none", "", 0),
        S.sampling_seed(1, "em", "q0", "json", "none", "", 0),
        S.sampling_seed(1, "em", "q0", "plain", "evil", "", 0),
        S.sampling_seed(1, "em", "q0", "plain", "none", "persona: evil", 0),
        S.sampling_seed(1, "em", "q0", "plain", "none", "", 1),
    }
    assert a not in others and len(others) == 7
    # Pinned value: guards against accidental changes to the hash recipe (would silently reseed runs).
    assert a == 7416529139303639627


def test_columns_counts_and_identity(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    df = _sample(model, tok, _rows(3))
    assert df.columns == contracts.SAMPLE_COLUMNS
    assert dict(zip(df.columns, df.dtypes, strict=True)) == contracts.SAMPLE_SCHEMA
    assert df.height == 3 * len(QUESTIONS)
    assert df["sample_index"].to_list() == [0, 1, 2] * len(QUESTIONS)
    assert set(df["model"]) == {"tiny-llama"} and set(df["condition"]) == {"base"} and set(df["seed"]) == {0}
    assert df["sampling_seed"].n_unique() == df.height
    assert set(df["finish_reason"]) <= {"stop", "length"}
    assert (df["answer_tokens"] <= 12).all() and (df["prompt_tokens"] > 0).all()
    msgs = json.loads(df["messages"][2])
    assert msgs[-1]["content"] == QUESTIONS[0]
    assert df.filter(pl.col("question_id") == "q1")["system_prompt_id"].unique().to_list() == ["helper"]
    assert df["trigger"].to_list() == [""] * df.height


def test_empty_rows(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    df = _sample(model, tok, [])
    assert df.height == 0 and df.columns == contracts.SAMPLE_COLUMNS


def test_deterministic_and_batch_invariant(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    rows = _rows(2)
    a = _sample(model, tok, rows, batch_size=5)
    b = _sample(model, tok, rows, batch_size=5)
    assert a.equals(b)
    # Different batching (incl. batch 1 and one big batch) must give identical answers, row by row.
    c = _sample(model, tok, rows, batch_size=1)
    d = _sample(model, tok, rows, batch_size=64)
    assert a.equals(c) and a.equals(d)
    # Different base seed changes samples.
    e = _sample(model, tok, rows, base_seed=8)
    assert e["answer"].to_list() != a["answer"].to_list()


def test_single_sample_regeneration_token_level(tiny: tuple[Any, Any]) -> None:
    """Regenerate one sample alone (batch of 1, no padding) and compare token ids with the same sample
    decoded inside a padded batch of prompts of different lengths."""
    model, tok = tiny
    rows = _rows(4)
    prompts, seeds = [], []
    for r in rows:
        for k in range(4):
            prompts.append(chat.render_prompt(tok, r["messages"]))
            seeds.append(S.sampling_seed(7, "em", r["question_id"], "plain", r["system_prompt_id"], "", k))
    assert len({len(p) for p in prompts}) > 1, "need different prompt lengths to exercise left padding"
    stops = chat.stop_token_ids(model, tok)
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=16, stop_ids=stops, pad_id=tok.pad_token_id or 0)
    batched = S.generate_batch(model, prompts, seeds, **kw)
    for j in [0, 5, 10, 15]:
        alone = S.generate_batch(model, [prompts[j]], [seeds[j]], **kw)
        assert alone[0] == batched[j]


def test_left_padding_logits_match_unpadded(tiny: tuple[Any, Any]) -> None:
    """The padded prefill must see the same positions as the unpadded one (position_ids from the mask)."""
    import torch

    model, tok = tiny
    short = chat.render_prompt(tok, [{"role": "user", "content": "hi"}])
    long = chat.render_prompt(tok, [{"role": "user", "content": QUESTIONS[1]}])
    pad = len(long) - len(short)
    ids = torch.tensor([[0] * pad + short, long])
    attn = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        batched = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[0, -1]
        alone = model(input_ids=torch.tensor([short])).logits[0, -1]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_greedy_matches_hf_generate(tiny: tuple[Any, Any]) -> None:
    import torch

    model, tok = tiny
    stops = chat.stop_token_ids(model, tok)
    rows = _rows(1)
    df = _sample(model, tok, rows, temperature=0.0, max_new_tokens=10)
    for r, ans_ids in zip(
        rows,
        S.generate_batch(
            model,
            [chat.render_prompt(tok, r["messages"]) for r in rows],
            [0] * len(rows),
            temperature=0.0,
            top_p=1.0,
            max_new_tokens=10,
            stop_ids=stops,
            pad_id=tok.pad_token_id or 0,
        ),
        strict=True,
    ):
        prompt = chat.render_prompt(tok, r["messages"])
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                do_sample=False,
                max_new_tokens=10,
                eos_token_id=sorted(stops),
                pad_token_id=tok.pad_token_id or 0,
            )
        hf = [int(t) for t in out[0, len(prompt) :]]
        hf_trimmed = []
        for t in hf:
            if t in stops:
                break
            hf_trimmed.append(t)
        assert ans_ids[0] == hf_trimmed
    # Greedy ignores seeds: all samples of a question are equal.
    assert df.group_by("question_id").agg(pl.col("answer").n_unique())["answer"].max() == 1


def test_finish_reasons(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    rows = _rows(1, questions=["hi"])
    greedy = S.generate_batch(
        model,
        [chat.render_prompt(tok, rows[0]["messages"])],
        [0],
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=6,
        stop_ids=chat.stop_token_ids(model, tok),
        pad_id=0,
    )[0][0]
    assert len(greedy) == 6
    df = _sample(model, tok, rows, temperature=0.0, max_new_tokens=6)
    assert df["finish_reason"].to_list() == ["length"] and df["answer_tokens"].to_list() == [6]
    # Make the 3rd greedy token an end-of-turn token: the row stops there, the stop token not counted.
    old = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [greedy[2]]
        df = _sample(model, tok, rows, temperature=0.0, max_new_tokens=6)
        assert df["finish_reason"].to_list() == ["stop"]
        assert df["answer_tokens"].to_list() == [greedy[:3].index(greedy[2])]
    finally:
        model.generation_config.eos_token_id = old


def test_write_parquet_atomic(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    df = _sample(model, tok, _rows(1))
    out = write_parquet_atomic(df, tmp_path / "sub" / "samples.parquet")
    assert pl.read_parquet(out).equals(df)
    assert [p.name for p in out.parent.iterdir()] == ["samples.parquet"]


def test_qwen_style_template_and_peft_wrapper(tiny_qwen_model_dir: Path) -> None:
    """ChatML template (eos <|im_end|>) and a PEFT-wrapped model go through the same loop, and batching
    still does not change any sample."""
    from peft import LoraConfig, get_peft_model

    model, tok = _load(tiny_qwen_model_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") in chat.stop_token_ids(model, tok)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    rows = _rows(2)
    a = _sample(peft_model, tok, rows, batch_size=3)
    b = _sample(peft_model, tok, rows, batch_size=1)
    assert a.equals(b) and a.height == 2 * len(QUESTIONS)
    ids = chat.render_prompt(tok, rows[0]["messages"])
    assert tok.decode(ids).rstrip().endswith("assistant")


def test_pick_tokens_nucleus_and_frequencies() -> None:
    import torch

    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    n = 4000
    logits = probs.log().expand(n, 4).clone()
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    picks = torch.tensor(S._pick_tokens(logits, gens, temperature=1.0, top_p=1.0))
    freq = torch.bincount(picks, minlength=4).double() / n
    assert torch.allclose(freq, probs.double(), atol=0.03)
    # top_p=0.8 keeps exactly the two most likely tokens (0.5 + 0.3), renormalised to 5/8 and 3/8.
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    picks = torch.tensor(S._pick_tokens(logits, gens, temperature=1.0, top_p=0.8))
    freq = torch.bincount(picks, minlength=4).double() / n
    assert freq[0] == 0 and freq[2] == 0 and abs(freq[1] - 0.625) < 0.03
    # Tiny top_p = greedy; temperature 0 = argmax and consumes no randomness.
    assert S._pick_tokens(logits[:3], gens[:3], temperature=1.0, top_p=1e-6) == [1, 1, 1]
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert S._pick_tokens(logits[:1], [g], temperature=0.0, top_p=1.0) == [1]
    assert torch.equal(g.get_state(), state)


def test_rows_finishing_early_leave_the_batch_without_changing_others(tiny: tuple[Any, Any]) -> None:
    """Pick a stop token that the unconstrained samples hit at different steps: rows that stop are
    pruned from the batch (and its KV cache) mid-decoding, and every row still matches its solo run
    and its unconstrained run cut at the first stop token."""
    from collections import Counter

    model, tok = tiny
    prompts = [chat.render_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS for _ in range(3)]
    seeds = list(range(100, 100 + len(prompts)))
    kw: dict[str, Any] = dict(temperature=1.0, top_p=1.0, max_new_tokens=20, pad_id=tok.pad_token_id or 0)
    free = S.generate_batch(model, prompts, seeds, stop_ids=set(), **kw)
    counts = Counter(t for ids, _ in free for t in set(ids))
    stop_tok = max(counts, key=lambda t: (counts[t] if counts[t] < len(prompts) else -1, -t))
    firsts = {ids.index(stop_tok) for ids, _ in free if stop_tok in ids}
    assert len(firsts) > 1, "need rows stopping at different steps"
    batched = S.generate_batch(model, prompts, seeds, stop_ids={stop_tok}, **kw)
    assert {r for _, r in batched} == {"stop", "length"}
    for j, ((ids, _), (got, reason)) in enumerate(zip(free, batched, strict=True)):
        if stop_tok in ids:
            assert (got, reason) == (ids[: ids.index(stop_tok)], "stop")
        else:
            assert (got, reason) == (ids, "length")
        assert S.generate_batch(model, [prompts[j]], [seeds[j]], stop_ids={stop_tok}, **kw)[0] == (got, reason)
