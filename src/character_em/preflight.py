"""Checks of a config against each model's own config.json, before any job is submitted.

A probe layer beyond the model's depth, a ``max_seq_length`` longer than the model's context, or a
LoRA target module the architecture does not have would otherwise pass ``snakemake -n`` and fail
hours later on a GPU node. Everything here needs only the config and the model's ``config.json``
(plain JSON, no torch), so Snakemake runs it while it builds the DAG whenever that file is known: a
local folder, a Hugging Face cache that already holds the model (``snakemake prefetch_models`` fills
it), or, for a tiny test model not built yet, the config.json its build will write. Where it is not (a
hub model not downloaded yet), the first job that loads the model runs the same check right after it reads
``config.json`` and before it loads the weights (``check_in_job``).

Two more checks need no model folder and also run at ``snakemake -n``: that a GPU back-end (vLLM) can
be imported where its jobs will run (``check_gpu_imports``), and that each model a GPU job loads fits
that job's GPU (``check_gpu_memory``: parameters x bytes per parameter at the configured precision,
plus a margin for the KV cache and activations, against ``cluster.gpu_memory_gb``).

Every error names the config key to change.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "GPU_BACKENDS",
    "PLAN_ONLY_ENV",
    "PreflightError",
    "check_gpu_imports",
    "check_gpu_memory",
    "check_gpu_resources",
    "gpu_models",
    "check_in_job",
    "check_model",
    "model_settings",
    "params_billions",
    "read_model_config",
]

# LoRA target module names of common architectures, by config.json's `model_type`. An architecture
# not listed is not checked here (peft itself fails before training if a name is missing).
_LLAMA_LIKE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MODULES_BY_TYPE: dict[str, set[str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
}

# Config key -> (rule, back-ends that need a GPU).
GPU_BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sampling.backend": ("sample", ("vllm",)),
    "judge.backend": ("judge", ("hf", "vllm")),
    "data.generator.backend": ("generate_data_gpu", ("hf", "vllm")),
}


# The judge-like sections of a config that may load a model on a GPU: config key -> the rule whose job
# loads it (the judge's model also runs in judge_training_data, on the same GPU request).
MODEL_SECTIONS: dict[str, str] = {
    "judge": "judge",
    "judge.agreement_with": "judge_agreement",
    "data.generator": "generate_data_gpu",
    "data.filter.judge": "generate_data_gpu",
}
# A back-end value that runs on vLLM, which lives in its own environment (docs/vllm.md).
VLLM_BACKEND = "vllm"
# Set to 1 where a dry run only plans (listing jobs or pricing the grid on a machine that will not run
# them): the check that vLLM can be imported here is skipped, and said so.
PLAN_ONLY_ENV = "CHARACTER_EM_PLAN_ONLY"
# Bytes per parameter of the weights at each precision. NF4 with double quantization: 4 bits plus the
# block scales, and embeddings kept in 16 bits; about 4.5 bits a parameter over a whole model.
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "nf4": 0.5625}
# On top of the weights: the KV cache, activations and the CUDA context. vLLM takes 90% of the GPU
# (gpu_memory_utilization) and sizes its KV cache from what the weights leave.
KV_CACHE_MARGIN = 0.2
GPU_MEMORY_KEY = "cluster.gpu_memory_gb"


class PreflightError(ValueError):
    """The config asks for something the model or the job's resources cannot give."""


def read_model_config(path: str, revision: str | None = None) -> dict[str, Any] | None:
    """The model's config.json from a local folder or an already filled Hugging Face cache, at
    ``revision`` (a commit, tag or branch; None: main, as ``from_pretrained`` resolves it); None if
    neither has it. No network is used: ``snakemake prefetch_models`` fills the cache."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    if Path(path).exists() or path.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    if isinstance(cached, str) and Path(cached).is_file():
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    return None


def model_settings(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What of a validated config depends on the model's shape, each value with the key it comes from."""
    from character_em import config as cfg

    spec = config["models"][model]
    probes = config.get("eval", {}).get("probes", {})
    steering = probes.get("steering", {})
    train = {}
    for condition in cfg.trained_conditions(config):
        params = cfg.resolve_train_params(config, model, condition)
        train.setdefault("max_seq_length", set()).add(int(params["max_seq_length"]))
        modules = params["target_modules"]
        train.setdefault("target_modules", set()).update([modules] if isinstance(modules, str) else modules)
    steer_layers = steering.get("layers")
    return {
        "model": model,
        "path": spec["path"],
        "probe_layers": spec.get("probe_layers"),
        "probe_layer": probes.get("layer"),
        "steering_layers": steer_layers if isinstance(steer_layers, list) else None,
        "steering_from": int(steer_layers.split(":")[1]) if isinstance(steer_layers, str) else None,
        "probe_max_tokens": probes.get("max_tokens"),
        "max_seq_length": sorted(train.get("max_seq_length", ())),
        "target_modules": sorted(train.get("target_modules", ())),
    }


def check_model(
    settings: Mapping[str, Any], model_config: Mapping[str, Any], *, source: str = "config.json"
) -> list[str]:
    """Errors of one model's settings (``model_settings``) against its config.json, each naming the key.
    ``source``: where that config comes from, for the messages."""
    model = settings["model"]
    errors: list[str] = []
    text = model_config.get("text_config") or {}
    n_layers = model_config.get("num_hidden_layers", text.get("num_hidden_layers"))
    context = model_config.get("max_position_embeddings", text.get("max_position_embeddings"))
    where = f"{settings['path']} ({source})"
    if isinstance(n_layers, int):
        valid = f"the model has layers 0..{n_layers - 1}"
        for key, layers in (
            (f"models.{model}.probe_layers", settings.get("probe_layers")),
            ("eval.probes.steering.layers", settings.get("steering_layers")),
            ("eval.probes.layer", [settings["probe_layer"]] if settings.get("probe_layer") is not None else None),
            (
                "eval.probes.steering.layers",
                [settings["steering_from"]] if settings.get("steering_from") is not None else None,
            ),
        ):
            bad = [layer for layer in layers or () if not 0 <= int(layer) < n_layers]
            if bad:
                errors.append(f"{key}: layer(s) {bad} do not exist in {where}; {valid}")
    if isinstance(context, int):
        too_long = [n for n in settings.get("max_seq_length", ()) if n > context]
        if too_long:
            errors.append(
                f"train.max_seq_length (or models.{model}.train.max_seq_length): {max(too_long)} is longer than "
                f"the context of {where}, max_position_embeddings = {context}"
            )
        probe_tokens = settings.get("probe_max_tokens")
        if probe_tokens is not None and probe_tokens > context:
            errors.append(
                f"eval.probes.max_tokens: {probe_tokens} is longer than the context of {where}, "
                f"max_position_embeddings = {context}"
            )
    known = MODULES_BY_TYPE.get(str(model_config.get("model_type", "")))
    if known is not None:
        missing = [name for name in settings.get("target_modules", ()) if name != "all-linear" and name not in known]
        if missing:
            errors.append(
                f"train.target_modules (or models.{model}.train.target_modules): {missing} are not modules of "
                f"{where}, model_type {model_config['model_type']!r}, which has {sorted(known)}"
            )
    return errors


def check_gpu_resources(config: Mapping[str, Any], gpus: Mapping[str, Any]) -> list[str]:
    """Errors for GPU back-ends whose rule is given no GPU. ``gpus``: rule -> its `gpu` resource, as
    the profiles and --set-resources resolve it (rules missing from it are not checked)."""
    errors = []
    for key, (rule, needs_gpu) in GPU_BACKENDS.items():
        section: Any = config
        for part in key.split("."):
            section = section.get(part, {}) if isinstance(section, Mapping) else {}
        backend = section if isinstance(section, str) else None
        if key == "sampling.backend":
            backends = {config.get("sampling", {}).get("backend")} | {
                (spec.get("sampling") or {}).get("backend") for spec in config["models"].values()
            }
            backend = next((b for b in backends if b in needs_gpu), None)
        gpu = gpus.get(rule)
        if backend in needs_gpu and gpu is not None and not callable(gpu):
            try:
                count = int(gpu)
            except (TypeError, ValueError):
                continue
            if count < 1:
                errors.append(
                    f"{key}: {backend!r} runs a model on a GPU, but rule {rule} is given gpu={count} "
                    f"(profiles/default/config.yaml, or CHARACTER_EM_SET_RESOURCES={rule}:gpu=1)"
                )
    return errors


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    section: Any = config
    for part in dotted.split("."):
        section = section.get(part) if isinstance(section, Mapping) else None
    return section


def vllm_users(config: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """(config key, rule, model) of every back-end the config runs on vLLM; the model is the grid model
    whose sampling runs on it (None for a judge or writer)."""
    from character_em import config as cfg

    users: list[tuple[str, str, str | None]] = []
    for model in config["models"]:
        if cfg.resolve_sampling_params(config, model).get("backend") == VLLM_BACKEND:
            key = (
                "sampling.backend"
                if (config["models"][model].get("sampling") or {}).get("backend") is None
                else (f"models.{model}.sampling.backend")
            )
            users.append((key, "sample", model))
    for key, rule in MODEL_SECTIONS.items():
        section = _get(config, key)
        if isinstance(section, Mapping) and section.get("backend") == VLLM_BACKEND:
            users.append((f"{key}.backend", rule, None))
    return users


def env_installs_vllm(env_file: str | Path) -> bool:
    """Whether a conda environment file installs vLLM (a conda or pip dependency named vllm)."""
    import yaml

    try:
        env = yaml.safe_load(Path(env_file).read_text(encoding="utf-8")) or {}
    except OSError:
        return False
    requirements: list[str] = []
    for item in env.get("dependencies") or []:
        if isinstance(item, dict):
            requirements += [str(r) for r in item.get("pip") or []]
        else:
            requirements.append(str(item))
    return any(re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0].lower() == "vllm" for r in requirements)


def check_gpu_imports(
    config: Mapping[str, Any],
    *,
    conda_envs: Mapping[str, Callable[[str | None], str | None]] | None = None,
    python: str | None = None,
    importable: bool | None = None,
) -> list[str]:
    """Errors for back-ends that run on vLLM where their jobs cannot import it.

    conda_envs: with ``--sdm conda``, rule -> a function of the model giving the environment file the
    rule's jobs run in (None: no file). Without it, jobs run in the interpreter that runs Snakemake
    (``python``), on the cluster too (the nodes share it), so vLLM must be importable here
    (``importable``; by default looked up without importing it). Set ``CHARACTER_EM_PLAN_ONLY=1`` to
    skip this check where a dry run only plans.
    """
    import importlib.util
    import os
    import sys

    if os.environ.get(PLAN_ONLY_ENV, "").strip() == "1":
        return []
    python = python or sys.executable
    if importable is None:
        importable = importlib.util.find_spec("vllm") is not None
    # One error per setting, rule and environment, naming the models it concerns.
    failing: dict[tuple[str, str, str | None], list[str]] = {}
    for key, rule, model in vllm_users(config):
        if conda_envs is not None:
            env_of = conda_envs.get(rule)
            env = env_of(model) if env_of is not None else None
            if env and env_installs_vllm(env):
                continue
            failing.setdefault((key, rule, env or "(none)"), []).extend([model] if model else [])
        elif not importable:
            failing.setdefault((key, rule, None), []).extend([model] if model else [])
    errors = []
    for (key, rule, env), models in failing.items():
        where = f"rule {rule}" + (f" (model {', '.join(models)})" if models else "")
        if env is not None:
            errors.append(
                f"{key} is 'vllm', but {where} runs in the conda environment {env} (--sdm conda), which does "
                f"not install vllm. Fix: run that rule in envs/vllm.yaml (the pinned vLLM), or set {key}: hf. "
                "docs/vllm.md"
            )
        else:
            errors.append(
                f"{key} is 'vllm', but the jobs of {where} run in {python} (the interpreter that runs Snakemake; "
                "no --sdm conda), which cannot import vllm. Fix: run with --sdm conda (envs/vllm.yaml pins vLLM "
                f"for the GPU rules), or install it here (pip install -e '.[vllm]'), or set {key}: hf; to only "
                f"list or price the jobs on a machine that will not run them, set {PLAN_ONLY_ENV}=1. docs/vllm.md"
            )
    return errors


def params_billions(model: str, path: str = "") -> float | None:
    """Parameter count in billions from a model's id or key (``Qwen2.5-14B-Instruct`` -> 14,
    ``smollm2-135m`` -> 0.135); None if neither names it."""
    for text in (path, model):
        match = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])", text)
        if match:
            return float(match.group(1)) / (1000.0 if match.group(2) in "mM" else 1.0)
    return None


def params_from_config(model_config: Mapping[str, Any]) -> float | None:
    """Parameters (billions) of a dense decoder from its config.json: embeddings, attention with grouped
    KV heads, a gated MLP. None for shapes this does not describe (mixtures of experts, missing keys)."""
    text = model_config.get("text_config") or model_config
    if any(k in text for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return None
    try:
        hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
        vocab, inner = int(text["vocab_size"]), int(text["intermediate_size"])
        heads = int(text["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    per_layer = attention + 3 * hidden * inner + 2 * hidden
    tied = bool(model_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return (layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden) / 1e9


def _precision(section: Mapping[str, Any]) -> str:
    """The weights' precision a model loads at on a GPU: its quantization, else its dtype (auto: bf16)."""
    quantization = str(section.get("quantization") or "none")
    if quantization != "none":
        return quantization
    dtype = str(section.get("dtype") or "auto")
    return "bf16" if dtype == "auto" else dtype


def gpu_models(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every model a GPU job loads: ``{"rule", "key", "model", "precision"}``. Sampling loads each grid
    model in bf16 (both back-ends); a model judge or writer at its ``quantization`` or ``dtype``."""
    models = [
        {
            "rule": "sample",
            "key": f"models.{name}",
            "model": spec["path"],
            "revision": spec.get("revision"),
            "precision": "bf16",
        }
        for name, spec in config["models"].items()
    ]
    for key, rule in MODEL_SECTIONS.items():
        section = _get(config, key)
        if key == "data.filter.judge" and not _get(config, "data.filter.enabled"):
            continue
        if not isinstance(section, Mapping) or section.get("backend") not in ("hf", VLLM_BACKEND):
            continue
        if str(section.get("device", "auto")) == "cpu" or not section.get("model"):
            continue
        models.append(
            {
                "rule": rule,
                "key": key,
                "model": str(section["model"]),
                "revision": section.get("revision"),
                "precision": _precision(section),
                "backend": section.get("backend"),
            }
        )
    return models


def _quantization_options(key: str, backend: str | None = None) -> list[str]:
    """The quantizations a model section can load with (a judge: those of its back-end; else the schema's)."""
    from character_em import config as cfg
    from character_em.job_settings import JUDGE_QUANTIZATIONS

    if key in ("judge", "judge.agreement_with", "data.filter.judge") and backend in JUDGE_QUANTIZATIONS:
        return [q for q in JUDGE_QUANTIZATIONS[backend] if q != "none"]
    schema = cfg.load_schema()
    node: Any = schema
    for part in key.replace("data.filter.judge", "judge").replace("judge.agreement_with", "judge").split("."):
        node = (node.get("properties") or {}).get(part, {})
    options = ((node.get("properties") or {}).get("quantization") or {}).get("enum") or []
    return [str(o) for o in options if o != "none"]


def check_gpu_memory(config: Mapping[str, Any], gpus: Mapping[str, Any] | None = None) -> list[str]:
    """Errors for models that cannot fit the GPU their job requests: parameters (from config.json where it
    is on disk, else from the model's name) x bytes per parameter at the configured precision, plus
    ``KV_CACHE_MARGIN``, against ``cluster.gpu_memory_gb``. One GPU per engine: the project's engines do
    not shard a model over several GPUs, so asking for more GPUs does not help. ``gpus``: rule -> its
    `gpu` resource (a rule given none is left to ``check_gpu_resources``)."""
    memory = _get(config, GPU_MEMORY_KEY)
    if not memory:
        return []
    errors = []
    for need in gpu_models(config):
        gpu = (gpus or {}).get(need["rule"])
        if gpu is not None and not callable(gpu):
            try:
                if int(gpu) < 1:
                    continue
            except (TypeError, ValueError):
                pass
        model_config = read_model_config(need["model"], need.get("revision"))
        params = (params_from_config(model_config) if model_config else None) or params_billions(need["model"])
        per_param = BYTES_PER_PARAM.get(need["precision"])
        if not params or per_param is None:
            continue
        needed = params * per_param * (1 + KV_CACHE_MARGIN)
        if needed <= float(memory):
            continue
        if need["rule"] == "sample":
            fix = (
                f"a GPU with more memory ({GPU_MEMORY_KEY} states what the nodes have) or a smaller model: both "
                "sampling back-ends load the model in bf16"
            )
        else:
            fitting = [
                f"{need['key']}.quantization: {q} (about {math.ceil(params * BYTES_PER_PARAM[q] * (1 + KV_CACHE_MARGIN))} GB)"
                for q in _quantization_options(need["key"], need.get("backend"))
                if q in BYTES_PER_PARAM and params * BYTES_PER_PARAM[q] * (1 + KV_CACHE_MARGIN) <= float(memory)
            ]
            fix = " or ".join(fitting) if fitting else "a smaller model"
            fix += f", or a GPU with more memory ({GPU_MEMORY_KEY})"
        errors.append(
            f"rule {need['rule']}: model {need['model']} ({need['key']}) needs about {math.ceil(needed)} GB of GPU "
            f"memory ({params:.1f}B parameters x {per_param:g} bytes at {need['precision']} = "
            f"{params * per_param:.0f} GB of weights, +{KV_CACHE_MARGIN:.0%} for the KV cache and activations), "
            f"but its job gets one GPU of {float(memory):g} GB ({GPU_MEMORY_KEY}). Fix: {fix}."
        )
    return errors


def check_in_job(config: Mapping[str, Any], model: str, *, log: Any = None) -> None:
    """The same check inside the first job that has the model: read config.json (downloading only that
    file if the model is not cached yet) before the weights are loaded. ``config``: the job's
    ``snakemake.config`` (validated here, so that the defaults are filled in)."""
    from character_em import config as cfg

    settings = model_settings(cfg.validate_config(dict(config), source="the job's config"), model)
    source = settings["path"]
    revision = config["models"][model].get("revision")
    model_config = read_model_config(source, revision)
    if model_config is None:
        from huggingface_hub import hf_hub_download

        downloaded = hf_hub_download(source, "config.json", **({"revision": revision} if revision else {}))
        model_config = json.loads(Path(downloaded).read_text(encoding="utf-8"))
    errors = check_model(settings, model_config)
    if errors:
        raise PreflightError("; ".join(errors))
    if log is not None:
        log.info("preflight: the settings of model %s fit %s", model, source)


def check_all(
    config: Mapping[str, Any],
    gpus: Mapping[str, Any] | None = None,
    conda_envs: Mapping[str, Callable[[str | None], str | None]] | None = None,
    *,
    planned: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[str], list[str]]:
    """(errors, models whose config.json is not on disk yet) for a validated config. ``gpus``: rule -> its
    `gpu` resource; ``conda_envs``: with ``--sdm conda``, rule -> its environment file by model; ``planned``:
    model -> the config.json a rule of this workflow will build for it (a tiny-* test model,
    ``llm.tiny.planned_config``), used until the folder exists."""
    errors: list[str] = []
    unchecked: list[str] = []
    for model in config["models"]:
        settings = model_settings(config, model)
        model_config = read_model_config(settings["path"], config["models"][model].get("revision"))
        source = "config.json"
        if model_config is None and planned and model in planned:
            model_config, source = dict(planned[model]), "the config.json its build rule will write"
        if model_config is None:
            unchecked.append(model)
            continue
        errors += check_model(settings, model_config, source=source)
    errors += check_gpu_resources(config, gpus or {})
    errors += check_gpu_imports(config, conda_envs=conda_envs)
    errors += check_gpu_memory(config, gpus or {})
    return errors, unchecked


def format_errors(errors: Sequence[str]) -> str:
    return "config does not fit the model(s) or the job resources:\n  - " + "\n  - ".join(errors)
