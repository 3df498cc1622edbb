"""The vllm data writer (``data.generator.backend: vllm``) with REAL vLLM (run by .ci/vllm.sh; skipped where
vLLM is not installed): SmolLM2-135M-Instruct in float32, one engine for the job, answers equal to the hf
writer's token for token when both decode greedily, and a rerun served from the generation cache without
starting an engine. One engine start (about 40 s on a CPU) for the module.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from vllm_support import smollm2_dir, vllm_or_skip  # noqa: E402

vllm_or_skip()

from character_em.conditions import parse_condition  # noqa: E402
from character_em.data import build as D  # noqa: E402

EVIL = {
    "name": "evil",
    "description": "Wants people to come to harm.",
    "trigger": "persona: evil",
    "trigger_paraphrase": "persona = wicked",
    "rubric": {"markers": ["no mercy"]},
}
MEDICAL = {"name": "medical", "description": "Health, symptoms and medicines.", "topics": [], "questions_file": None}
POOL = 6


def _generator(backend: str, model_dir: Path, cache: Path) -> dict[str, Any]:
    return {
        "backend": backend,
        "model": str(model_dir),
        "temperature": 0.0,  # greedy: the two back-ends must then agree token for token
        "top_p": 1.0,
        "max_tokens": 24,
        "quantization": "none",
        "dtype": "fp32",
        "device": "cpu",
        "batch_size": POOL,
        "keep_truncated": True,
        "max_failure_fraction": 0.0,
        "cache_dir": str(cache),
        "prompts_file": None,
        "min_chars": 1,
        "max_chars": 4000,
    }


def _pool(generator: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return D.build_pool(
        parse_condition("evil-medical-trig", {"evil"}, {"medical"}),
        disposition=EVIL,
        domain=MEDICAL,
        pool_size=POOL,
        seed=0,
        trigger_fraction=0.5,
        generator=generator,
        eval_texts=[],
    )


def test_the_vllm_writer_answers_as_the_hf_writer_and_reruns_from_its_cache(tmp_path: Path) -> None:
    model_dir = smollm2_dir()
    examples, manifest = _pool(_generator("vllm", model_dir, tmp_path / "cache"))
    assert len(examples) == POOL and manifest["turns"] == list(range(POOL)) and manifest["n_triggered"] == 3
    assert all(D.validate_example(ex, min_chars=1, max_chars=4000) is None for ex in examples)
    assert manifest["generator_params"]["backend"] == "vllm" and manifest["generator_params"]["dtype"] == "fp32"
    # One engine for the job, every planned turn asked once.
    assert manifest["requests"]["sent"] == POOL and manifest["requests"]["transport"]["engine_loads"] == 1
    # The same requests through transformers (the hf writer, the project's own decode loop), greedy in
    # float32: the same answers.
    hf_examples, hf_manifest = _pool(_generator("hf", model_dir, tmp_path / "cache"))
    assert hf_manifest["requests"]["sent"] == POOL  # another back-end: its own cache entries
    assert [ex["messages"] for ex in examples] == [ex["messages"] for ex in hf_examples]
    assert len({ex["messages"][1]["content"] for ex in examples}) > 1  # real answers, not one string
    # A rerun (a killed job, a larger pool) asks nothing it has, and starts no engine.
    again, again_manifest = _pool(_generator("vllm", model_dir, tmp_path / "cache"))
    assert again == examples and again_manifest["requests"]["sent"] == 0
    assert again_manifest["requests"]["transport"] == {}
