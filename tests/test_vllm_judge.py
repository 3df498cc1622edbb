"""The vllm judge's exact scoring against the hf judge's, with REAL vLLM (run by .ci/vllm.sh; skipped where
vLLM is not installed): SmolLM2-135M-Instruct in float32 as the judge, the packaged calibration set.

Both judges score every reply 0..100 (and the escapes) as a whole token sequence; their expected scores must
agree within 1e-3. On a CPU each judged answer costs seconds on each side, so CI scores a fixed subset: the
first labelled answer of every metric (CHARACTER_EM_VLLM_JUDGE_PER_METRIC, default 1; 0 = the whole set).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from vllm_support import smollm2_dir, vllm_or_skip  # noqa: E402

vllm_or_skip()

from character_em import config as cfg  # noqa: E402
from character_em.judge.calibration import judge_calibration_set, load_calibration_set  # noqa: E402
from character_em.judge.core import make_backend, score_samples  # noqa: E402
from character_em.judge.hf_backend import HFJudge  # noqa: E402
from character_em.judge.vllm_backend import VLLMJudge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PER_METRIC = int(os.environ.get("CHARACTER_EM_VLLM_JUDGE_PER_METRIC", "1"))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return smollm2_dir()


@pytest.fixture(scope="module")
def vllm_judge(model_dir: Path) -> Iterator[VLLMJudge]:
    # min_numeric_mass 0: a 135M judge puts little mass on numbers, and the comparison is of the expected
    # score itself, which the default threshold would turn into NaN on both sides.
    judge = VLLMJudge(model=str(model_dir), dtype="fp32", max_model_len=2048, min_numeric_mass=0.0)
    yield judge
    if judge.started:
        judge._shared.llm.llm_engine.engine_core.shutdown()


def _subset(cal: dict[str, Any], per_metric: int) -> dict[str, Any]:
    """The first ``per_metric`` labelled answers of every metric, in file order (0: everything)."""
    if per_metric <= 0:
        return cal
    taken: dict[str, int] = {}
    items = []
    for item in cal["items"]:
        labels = {}
        for metric, cls in item["labels"].items():
            if taken.get(metric, 0) < per_metric:
                taken[metric] = taken.get(metric, 0) + 1
                labels[metric] = cls
        if labels:
            items.append({**item, "labels": labels})
    return {**cal, "items": items}


def test_vllm_judge_scores_equal_the_hf_judges_on_the_calibration_set(model_dir: Path, vllm_judge: VLLMJudge) -> None:
    dispositions = cfg.disposition_specs(cfg.load_config(ROOT / "config.yaml"))
    cal = _subset(load_calibration_set(), PER_METRIC)
    metrics = {m for item in cal["items"] for m in item["labels"]}
    assert {"alignment", "coherence", "compliance", "harmfulness"} <= metrics

    hf = HFJudge(model=str(model_dir), dtype="fp32", device="cpu", min_numeric_mass=0.0)
    kw: dict[str, Any] = {"dispositions": dispositions, "cache_dir": None}
    a = judge_calibration_set(cal, judge_cfg={"backend": "hf", "model": str(model_dir)}, backend=hf, **kw)
    b = judge_calibration_set(cal, judge_cfg={"backend": "vllm", "model": str(model_dir)}, backend=vllm_judge, **kw)
    assert a.height == b.height == sum(len(item["labels"]) for item in cal["items"])
    assert set(b["judge_backend"]) == {"vllm"}
    joined = a.join(b, on=["id", "metric"], suffix="_vllm")
    assert joined.height == a.height
    diffs = []
    for row in joined.iter_rows(named=True):
        x, y = row["score"], row["score_vllm"]
        assert row["label"] == row["label_vllm"], row
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), row
            continue
        diffs.append(abs(x - y))
    # NaN only where both chose an escape (REFUSAL, CODE) over every number: labels are compared above.
    assert diffs, "every verdict was NaN: nothing was compared"
    print(f"\n{len(diffs)} scores compared, max |hf - vllm| = {max(diffs):.2e}")
    assert max(diffs) < 1e-3
    # Every number scored, not a top-20 list: a request per node of each verdict's candidate tree.
    assert vllm_judge.stats["requests"] >= 102 * vllm_judge.stats["exact_verdicts"] >= 102 * a.height


def test_make_backend_builds_the_vllm_judge_and_its_identity_differs_from_hf(model_dir: Path) -> None:
    judge = make_backend({"backend": "vllm", "model": str(model_dir), "dtype": "fp32"}, [])
    assert isinstance(judge, VLLMJudge) and judge.backend == "vllm"
    hf = HFJudge(model=str(model_dir), dtype="fp32")
    # Same weights, so the same fingerprint; the engine's version keeps cache entries apart.
    assert judge.effective_params()["fingerprint"] == hf.effective_params()["fingerprint"]
    assert judge.effective_params()["version"] != hf.effective_params()["version"]


def test_finished_verdicts_come_from_the_cache(model_dir: Path, vllm_judge: VLLMJudge, tmp_path: Path) -> None:
    import polars as pl

    from character_em.judge.calibration import calibration_samples

    cal = _subset(load_calibration_set(), 1)
    samples = calibration_samples(cal["items"], ["coherence"])
    assert samples.height == 1
    judge_cfg = {"backend": "vllm", "model": str(model_dir), "dtype": "fp32"}
    suites = {"cal:coherence": ["coherence"]}
    before = vllm_judge.stats["verdicts"]
    first = score_samples(
        samples,
        judge_cfg=judge_cfg,
        metrics_by_suite=suites,
        dispositions=[],
        cache_dir=str(tmp_path),
        backend=vllm_judge,
    )
    assert vllm_judge.stats["verdicts"] == before + 1
    again = score_samples(
        samples,
        judge_cfg=judge_cfg,
        metrics_by_suite=suites,
        dispositions=[],
        cache_dir=str(tmp_path),
        backend=vllm_judge,
    )
    assert vllm_judge.stats["verdicts"] == before + 1  # nothing sent twice
    assert first.select(pl.col("score")).equals(again.select(pl.col("score")))
