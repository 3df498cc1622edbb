"""Checks of a config against each model's own config.json, before any job is submitted.

A probe layer beyond the model's depth, a ``max_seq_length`` longer than the model's context, or a
LoRA target module the architecture does not have would otherwise pass ``snakemake -n`` and fail
hours later on a GPU node. Everything here needs only the config and the model's ``config.json``
(plain JSON, no torch), so Snakemake runs it while it builds the DAG whenever that file is known: a
local folder, a Hugging Face cache that already holds the model (``snakemake prefetch_models`` fills
it), or, for a tiny test model not built yet, the config.json its build will write. Where it is not (a
hub model not downloaded yet), the first job that loads the model runs the same check right after it reads
``config.json`` and before it loads the weights (``check_in_job``).

Every error names the config key to change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "GPU_BACKENDS",
    "PreflightError",
    "check_gpu_resources",
    "check_in_job",
    "check_model",
    "model_settings",
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
    "data.generator.backend": ("generate_data_gpu", ("hf",)),
}


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
                    f"(profiles/default/config.yaml or --set-resources {rule}:gpu=1)"
                )
    return errors


def check_in_job(config: Mapping[str, Any], model: str, *, log: Any = None) -> None:
    """The same check inside the first job that has the model: read config.json (downloading only that
    file if the model is not cached yet) before the weights are loaded. ``config``: the job's
    ``snakemake.config`` (validated here, so that the defaults are filled in)."""
    from character_em import config as cfg

    settings = model_settings(cfg.validate_config(dict(config), source="the job's config"), model)
    source = settings["path"]
    model_config = read_model_config(source)
    if model_config is None:
        from huggingface_hub import hf_hub_download

        model_config = json.loads(Path(hf_hub_download(source, "config.json")).read_text(encoding="utf-8"))
    errors = check_model(settings, model_config)
    if errors:
        raise PreflightError("; ".join(errors))
    if log is not None:
        log.info("preflight: the settings of model %s fit %s", model, source)


def check_all(
    config: Mapping[str, Any],
    gpus: Mapping[str, Any] | None = None,
    *,
    planned: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[str], list[str]]:
    """(errors, models whose config.json is not on disk yet) for a validated config. ``planned``: model
    -> the config.json a rule of this workflow will build for it (a tiny-* test model,
    ``llm.tiny.planned_config``), used until the folder exists."""
    errors: list[str] = []
    unchecked: list[str] = []
    for model in config["models"]:
        settings = model_settings(config, model)
        model_config = read_model_config(settings["path"])
        source = "config.json"
        if model_config is None and planned and model in planned:
            model_config, source = dict(planned[model]), "the config.json its build rule will write"
        if model_config is None:
            unchecked.append(model)
            continue
        errors += check_model(settings, model_config, source=source)
    errors += check_gpu_resources(config, gpus or {})
    return errors, unchecked


def format_errors(errors: Sequence[str]) -> str:
    return "config does not fit the model(s) or the job resources:\n  - " + "\n  - ".join(errors)
