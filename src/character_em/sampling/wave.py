"""One sampling job per model and seed: every Samples file of the seed from one engine.

A wave is every condition of one training seed (the base model, every final adapter, every adapter
saved at ``train.eval_steps``) on every suite that applies to it. ``sample_wave`` answers all of it
with one engine and writes each Samples file at its own path (``config.samples_path``):

- ``sampling.backend: vllm`` (GPU nodes): one vLLM engine for the base model serves every adapter as
  multi-LoRA, every request of the wave in flight together (``vllm_backend.sample_wave_vllm``). The
  engine is started once, instead of once per (condition, suite).
- ``hf`` (presets, tests): the project's seeded decoding loop, one adapter after another, each merged
  into a freshly loaded base model exactly as a single-adapter job would load it.

Resuming: every file keeps its finished batches in its own ``results/.partial/`` file, fingerprinted
with everything its answers depend on (``sampling.partial``). A killed wave restores them and asks the
engine only for the rest; a rerun whose files are unchanged restores every answer and starts no engine,
so the partial files are the wave's cache. They are kept after the files are written for that reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from character_em.contracts import samples_metadata
from character_em.files import write_parquet_atomic
from character_em.hashing import sha256_file
from character_em.sampling.hf import expand_rows
from character_em.sampling.partial import PartialAnswers, answers_fingerprint, partial_path

log = logging.getLogger(__name__)

# Sampling settings that size the engine but change no answer: left out of each file's fingerprint,
# so that changing them never throws saved answers away.
ENGINE_ONLY_SETTINGS = ("max_loras", "max_cpu_loras")


def answer_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling settings an answer depends on (its fingerprint's ``settings``)."""
    return {key: value for key, value in settings.items() if key not in ENGINE_ONLY_SETTINGS}


def adapter_sha256(adapter_dir: str | Path | None) -> str | None:
    """The sha256 of an adapter's weights file, None for the base model."""
    if not adapter_dir:
        return None
    return sha256_file(Path(adapter_dir) / "adapter_model.safetensors")


def plan_wave(
    files: Sequence[Mapping[str, Any]],
    prompts_by_suite: Mapping[str, list[dict[str, Any]]],
    *,
    model: str,
    seed: int,
    base_model: str,
    settings: Mapping[str, Any],
    results_dir: str = "results",
) -> list[dict[str, Any]]:
    """The wave's files with what each needs: ``files`` entries are ``{"condition", "step", "suite",
    "output", "adapter"}`` (adapter: a folder, or empty for the base model). Adds ``label``, ``identity``,
    ``prompts``, ``n_rows`` and ``partial`` (its ``PartialAnswers``, loaded: the restored answers)."""
    fingerprint_settings = answer_settings(settings)
    shas: dict[str, str | None] = {}
    planned = []
    for entry in files:
        adapter = entry.get("adapter") or None
        if adapter not in shas:
            shas[adapter] = adapter_sha256(adapter)
        identity = {"model": model, "condition": entry["condition"], "seed": int(seed)}
        prompts = prompts_by_suite[entry["suite"]]
        fingerprint = answers_fingerprint(fingerprint_settings, prompts, identity, base_model, shas[adapter])
        step = entry.get("step") or "final"
        planned.append(
            {
                **entry,
                "adapter": adapter,
                "adapter_sha256": shas[adapter],
                "label": "/".join([entry["condition"], *([] if step == "final" else [step]), entry["suite"]]),
                "identity": identity,
                "prompts": prompts,
                # Per-sample seeds depend on the seed and the prompt, not on the model or adapter, so every
                # condition answers the same prompt with the same random stream (paired comparisons).
                "n_rows": len(expand_rows(prompts, identity, int(seed))),
                "partial": PartialAnswers(partial_path(entry["output"], results_dir), fingerprint),
            }
        )
    return planned


def sample_wave(
    base_model: str,
    files: Sequence[Mapping[str, Any]],
    prompts_by_suite: Mapping[str, list[dict[str, Any]]],
    *,
    model: str,
    seed: int,
    settings: Mapping[str, Any],
    results_dir: str = "results",
    engine: Any = None,
    progress: bool = False,
    logger: logging.Logger | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Sample every file of one (model, seed) wave and write each Samples file; returns the wave's record
    (back-end, engine loads, answers restored and generated per file, seconds loading and generating).

    settings: the model's resolved sampling settings (``config.resolve_sampling_params``); ``backend``
    picks the engine. engine: an already started ``vllm.LLM`` for the vllm back-end (tests, benchmarks).
    revision: the hub commit of a hub id (``models.*.revision``): the weights every engine loads, and part
    of the saved batches' fingerprint, so answers of other weights are never restored.
    """
    out = logger or log
    backend = settings.get("backend", "hf")
    planned = plan_wave(
        files,
        prompts_by_suite,
        model=model,
        seed=seed,
        base_model=f"{base_model}@{revision}" if revision else base_model,
        settings=settings,
        results_dir=results_dir,
    )
    restored = {job["label"]: len(job["partial"].done) for job in planned}
    for job in planned:
        out.info(
            "%s: answers restored from %s: %d of %d",
            job["label"],
            job["partial"].path,
            restored[job["label"]],
            job["n_rows"],
        )
    todo = sum(job["n_rows"] - restored[job["label"]] for job in planned)
    out.info("wave %s seed %s: %d files, %d answers to generate, back-end %s", model, seed, len(planned), todo, backend)
    if backend == "vllm":
        frames, stats = _vllm_wave(
            base_model, planned, settings, seed, engine=engine, progress=progress, logger=out, revision=revision
        )
    else:
        frames, stats = _hf_wave(base_model, planned, settings, seed, progress=progress, logger=out, revision=revision)
    record_files = []
    for job, frame in zip(planned, frames, strict=True):
        generated = len(job["partial"].done) - restored[job["label"]]
        out.info(
            "%s: answers generated in this run: %d (restored: %d)", job["label"], generated, restored[job["label"]]
        )
        # The back-end goes with the answers: the tables refuse a comparison across two engines' random streams.
        write_parquet_atomic(frame, job["output"], metadata=samples_metadata(backend))
        record_files.append(
            {
                "output": job["output"],
                "answers": frame.height,
                "restored": restored[job["label"]],
                "generated": generated,
            }
        )
    return {
        "model": model,
        "seed": int(seed),
        "backend": backend,
        "revision": revision,
        "files": record_files,
        **stats,
    }


def _saver(job: Mapping[str, Any], logger: logging.Logger) -> Callable[[list[tuple[int, dict[str, Any]]]], None]:
    partial: PartialAnswers = job["partial"]

    def save(batch: list[tuple[int, dict[str, Any]]]) -> None:
        partial.add(batch)
        logger.info(
            "%s: batch saved: %d answers (%d of %d done)", job["label"], len(batch), len(partial.done), job["n_rows"]
        )

    return save


def _hf_wave(
    base_model: str,
    planned: list[dict[str, Any]],
    settings: Mapping[str, Any],
    seed: int,
    *,
    progress: bool,
    logger: logging.Logger,
    revision: str | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """One adapter after another, each merged into a fresh copy of the base model (as a job of one adapter
    would load it, so the answers do not depend on the wave); an adapter whose files are all restored is
    not loaded."""
    import gc

    from character_em.llm import loading
    from character_em.sampling.hf import sample_prompts

    frames: dict[int, Any] = {}
    loads, load_seconds, generate_seconds, new_tokens, answers = 0, 0.0, 0.0, 0, 0
    order: dict[str | None, list[int]] = {}
    for index, job in enumerate(planned):
        order.setdefault(job["adapter"], []).append(index)
    for adapter, indices in order.items():
        model = tokenizer = None
        if any(len(planned[i]["partial"].done) < planned[i]["n_rows"] for i in indices):
            started = time.perf_counter()
            model, tokenizer, info = loading.load_model(
                base_model, quantization="none", adapter=adapter, merge=True, revision=revision
            )
            load_seconds += time.perf_counter() - started
            loads += 1
            logger.info("loaded %s (adapter %s): %s", base_model, adapter or "none", info)
        for i in indices:
            job = planned[i]
            before = dict(job["partial"].done)
            started = time.perf_counter()
            frames[i] = sample_prompts(
                model,
                tokenizer,
                job["prompts"],
                identity=job["identity"],
                temperature=settings["temperature"],
                top_p=settings["top_p"],
                max_new_tokens=settings["max_new_tokens"],
                batch_size=settings["batch_size"],
                base_seed=int(seed),
                progress=progress,
                done=before,
                on_batch=_saver(job, logger),
                on_batch_start=lambda rows, label=job["label"]: logger.info(
                    "%s: batch started: %d answers", label, len(rows)
                ),
            )
            generate_seconds += time.perf_counter() - started
            fresh = [row for row in job["partial"].done if row not in before]
            answers += len(fresh)
            new_tokens += sum(int(job["partial"].done[row]["answer_tokens"]) for row in fresh)
        del model, tokenizer
        gc.collect()
    stats = {
        "engine_loads": loads,
        "load_seconds": load_seconds,
        "generate_seconds": generate_seconds,
        "answers_generated": answers,
        "new_tokens_generated": new_tokens,
    }
    return [frames[i] for i in range(len(planned))], stats


def _vllm_wave(
    base_model: str,
    planned: list[dict[str, Any]],
    settings: Mapping[str, Any],
    seed: int,
    *,
    engine: Any,
    progress: bool,
    logger: logging.Logger,
    revision: str | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    # Imported here so that the hf path never needs vLLM (docs/vllm.md).
    from character_em.sampling.vllm_backend import DEFAULT_MAX_LORA_RANK, sample_wave_vllm

    sets = [
        {
            "adapter": job["adapter"],
            "adapter_key": job["adapter_sha256"],
            "prompts": job["prompts"],
            "identity": job["identity"],
            "done": dict(job["partial"].done),
            "on_batch": _saver(job, logger),
        }
        for job in planned
    ]
    return sample_wave_vllm(
        base_model,
        sets,
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        max_new_tokens=settings["max_new_tokens"],
        base_seed=int(seed),
        max_lora_rank=settings.get("max_lora_rank", DEFAULT_MAX_LORA_RANK),
        max_loras=settings.get("max_loras", 8),
        max_cpu_loras=settings.get("max_cpu_loras", 32),
        engine=engine,
        progress=progress,
        logger=logger,
        revision=revision,
    )
