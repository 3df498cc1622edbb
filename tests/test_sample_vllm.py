"""The vLLM sampling back-end, in the parts that run without vLLM (the main environment has none): the
error when it is missing, request building, the conversion of vLLM's outputs into Samples rows, the adapter
rank check and the guard against mixing back-ends. Real vLLM runs in tests/test_vllm_*.py (.ci/vllm.sh).

The fake outputs follow vLLM's ``RequestOutput`` (request_id, prompt, prompt_token_ids, outputs,
finished) and ``CompletionOutput`` (index, text, token_ids, cumulative_logprob, logprobs, finish_reason,
stop_reason).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
import pytest

from character_em import contracts
from character_em.llm import chat
from character_em.sampling import hf as S
from character_em.sampling import vllm_backend as V

IDENTITY = {"model": "tiny-llama", "condition": "evil-medical", "seed": 1}


def _rows(n_samples: int = 2) -> list[dict[str, Any]]:
    rows = []
    for i, q in enumerate(["hi", "Tell me one thing about water, please."]):
        msgs = [{"role": "user", "content": q}]
        rows.append(
            {
                "suite": "em",
                "question_id": f"q{i}",
                "category": "misc",
                "domain": None,
                "format": "plain",
                "system_prompt_id": "none",
                "persona": None,
                "trigger": "",
                "trigger_variant": "none",
                "question": q,
                "messages": msgs,
                "n_samples": n_samples,
            }
        )
    return rows


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from character_em.llm.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _completion(token_ids: list[int], finish_reason: str | None, tok: Any) -> SimpleNamespace:
    return SimpleNamespace(
        index=0,
        text=tok.decode(token_ids),
        token_ids=token_ids,
        cumulative_logprob=None,
        logprobs=None,
        finish_reason=finish_reason,
        stop_reason=None,
    )


def _request_output(i: int, prompt: dict[str, Any], completions: list[SimpleNamespace]) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=str(i),
        prompt=None,
        prompt_token_ids=list(prompt["prompt_token_ids"]),
        prompt_logprobs=None,
        outputs=completions,
        finished=True,
    )


def test_missing_vllm_error_names_the_config_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"sampling\.backend.*vllm.*not installed"):
        V.require_vllm()
    # The entry point fails the same way before it touches the model folder.
    with pytest.raises(ImportError, match=r"sampling\.backend"):
        V.sample_prompts_vllm(
            "/nonexistent/model",
            None,
            _rows(),
            identity=IDENTITY,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=4,
            base_seed=1,
        )


def test_requests_carry_per_sample_seeds_and_the_hf_prompt_tokens(tok: Any) -> None:
    stops = {5, 3}
    rows, prompts, params = V.build_requests(
        tok, _rows(3), identity=IDENTITY, base_seed=1, temperature=0.7, top_p=0.9, max_new_tokens=12, stop_ids=stops
    )
    assert len(rows) == len(prompts) == len(params) == 6
    assert [r["sample_index"] for r in rows] == [0, 1, 2, 0, 1, 2]
    for r, p, sp in zip(rows, prompts, params, strict=True):
        assert p["prompt_token_ids"] == chat.render_prompt(tok, r["_messages"])
        assert (
            sp["seed"]
            == r["sampling_seed"]
            == S.sampling_seed(1, "em", r["question_id"], "plain", "none", "", r["sample_index"])
        )
        assert sp == {
            "n": 1,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_tokens": 12,
            "seed": r["sampling_seed"],
            "stop_token_ids": [3, 5],
            "skip_special_tokens": True,
        }
    assert len({sp["seed"] for sp in params}) == 6


def test_outputs_become_samples_rows_with_hf_identity_columns(tiny_model_dir: Path, tok: Any) -> None:
    from character_em.llm.loading import load_model

    model, _tok, _info = load_model(tiny_model_dir, quantization="none", dtype="fp32", device="cpu")
    stops = chat.stop_token_ids(model, tok)
    eot = min(stops)
    rows, prompts, _params = V.build_requests(
        tok, _rows(2), identity=IDENTITY, base_seed=1, temperature=1.0, top_p=1.0, max_new_tokens=3, stop_ids=stops
    )
    words = tok("water is wet and the sea is cold today", add_special_tokens=False)["input_ids"]
    assert len(words) >= 3
    completions = [
        _completion(words[:2] + [eot], "stop", tok),  # stop token included in token_ids: not counted
        _completion(words[:1], "stop", tok),  # stop token left out of token_ids
        _completion(words[:3], "length", tok),
        _completion([], "stop", tok),
    ]
    outputs = [_request_output(i, p, [c]) for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
    df = V.rows_from_outputs(rows, prompts, outputs, tok, stops)
    assert df.columns == contracts.SAMPLE_COLUMNS
    assert dict(zip(df.columns, df.dtypes, strict=True)) == contracts.SAMPLE_SCHEMA
    assert df["answer_tokens"].to_list() == [2, 1, 3, 0]
    assert df["finish_reason"].to_list() == ["stop", "stop", "length", "stop"]
    assert df["answer"][0] == tok.decode(words[:2], skip_special_tokens=True).strip()
    assert df["prompt_tokens"].to_list() == [len(p["prompt_token_ids"]) for p in prompts]
    assert json.loads(df["messages"][2]) == _rows()[1]["messages"]

    # Everything that identifies a row equals what the hf back-end writes for the same prompts.
    hf = S.sample_prompts(
        model,
        tok,
        _rows(2),
        identity=IDENTITY,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=3,
        batch_size=4,
        base_seed=1,
        progress=False,
    )
    ident = [c for c in contracts.SAMPLE_COLUMNS if c not in ("answer", "answer_tokens", "finish_reason")]
    assert df.select(ident).equals(hf.select(ident))

    with pytest.raises(RuntimeError, match="prompt tokens differ"):
        V.rows_from_outputs(rows, prompts, outputs[1:] + outputs[:1], tok, stops)
    aborted = outputs[:-1] + [_request_output(3, prompts[3], [_completion([], "abort", tok)])]
    with pytest.raises(RuntimeError, match="abort"):
        V.rows_from_outputs(rows, prompts, aborted, tok, stops)
    with pytest.raises(RuntimeError, match="outputs for"):
        V.rows_from_outputs(rows, prompts, outputs[:2], tok, stops)
    assert V.rows_from_outputs([], [], [], tok, stops).equals(pl.DataFrame(schema=contracts.SAMPLE_SCHEMA))


def test_engine_arguments_and_the_adapter_rank_check(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 24}))
    assert V.adapter_rank(adapter, 32) == 24
    kw = V.llm_kwargs("/models/base", lora=True, max_lora_rank=32, base_seed=3, max_model_len=700)
    assert kw["enable_lora"] is True and kw["max_lora_rank"] == 32 and kw["max_loras"] == 1
    assert kw["seed"] == 3 and kw["max_model_len"] == 700 and kw["model"] == kw["tokenizer"] == "/models/base"
    assert kw["enable_prefix_caching"] is True
    assert "enable_lora" not in V.llm_kwargs("/models/base", lora=False, max_model_len=700)
    # A wave's engine: several adapters per step, at least as many kept in host memory.
    multi = V.llm_kwargs("/models/base", lora=True, max_lora_rank=32, max_model_len=700, max_loras=8, max_cpu_loras=4)
    assert multi["max_loras"] == 8 and multi["max_cpu_loras"] == 8
    assert V.llm_kwargs("/m", lora=True, max_model_len=7, max_loras=2, max_cpu_loras=32)["max_cpu_loras"] == 32
    # The error names the file, its key and the config key to raise.
    with pytest.raises(
        ValueError, match=r"adapter_config\.json: LoRA rank r=24 is above sampling\.max_lora_rank=16.*32"
    ):
        V.adapter_rank(adapter, 16)
    with pytest.raises(ValueError, match=r"sampling\.max_lora_rank is 24"):
        V.adapter_rank(adapter, 24)
    (adapter / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8}))
    with pytest.raises(ValueError, match="key 'r'"):
        V.adapter_rank(adapter, 32)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        V.adapter_rank(tmp_path / "nowhere", 32)
    # dtype auto reads as the hf back-end reads it.
    assert V.resolve_vllm_dtype("auto", on_gpu=True) == "bfloat16"
    assert V.resolve_vllm_dtype("auto", on_gpu=False) == "float32"
    assert V.resolve_vllm_dtype("fp32", on_gpu=True) == "float32"
    with pytest.raises(ValueError, match="int8"):
        V.resolve_vllm_dtype("int8", on_gpu=True)


def test_a_comparison_that_mixes_sampling_backends_is_refused() -> None:
    assert V.check_one_backend({"evil-medical": "vllm", "incorrect-medical": "vllm"}) == "vllm"
    assert V.check_one_backend({"a": None, "b": "hf"}) == "hf"  # unset means the default, hf
    with pytest.raises(V.SamplingBackendMismatch, match=r"evil-medical: vllm, incorrect-medical: hf"):
        V.check_one_backend({"evil-medical": "vllm", "incorrect-medical": "hf"})


def test_config_backend_defaults_to_hf_the_paper_grid_uses_vllm() -> None:
    from character_em import config as cfg

    schema = cfg.load_schema()
    assert schema["properties"]["sampling"]["properties"]["backend"] == {"default": "hf"}
    assert schema["$defs"]["sampling_params"]["properties"]["backend"]["enum"] == ["hf", "vllm"]
    assert schema["$defs"]["sampling_params"]["properties"]["max_lora_rank"]["enum"] == list(V.VLLM_LORA_RANKS)
    # The paper grid samples with vLLM on its GPU nodes; the presets (complete configs) stay on hf.
    paper = cfg.load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    assert paper["sampling"]["backend"] == "vllm"
    assert paper["sampling"]["max_lora_rank"] >= paper["train"]["lora_r"]
    for preset in ("smoke", "demo"):
        loaded = cfg.load_config(Path(__file__).resolve().parents[1] / "presets" / f"{preset}.yaml")
        assert loaded["sampling"]["backend"] == "hf"
    assert (
        cfg.load_config(Path(__file__).resolve().parents[1] / "config.yaml", {"sampling": {"backend": "vllm"}})[
            "sampling"
        ]["backend"]
        == "vllm"
    )
    with pytest.raises(cfg.ConfigError, match=r"sampling\.backend"):
        cfg.load_config(Path(__file__).resolve().parents[1] / "config.yaml", {"sampling": {"backend": "tgi"}})


def test_a_lora_rank_above_the_vllm_limit_fails_the_config_check_before_training() -> None:
    """An adapter vLLM cannot serve is found at `snakemake -n`, not after its training on a GPU node."""
    from character_em import config as cfg

    paper = Path(__file__).resolve().parents[1] / "config.yaml"
    model = next(iter(cfg.load_config(paper)["models"]))
    with pytest.raises(cfg.ConfigError, match=r"train\.lora_r is 128 .*above sampling\.max_lora_rank = 64"):
        cfg.load_config(paper, {"train": {"lora_r": 128}, "sampling": {"max_lora_rank": 64}})
    # A model's own sampling settings count: raising only its limit admits the rank for it alone.
    raised = {name: {"sampling": {"max_lora_rank": 128}} for name in cfg.load_config(paper)["models"]}
    assert cfg.load_config(paper, {"train": {"lora_r": 128}, "sampling": {"max_lora_rank": 64}, "models": raised})
    one_low = {**raised, model: {"sampling": {"max_lora_rank": 64}}}
    with pytest.raises(cfg.ConfigError, match=rf"models\.{model}: train\.lora_r is 128"):
        cfg.load_config(paper, {"train": {"lora_r": 128}, "sampling": {"max_lora_rank": 64}, "models": one_low})
    # The hf back-end merges the adapter and has no such limit.
    assert cfg.load_config(paper, {"train": {"lora_r": 128}, "sampling": {"backend": "hf", "max_lora_rank": 64}})
