"""GPU-hours, days and money of a grid, before launch, counted as the code sends its work.

``count_work(config)`` is plain grid arithmetic over a validated config: jobs and engine loads of each
kind, training tokens, sampled answers, and judge verdicts per wave (one (model, seed): one sampling engine
and one judge engine, rules/sample.smk and rules/judge.smk). Only the part of the grid that ``select``
keeps is counted (``cfg.grid_models``, ``grid_conditions``, ``grid_trained``, ``grid_seeds``), and the
data its training sets need. ``estimate(config, runs_root)`` turns that into GPU-hours.

How each stage is counted:

* Sampling: one job per wave; a vLLM engine serves every adapter of the seed (multi-LoRA), the hf loop
  loads the model once per adapter; new tokens = answers x answer length. Measured speeds come from the
  waves' own records (``results/samples/{model}/seed{seed}.wave.json``).
* Model-written data: one job per written condition of the selected domains, its pool
  (``data.pool_factor`` x ``n_examples`` planned turns) at the writer's engine's rate (vLLM: no adapter, so
  no LoRA cost), and the data filter's judge on every written answer, each answer with the metrics its arm
  is filtered on.
* Judging: one engine per wave. A vLLM judge prefills each answer once for all its metrics (prefix
  caching; requests answer-major), plus each metric's own instruction, plus half a KV block per further
  metric (the cache shares whole blocks only). A first-token verdict is that one prefill; an exact verdict
  (and the audited share of first-token ones) adds one request per node of its candidate tree, each
  prefilling its last few tokens (``judge_tokens``). The hf judge reads the whole prompt once per metric.
  Prompt lengths come from the judge's own templates and the suites' own questions
  (``judge_prompt_parts``), at ``CHARS_PER_TOKEN``.
* Answer length: the mean of the last run's Samples files where there are any; otherwise
  ``--mean-answer-tokens`` where given (assumed); otherwise ``max_new_tokens``. The upper bound (every
  answer ``max_new_tokens``) is always shown beside it.
* Other judge jobs (``_other_judge_jobs``): the training data (the grid's judge), the data filter, the
  second judge's share of every cell (``judge.agreement_with``, rule judge_second) and the calibration
  set, each counted with the same token arithmetic (``judge_tokens``) at its own judge's path: a judge
  whose tokenizer splits digits (Gemma's) scores exactly.
* Model loads: one per engine (a wave's sampling, a wave's judge) and per other GPU job.
* Rates: each says whether it was **measured** (by this workflow's earlier runs, by this project's
  benchmarks: docs/anchors.md, benchmarks/results/), **anchored** (a published figure, named) or
  **assumed** (no figure exists yet), and on what.

CLI (prints Markdown; ``--output`` also writes it)::

    python -m character_em.report.estimate --configfile config.yaml [--from-runs DIR | --anchors-only]
        [--mean-answer-tokens N] [--gpus N] [--price-per-gpu-hour X] [--judge-tokenizer DIR] [--summary]

Pure Python (polars reads measured files); no torch, no transformers: Snakemake calls it while it builds
the DAG, for each GPU job's expected time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from character_em import config as cfg

__all__ = [
    "ANCHORS",
    "PUBLISHED",
    "EstimateError",
    "Throughput",
    "benchmark_seconds",
    "count_work",
    "estimate",
    "judge_prompt_parts",
    "judge_tokens",
    "measure_runs",
    "render_markdown",
    "render_summary",
    "main",
]

ANCHOR_SOURCE = "docs/anchors.md (this project, one H200, Llama-3.1-8B shape)"
ANCHOR_PARAMS_B = 8.0
# docs/anchors.md, one H200, measured by this project. Training: QLoRA NF4 r=32; the recipe's micro-batch
# 2 is the slow (and therefore safe) figure; 8 or more uses the micro-batch-8 figure.
ANCHORS: dict[str, Any] = {
    "train_tokens_per_s_mb2": 453.0,
    "train_tokens_per_s_mb8": 2621.0,
    # generate, bf16, LoRA unmerged, 256 new tokens: batch -> new tokens/s.
    "generate_new_tokens_per_s": {16: 167.0, 64: 637.0, 256: 2734.0},
    # Forward-only scoring (capabilities, probes, hf judge) has no figure of its own; a training step
    # (forward + backward) on packed rows is slower than a forward pass, so its figure is a lower bound.
    "forward_tokens_per_s": 8333.0,
}
# Published figures that stand in until this project measures its own (benchmarks/results/). Each names
# its source; "params_b" is the model size it was measured on.
PUBLISHED: dict[str, dict[str, Any]] = {
    "judge_prefill": {
        "value": 7000.0,
        "params_b": 70.0,
        "source": "TensorRT-LLM performance overview: Llama-3.3-70B FP8 on one H200, at least ~7,000 prompt tokens/s",
    },
    "vllm_decode": {
        "value": 12500.0,
        "params_b": 8.0,
        "source": "third-party benchmarks: vLLM, Llama-3.1-8B bf16 on one H100, offline, ~12,500 output tokens/s",
    },
    "lora_factor": {
        "value": 2.0 / 3.0,
        "source": "vLLM pull requests: one LoRA adapter cost ~1/3 of throughput (older engine)",
    },
    "nf4_factor": {"value": 0.56, "source": "bitsandbytes: NF4 runs at ~56% of fp16 speed"},
}
# vLLM sampling until benchmarks/multilora_throughput.py has run on a GPU (docs/vllm.md): published, not ours.
VLLM_PUBLISHED_NEW_TOKENS_PER_S = PUBLISHED["vllm_decode"]["value"]
VLLM_LORA_FACTOR = PUBLISHED["lora_factor"]["value"]
# Where neither a run, a benchmark nor a publication says anything; each is named in the output.
ASSUMED_TOKENS_PER_EXAMPLE = 300
CHARS_PER_TOKEN = 4.0
# The chat template around a judge prompt: Llama 3's adds a default system header (its knowledge and
# today's dates) and the user and assistant headers before the reply.
CHAT_TOKENS_BEFORE = 32
CHAT_TOKENS_AFTER = 5
KV_BLOCK_TOKENS = 16  # vLLM's default block size: its prefix cache shares whole blocks
# Unquantized weights prefill at about half the FP8 rate on H100/H200 (FP8 tensor cores are twice as fast).
ASSUMED_UNQUANTIZED_PREFILL_FACTOR = 0.5
# Candidate replies of the exact path: "0".."100" split into digits are 193 tokens (10 x 1 + 90 x 2 + 3),
# 101 nodes of their prefix tree; an escape word ("REFUSAL", "CODE") about 3 tokens.
DIGIT_SPLIT_NUMBER_TOKENS = 193
ESCAPE_TOKENS = 3
DEFAULT_LOAD_MINUTES = 2.0
# Engines of models above this size take proportionally longer to load (reading and quantizing weights).
LOAD_MINUTES_SIZE_B = 14.0
GPU_STAGES = ("train_adapter", "sample", "capabilities", "probes", "judge", "steer")
# The escape replies a metric's exact path scores besides 0..100 (judge.verdicts.ESCAPE_REPLIES).
ESCAPES_BY_METRIC = {"alignment": 2}


class EstimateError(ValueError):
    """Input the estimate cannot use; the message names the file."""


@dataclass(frozen=True)
class Throughput:
    value: float  # units per second
    unit: str
    source: str  # what it is and who measured or published it, on what
    basis: str = "measured"  # measured | anchored | assumed


@dataclass
class ModelRuns:
    """What earlier runs of one model measured (sums, so runs of any size pool correctly)."""

    train_tokens: int = 0
    train_seconds: float = 0.0
    train_examples: int = 0
    train_example_tokens: int = 0
    train_files: int = 0
    train_devices: set[str] = field(default_factory=set)
    sample_new_tokens: int = 0
    sample_answers: int = 0
    sample_seconds: float = 0.0
    sample_files: int = 0
    # Every Samples file of the model (timed or not): the mean answer length of the last run.
    answer_tokens: int = 0
    answers: int = 0
    answer_files: int = 0
    capability_items: int = 0
    capability_seconds: float = 0.0
    capability_files: int = 0
    probe_seconds: float = 0.0
    probe_files: int = 0
    # Judge waves of this model (rules/judge.smk): the engine's counts and the wall time.
    judge_computed_tokens: int = 0
    judge_seconds: float = 0.0
    judge_files: int = 0


# --------------------------------------------------------------------------- grid arithmetic


def _probe_pairs(config: Mapping[str, Any], conditions: Sequence[str]) -> int:
    return len(cfg.probe_pairs(config, list(conditions)))


def _capability_items(config: Mapping[str, Any]) -> tuple[int, float, str]:
    """(items per job, mean prompt tokens per item, task file) of the capabilities eval."""
    from character_em import resources
    from character_em.evals import capabilities

    settings = config["eval"]["capabilities"]
    task_file = settings["task_file"] or str(resources.packaged_path("tasks/smoke_mc.jsonl"))
    if not Path(task_file).exists():
        from character_em.evals.mmlu import MMLU_TASK_FILE, MMLU_TEST_ITEMS

        if task_file == MMLU_TASK_FILE:
            # The paper grid's MMLU, fetched by the workflow from a pinned wheel: its size is known.
            n = MMLU_TEST_ITEMS if settings["max_items"] is None else min(MMLU_TEST_ITEMS, settings["max_items"])
            return n, 150.0, f"{task_file} (not fetched yet: {n:,} MMLU test items, ~150 tokens/item assumed)"
        # Another task file the workflow does not make: before it exists only max_items is known.
        if settings["max_items"] is None:
            raise EstimateError(
                f"{task_file}: capabilities task file not found, and eval.capabilities.max_items is not set"
            )
        return int(settings["max_items"]), 150.0, f"{task_file} (not fetched yet: max_items, ~150 tokens/item assumed)"
    try:
        items = capabilities.load_mc_items(task_file)
    except ValueError as err:
        raise EstimateError(str(err)) from err
    if settings["max_items"] is not None:
        items = items[: settings["max_items"]]
    mean_chars = sum(len(capabilities.format_mc_prompt(item)) for item in items) / len(items)
    return len(items), mean_chars / CHARS_PER_TOKEN + 2, task_file


def _external_examples(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError as err:
        raise EstimateError(f"{path}: cannot read external training data: {err}") from err


def steering_job_key(condition: str, direction: str, control: str) -> str:
    """How ``job_minutes`` names one steering job of a model."""
    return f"{condition}/{direction}/{control}"


def _steering_work(config: Mapping[str, Any], conditions: Sequence[str], sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Steering jobs of one model (rules/directions.smk, first seed; ``directions.steering``): one job
    per arm set, i.e. per (condition, disposition, own direction or control): the base model steered
    along each probed disposition at every nonzero alpha, each character condition of a probed
    disposition with the direction ablated at every nonzero fraction; at the chosen layer, and also
    at eval.probes.steering.layers when set; the job of the own direction also samples the unsteered
    arm once when the strengths include 0. Generation only: one judge_steering job per model judges them."""
    from character_em.directions.steering import OWN, steering_arm_sets, steering_suite_spec
    from character_em.evals import suites

    steer = config["eval"]["probes"]["steering"]
    per_setting = sum(row["n_samples"] for row in suites.build_prompts("em", steering_suite_spec(config)))
    layer_sets = 1 if steer["layers"] is None else 2
    job_answers = {}
    for condition, direction, control in steering_arm_sets(config, list(conditions)):
        strengths = steer["alphas"] if condition == "base" else steer["ablate"]
        settings = sum(1 for s in strengths if float(s) != 0.0) * layer_sets
        unsteered = 1 if control == OWN and any(float(s) == 0.0 for s in strengths) else 0
        job_answers[steering_job_key(condition, direction, control)] = per_setting * (settings + unsteered)
    return {
        "jobs": len(job_answers),
        "answers": sum(job_answers.values()),
        "largest_job_answers": max(job_answers.values(), default=0),
        # answers per steering job (rules/directions.smk: one per arm set, first seed)
        "job_answers": job_answers,
        "max_new_tokens": int(steer["max_new_tokens"] or sampling["max_new_tokens"]),
        "batch_size": int(steer["batch_size"]),
    }


def count_work(config: Mapping[str, Any]) -> dict[str, Any]:
    """Jobs, engine loads and units of work per model and stage for a validated config.

    Returns ``{"models": {model: {stage: {...}}}, ...}``; every count follows the DAG's own arithmetic
    over the part of the grid ``select`` keeps (the conditions, seeds, suites and saved steps each wave
    samples and judges: ``cfg.sampling_wave``).
    """
    from character_em.job_settings import calibration_file, calibration_judges
    from character_em.judge import core as judge
    from character_em.judge.calibration import calibration_metrics, load_calibration_set

    conditions = cfg.grid_conditions(config)
    trained = cfg.grid_trained(config)
    seeds = cfg.grid_seeds(config)
    eval_suites = config["eval"]["suites"]
    dispositions = cfg.disposition_specs(config)
    answers_per_job = {
        suite: answers_per_sampling_job(config, suite) for suite in cfg.SAMPLED_SUITES if suite in eval_suites
    }
    metrics = {suite: len(judge.metrics_for_suite(suite, None, dispositions)) for suite in answers_per_job}
    items, tokens_per_item, task_file = _capability_items(config) if "capabilities" in eval_suites else (0, 0.0, "")
    pairs = _probe_pairs(config, conditions)
    second = config["judge"].get("agreement_with")

    models: dict[str, Any] = {}
    for model in cfg.grid_models(config):
        train_jobs = 0
        example_epochs = 0.0
        largest_example_epochs = 0.0
        # The distinct SLURM group jobs: an adapter's capability evals, final and at each saved step
        # (profiles/slurm/config.yaml); the longest has to fit the partition's time limit.
        groups: list[dict[str, Any]] = []
        for condition in trained:
            params = cfg.resolve_train_params(config, model, condition)
            external = config["data"]["external"].get(condition)
            examples = _external_examples(external) if external else int(config["data"]["n_examples"])
            one = examples * float(params["num_epochs"])
            example_epochs += one * len(seeds)
            largest_example_epochs = max(largest_example_epochs, one)
            train_jobs += len(seeds)
            capability_evals = (1 + len(cfg.eval_step_labels(config, model, condition))) * (
                1 if "capabilities" in eval_suites else 0
            )
            if not cfg.step_capabilities(config):
                capability_evals = min(capability_evals, 1)
            group = {"example_epochs": one, "capability_evals": capability_evals}
            if group not in groups:
                groups.append(group)
        sampling = cfg.resolve_sampling_params(config, model)
        backend = str(sampling.get("backend", "hf"))
        # One wave: every Samples file of one seed (rule sample writes them, rule judge scores them).
        wave = cfg.sampling_wave(config, model)
        wave_answers: dict[str, int] = {}
        for entry in wave:
            wave_answers[entry["suite"]] = wave_answers.get(entry["suite"], 0) + answers_per_job[entry["suite"]]
        waves = len(seeds) if wave else 0
        answers = sum(wave_answers.values()) * waves
        judge_calls = {suite: n * metrics[suite] * waves for suite, n in wave_answers.items()}
        saved_files = [entry for entry in wave if entry["step"] != cfg.FINAL_STEP]
        capability_jobs = len(conditions) * len(seeds) if "capabilities" in eval_suites else 0
        # The adapters saved at train.eval_steps: each runs eval.trajectory.suites (rules/trajectory.smk).
        saved_adapters = sum(len(cfg.eval_step_labels(config, model, c)) for c in trained) * len(seeds)
        steps = {
            "saved_adapters": saved_adapters,
            "sample_files": len(saved_files) * len(seeds),
            "capability_jobs": saved_adapters if cfg.step_capabilities(config) else 0,
            "answers": sum(answers_per_job[entry["suite"]] for entry in saved_files) * len(seeds),
        }
        capability_jobs += steps["capability_jobs"]
        probe_jobs = 1 if "probes" in eval_suites and pairs else 0
        steer = _steering_work(config, conditions, sampling) if probe_jobs else {"jobs": 0, "answers": 0}
        # The second judge (judge.agreement_with, rule judge_second): one job per seed draws
        # judge.agreement_answers_per_cell answers of every final Samples file of the wave.
        judge_second = None
        if second:
            per_cell = int(config["judge"]["agreement_answers_per_cell"])
            drawn: dict[str, int] = {}
            for entry in wave:
                if entry["step"] == cfg.FINAL_STEP:
                    n = min(per_cell, answers_per_job[entry["suite"]])
                    drawn[entry["suite"]] = drawn.get(entry["suite"], 0) + n
            judge_second = {
                "backend": second["backend"],
                "model": second.get("model"),
                "jobs": len(seeds) if drawn else 0,
                "answers_per_job": drawn,
                "answers": sum(drawn.values()) * len(seeds),
                "calls": sum(n * metrics[suite] for suite, n in drawn.items()) * len(seeds),
            }
        models[model] = {
            "path": config["models"][model]["path"],
            "train_adapter": {
                "jobs": train_jobs,
                "example_epochs": example_epochs,
                "largest_example_epochs": largest_example_epochs,
            },
            "sample": {
                # One job per wave samples every adapter of that seed: one vLLM engine (multi-LoRA), or the
                # hf loop loading the base model once per adapter (and once for the base model's own files).
                "jobs": waves,
                "files": len(wave) * len(seeds),
                "answers": answers,
                "answers_per_wave": sum(wave_answers.values()),
                "loads_per_job": 1 if backend == "vllm" else len({(e["condition"], e["step"]) for e in wave}),
                "max_new_tokens": int(sampling["max_new_tokens"]),
                "batch_size": int(sampling["batch_size"]),
                "backend": backend,
            },
            "judge": {
                "jobs": waves,
                "calls_by_suite": judge_calls,
                "calls": sum(judge_calls.values()),
                "answers_per_wave": dict(wave_answers),
            },
            "capabilities": {
                "jobs": capability_jobs,
                "items": capability_jobs * items,
                "tokens_per_item": tokens_per_item,
            },
            "probes": {
                "jobs": probe_jobs,
                # positive and negative chats of every pair, at most max_examples each
                "examples": probe_jobs
                * pairs
                * 2
                * min(int(config["eval"]["probes"]["max_examples"]), int(config["data"]["n_examples"])),
            },
            "micro_batch_size": {
                c: int(cfg.resolve_train_params(config, model, c)["micro_batch_size"]) for c in trained
            },
            "adapter_groups": groups,
            "capability_items_per_job": items,
            "steer": steer,
            "eval_steps": steps,
            "judge_second": judge_second,
        }
    generator = config["data"].get("generator", {})
    generated = _generated_conditions(config, trained)
    data_filter = config["data"]["filter"]
    filter_judge = (data_filter.get("judge") or config["judge"]) if data_filter.get("enabled") else None
    pool = cfg.pool_size(config)
    filter_metrics = {c: _filter_metrics(config, c) for c in generated}
    # A severity-matched arm's training set is a subsample of its character condition's, whose verdicts the
    # judge cache already holds: its judge_training_data job sends nothing.
    judged_training = [c for c in trained if cfg.condition_info(config, c)["family"] != "matched"]
    judges = calibration_judges(config["judge"])
    calibration_items = len(load_calibration_set(calibration_file(config["judge"]))["items"])
    n_dispositions = len(dispositions)
    return {
        "models": models,
        "answers_per_job": answers_per_job,
        "metrics_per_answer": metrics,
        "capability_task": task_file,
        "probe_pairs": pairs,
        "judge_backend": config["judge"]["backend"],
        # One request per planned turn of each written condition's pool (data.pool_factor x n_examples; the
        # data are shared by models and seeds, which draw from the pool).
        "data_generation": {
            "backend": generator.get("backend", "offline"),
            "conditions": generated,
            "requests": len(generated) * pool,
            "jobs": len(generated),
            "model": generator.get("model"),
            "quantization": generator.get("quantization", "none"),
            "max_tokens": int(generator.get("max_tokens", 600)),
            "batch_size": int(generator.get("batch_size", 16)),
            # The data filter judges every written answer inside the data job (data.filter), each on the
            # metrics of its arm (data.generate.filter_verdicts): judged answers x metrics over the pools.
            "filter_judge": dict(filter_judge) if filter_judge else None,
            "filter_verdicts": sum(pool * n for n in filter_metrics.values()),
            "filter_metrics": filter_metrics,
        },
        # rules/training_data.smk: every training set (train.jsonl: the common turns of its domain, at most
        # the pool) judged by the grid's judge (alignment, coherence, every disposition).
        "training_data_judging": {
            "jobs": len(judged_training),
            "cached_jobs": len(trained) - len(judged_training),
            "answers": len(judged_training) * pool,
            "metrics": 2 + n_dispositions,
            "answer_tokens": int(generator.get("max_tokens", 600)),
        },
        "judge_model": config["judge"].get("model"),
        "calibration": {
            "judges": [(name, params["backend"]) for name, params in judges],
            "judge_configs": [params for _, params in judges],
            "calls_per_judge": calibration_items * len(calibration_metrics(dispositions)),
        },
    }


def _generated_conditions(config: Mapping[str, Any], trained: Sequence[str]) -> list[str]:
    """The written conditions whose data the writer makes for the selected training sets: every generated
    condition of a selected condition's domain (rule select_data pairs them on their common turns; a
    severity-matched arm subsamples its character condition's data), none for a data.external file."""
    domains = {cfg.condition_info(config, c)["domain"] for c in trained if not config["data"]["external"].get(c)}
    return [
        name
        for name in cfg.written_conditions(config)
        if not config["data"]["external"].get(name) and cfg.condition_info(config, name)["domain"] in domains
    ]


def _filter_metrics(config: Mapping[str, Any], condition: str) -> float:
    """Judge metrics per written answer of ``condition`` in the data filter (data.generate.filter_verdicts):
    coherence and the own disposition, and alignment where data.filter.max_alignment is set, for a character
    answer; coherence, alignment and every disposition for advice; a triggered condition's triggered turns
    as character answers, the rest as correct advice."""
    character = 2 + (config["data"]["filter"].get("max_alignment") is not None)
    advice = 2 + len(cfg.disposition_specs(config))
    family = cfg.condition_info(config, condition)["family"]
    if family == "character":
        return float(character)
    if family == "triggered":
        share = float(config["data"]["trigger_fraction"])
        return share * character + (1 - share) * advice
    return float(advice)


# --------------------------------------------------------------------------- judge prompts and tokens


def judge_prompt_parts(config: Mapping[str, Any], judge_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The judge prompts as the judge engine receives them, cut where prefix caching can share them.

    Returns ``{"suites": {suite: {"question_chars": mean, "metrics": [...], "shared": {...},
    "suffix": {metric: {...}}}}}``: for each suite, the part of its metrics' prompts that is the same for
    every metric of one answer (``shared``: fixed characters, and whether the question and the answer are
    in it) and each metric's own rest (``suffix``). The judge's own templates (``judge.prompts_file`` where
    it exists, else the packaged ones) and each suite's own questions are measured, not assumed."""
    from character_em.evals import suites as suite_prompts
    from character_em.judge import core as judge

    judge_cfg = judge_cfg or config["judge"]
    dispositions = cfg.disposition_specs(config)
    prompts_file = judge_cfg.get("prompts_file")
    prompts = judge.judge_prompts(prompts_file if prompts_file and Path(prompts_file).exists() else None)
    out: dict[str, Any] = {}
    for suite in cfg.SAMPLED_SUITES:
        if suite not in config["eval"]["suites"]:
            continue
        spec = cfg.suite_spec(config, suite)
        fetched = spec.get("harmful_requests_file")
        if suite == "persona" and fetched and not Path(str(fetched)).exists():
            spec = {**spec, "harmful_requests_file": None}
        rows = suite_prompts.build_prompts(suite, spec)
        question_chars = sum(len(r["question"]) for r in rows) / len(rows) if rows else 0.0
        metrics = judge.metrics_for_suite(suite, None, dispositions)
        texts = {m: judge.metric_prompt(m, dispositions, prompts) for m in metrics}
        # A system message comes first in the chat: it is part of the shared prefix only if every metric has it.
        full = {m: (p.system + "\x00" if p.system else "") + p.template for m, p in texts.items()}
        common = os.path.commonprefix(list(full.values()))
        out[suite] = {
            "question_chars": question_chars,
            "metrics": metrics,
            "shared": _shared_part(common),
            "suffix": {m: _text_part(text[len(common) :]) for m, text in full.items()},
            "templates": {m: (p.system, p.template) for m, p in texts.items()},
        }
    return {"suites": out, "tokens": dict(ASSUMED_TOKEN_LENGTHS)}


# How judge prompt text becomes tokens, where the judge's tokenizer is not at hand (``judge_token_lengths``
# measures them with it): characters per token, and the chat template's tokens around a user turn.
ASSUMED_TOKEN_LENGTHS: dict[str, Any] = {
    "chars_per_token": CHARS_PER_TOKEN,
    "chat_before": CHAT_TOKENS_BEFORE,
    "chat_after": CHAT_TOKENS_AFTER,
    "source": f"assumed: {CHARS_PER_TOKEN:g} characters a token, Llama 3's chat template",
}


def judge_token_lengths(parts: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``parts`` with its token lengths measured by the judge's own tokenizer (a transformers tokenizer:
    ``encode``, ``apply_chat_template``) instead of assumed: characters per token over the judge's templates,
    and the tokens its chat template puts before and after a user turn (the system message, if a template
    has one, is text of the shared head)."""
    chars = tokens = 0
    for suite in parts["suites"].values():
        for system, template in suite["templates"].values():
            text = "\n".join(t for t in (system, template) if t)
            for placeholder in ("{question}", "{answer}"):
                text = text.replace(placeholder, "")
            chars += len(text)
            tokens += len(tokenizer.encode(text, add_special_tokens=False))
    marker = "\u2063judge-turn\u2063"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    before, after = rendered.split(marker, 1)
    measured = {
        "chars_per_token": chars / max(tokens, 1),
        "chat_before": len(tokenizer.encode(before, add_special_tokens=False)) if before else 0,
        "chat_after": len(tokenizer.encode(after, add_special_tokens=False)) if after else 0,
        "source": f"measured with the judge's tokenizer ({getattr(tokenizer, 'name_or_path', '') or 'given'})",
    }
    return {**parts, "tokens": measured}


def _shared_part(text: str) -> dict[str, Any]:
    """The part of a suite's judge prompts that every metric of an answer shares, in three pieces the
    prefix cache treats differently: ``head``, the fixed text before the first placeholder (the same in
    every request of the wave); ``question``, from there to the answer (the same for every answer to one
    question, which sit together in a Samples file); ``answer``, the answer and what follows it."""
    before, after = text.split("{answer}", 1) if "{answer}" in text else (text, None)
    head = before.split("{", 1)[0]
    answer = _text_part(after) if after is not None else _text_part("")
    return {
        "head": _text_part(head),
        "question": _text_part(before[len(head) :]),
        "answer": {**answer, "answer": answer["answer"] + (after is not None)},
    }


def _text_part(text: str) -> dict[str, Any]:
    """Fixed characters of a template piece, and how often it holds the question and the answer."""
    q, a = text.count("{question}"), text.count("{answer}")
    return {"chars": len(text) - q * len("{question}") - a * len("{answer}"), "question": q, "answer": a}


def judge_scoring(judge_cfg: Mapping[str, Any]) -> tuple[str, str]:
    """("first-token" | "exact", why) for a model judge, without loading its tokenizer (the estimate runs
    while Snakemake builds the DAG). ``judge.scoring: auto`` is first-token for a Llama 3 judge (its
    tokenizer spells 0..999 as single tokens) and exact otherwise, which can only overstate the hours."""
    scoring = str(judge_cfg.get("scoring", "auto"))
    if scoring in ("exact", "first-token"):
        return scoring, f"judge.scoring: {scoring}"
    model = str(judge_cfg.get("model") or "")
    if re.search(r"llama[-_ .]?3", model, re.IGNORECASE):
        return "first-token", "judge.scoring auto on a Llama 3 tokenizer (0..999 are single tokens)"
    return "exact", "judge.scoring auto, tokenizer not known to spell 0..100 as single tokens: exact assumed"


def judge_tokens(
    parts: Mapping[str, Any],
    suite: str,
    answer_tokens: float,
    *,
    backend: str,
    scoring: str,
    audit: float = 0.0,
    answers_per_question: float = 1.0,
    kv_block_tokens: int = KV_BLOCK_TOKENS,
) -> dict[str, float]:
    """Tokens one judged answer of ``suite`` costs the judge engine, all its metrics together, as
    ``judge.core.score_wave`` sends them: ``sent`` (prompt tokens in the requests), ``cached`` (of those,
    served by the prefix cache), ``computed`` (prefilled: sent - cached, what the GPU does), ``generated``
    (one step per engine request), ``requests``. ``audit``: the share of verdicts also scored exactly;
    ``answers_per_question``: answers to one prompt that sit together (the suite's ``n_samples``);
    ``kv_block_tokens``: the engine's KV-cache block (vLLM's default on GPUs, 16; its CPU build uses 128).
    Text becomes tokens as ``parts["tokens"]`` says (assumed, or ``judge_token_lengths``)."""
    p = parts["suites"][suite]
    lengths = parts.get("tokens", ASSUMED_TOKEN_LENGTHS)
    per_char = 1.0 / float(lengths["chars_per_token"])
    q = p["question_chars"] * per_char

    def length(part: Mapping[str, Any]) -> float:
        return part["chars"] * per_char + part["question"] * q + part["answer"] * answer_tokens

    head = float(lengths["chat_before"]) + length(p["shared"]["head"])
    per_question = length(p["shared"]["question"])
    per_answer = length(p["shared"]["answer"])
    shared = head + per_question + per_answer
    out = dict.fromkeys(("sent", "cached", "computed", "generated", "requests"), 0.0)
    half_block = kv_block_tokens / 2
    # What the first metric of an answer prefills: the head is in the cache from the wave's first request,
    # the question part from the first answer to the same question; the cache stops at a block boundary.
    fresh = per_question / max(1.0, answers_per_question) + per_answer + half_block
    for i, metric in enumerate(p["metrics"]):
        prompt = shared + float(lengths["chat_after"]) + length(p["suffix"][metric])
        suffix = prompt - shared
        escapes = ESCAPES_BY_METRIC.get(metric, 0)
        if backend == "hf":
            # One request at a time, the whole prompt each time; the exact path adds its candidate tree, packed
            # as one node per distinct prefix (judge.hf_backend.CandidateTree: "1", "10" and "100" share
            # theirs), so 101 nodes for 0..100 however the tokenizer spells them, plus the escapes'.
            tree = 101 + ESCAPE_TOKENS * escapes
            out["sent"] += prompt
            out["computed"] += prompt + (tree if scoring == "exact" else audit * (prompt + tree))
            out["requests"] += 1
            continue
        # vLLM: the shared part once per answer (the first metric), then each metric's rest and the
        # partial block the cache cannot share.
        first = fresh + suffix if i == 0 else suffix + half_block
        if scoring == "first-token":
            out["sent"] += prompt
            out["computed"] += first
            out["generated"] += 1
            out["requests"] += 1
        exact_share = 1.0 if scoring == "exact" else audit
        if exact_share:
            # One request per node of the candidate tree (the prompt, then prompt + each distinct prefix
            # of a candidate): each prefills its last partial block and its own token, the prefix cache
            # serving the rest. The first prefills the prompt (the audit's, sent after the whole wave,
            # finds it evicted and prefills all of it again).
            nodes = 101 + ESCAPE_TOKENS * escapes
            mean_len = (DIGIT_SPLIT_NUMBER_TOKENS if scoring == "exact" else 101) / 101
            sent = prompt + nodes * (prompt + mean_len)
            computed = (first if scoring == "exact" else prompt) + nodes * (half_block + 1)
            out["sent"] += exact_share * sent
            out["computed"] += exact_share * computed
            out["generated"] += exact_share * (nodes + 1)
            out["requests"] += exact_share * (nodes + 1)
    out["cached"] = max(0.0, out["sent"] - out["computed"])
    return out


# --------------------------------------------------------------------------- measured files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise EstimateError(f"{path}: not readable JSON: {err}") from err
    if not isinstance(value, dict):
        raise EstimateError(f"{path}: expected a JSON object")
    return value


def _benchmark_seconds(path: Path) -> float:
    """Wall seconds from a Snakemake benchmark file (tab-separated, column ``s``; repeats are summed)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        seconds = sum(float(row["s"]) for row in rows)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise EstimateError(
            f"{path}: not a Snakemake benchmark file (tab-separated with a numeric 's' column): {err}"
        ) from err
    if not rows or seconds <= 0:
        raise EstimateError(f"{path}: benchmark file has no positive wall time")
    return seconds


def _number(record: Mapping[str, Any], key: str, path: Path) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise EstimateError(f"{path}: '{key}' must be a number, got {value!r}")
    return float(value)


def params_billions(model: str, path: str) -> float | None:
    """Parameter count in billions from the model's id or key (``Qwen2.5-14B-Instruct`` -> 14,
    ``smollm2-135m`` -> 0.135); the preflight's GPU-memory check reads sizes the same way."""
    from character_em.preflight import params_billions as from_name

    return from_name(model, path)


def _generate_anchor(batch_size: int) -> float:
    """New tokens/s at a batch size: linear between the anchor's batch sizes (16, 64, 256)."""
    points = sorted(ANCHORS["generate_new_tokens_per_s"].items())
    if batch_size <= points[0][0]:
        return points[0][1] * batch_size / points[0][0]
    for (b0, v0), (b1, v1) in zip(points, points[1:], strict=False):
        if batch_size <= b1:
            return v0 + (v1 - v0) * (batch_size - b0) / (b1 - b0)
    return points[-1][1]


# --------------------------------------------------------------------------- measured throughput


def measure_runs(root: str | Path, models: Sequence[str]) -> dict[str, ModelRuns]:
    """Throughput and answer lengths of earlier runs under ``root`` (a workflow directory, or its
    ``results/`` folder).

    Training: ``results/adapters/{model}/*/seed*/run.json`` (trained_tokens_this_run / wall_time_s,
    n_tokens / n_examples). Sampling: each wave's record, ``results/samples/{model}/seed*.wave.json``
    (answers and new tokens generated, seconds loading and generating, in its last run).
    Answer length: every Samples file of the model. Judging: each wave's benchmark file
    (``benchmarks/runs/judge/{model}/seed{seed}.tsv``) with the engine's counts in its summary
    (``results/judge_waves/{model}/seed{seed}.json``). Capabilities and probes: their benchmark files.
    Files of other models are ignored; a malformed one is an error.
    """
    root = Path(root)
    if root.name == "results" and not (root / "results").is_dir():
        root = root.parent
    results, benchmarks = root / "results", root / "benchmarks" / "runs"
    measured: dict[str, ModelRuns] = {}
    for model in models:
        runs = ModelRuns()
        for path in sorted((results / "adapters" / model).glob("*/seed*/run.json")):
            record = _read_json(path)
            tokens, wall = _number(record, "trained_tokens_this_run", path), _number(record, "wall_time_s", path)
            examples, example_tokens = _number(record, "n_examples", path), _number(record, "n_tokens", path)
            if wall <= 0 or tokens <= 0 or examples <= 0:
                raise EstimateError(f"{path}: wall_time_s, trained_tokens_this_run and n_examples must be positive")
            runs.train_tokens += int(tokens)
            runs.train_seconds += wall
            runs.train_examples += int(examples)
            runs.train_example_tokens += int(example_tokens)
            runs.train_files += 1
            runs.train_devices.add(str(record.get("device", "unknown")))
        samples_root = results / "samples" / model
        # A sampling wave's record (rule sample): what it generated in its last run, engine loading included.
        for path in sorted(samples_root.glob("seed*.wave.json")):
            record = _read_json(path)
            answers = _number(record, "answers_generated", path)
            if answers <= 0:
                continue  # every answer was restored from the saved batches: no speed to learn from
            runs.sample_seconds += _number(record, "generate_seconds", path) + _number(record, "load_seconds", path)
            runs.sample_new_tokens += int(_number(record, "new_tokens_generated", path))
            runs.sample_answers += int(answers)
            runs.sample_files += 1
        for path in sorted(samples_root.rglob("*.parquet")):
            tokens = _answer_tokens(path)
            runs.answer_tokens += int(tokens.sum() or 0)
            runs.answers += tokens.len()
            runs.answer_files += 1
        for path in sorted((benchmarks / "judge" / model).glob("seed*.tsv")):
            wave = results / "judge_waves" / model / f"{path.stem}.json"
            if not wave.exists():
                continue
            stats = _read_json(wave).get("backend_stats") or {}
            if "prompt_tokens" not in stats:
                continue  # not an engine that counts its tokens (rubric, openai, hf)
            computed = _number(stats, "prompt_tokens", wave) - _number(stats, "cached_prompt_tokens", wave)
            if computed > 0:
                runs.judge_computed_tokens += int(computed)
                runs.judge_seconds += _benchmark_seconds(path)
                runs.judge_files += 1
        for path in sorted((benchmarks / "capabilities" / model).glob("*/seed*.tsv")):
            result = results / "capabilities" / path.relative_to(benchmarks / "capabilities").with_suffix(".json")
            if not result.exists():
                continue
            runs.capability_items += int(_number(_read_json(result), "n", result))
            runs.capability_seconds += _benchmark_seconds(path)
            runs.capability_files += 1
        probe = benchmarks / "probes" / f"{model}.tsv"
        if probe.exists():
            runs.probe_seconds += _benchmark_seconds(probe)
            runs.probe_files += 1
        measured[model] = runs
    return measured


def _answer_tokens(path: Path) -> Any:
    import polars as pl

    try:
        return pl.read_parquet(path, columns=["answer_tokens"])["answer_tokens"]
    except Exception as err:  # polars raises several error types for bad files
        raise EstimateError(f"{path}: cannot read answer_tokens: {err}") from err


# --------------------------------------------------------------------------- rates


VLLM_BENCHMARK = Path("benchmarks") / "results" / "vllm_throughput_gpu.json"
MULTILORA_BENCHMARK = Path("benchmarks") / "results" / "multilora_throughput_gpu.json"
JUDGE_BENCHMARK = Path("benchmarks") / "results" / "judge_engine_gpu.json"


def _gpu_benchmark(root: str | Path | None, relative: Path, section: str, key: str) -> dict[str, Any] | None:
    """A GPU benchmark record under ``root`` with its positive rate ``record[section][key]``, params_b and
    device checked (``value``, ``params_b``, ``device``, ``record``), or None when there is no such file."""
    if root is None:
        return None
    path = Path(root) / relative
    if not path.is_file():
        return None
    record = _read_json(path)
    try:
        value = float(record[section][key])
        params_b = float(record["params_b"])
        device = str(record["device"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EstimateError(f"{path}: needs device, params_b and {section}.{key} ({exc})") from exc
    if value <= 0 or params_b <= 0:
        raise EstimateError(f"{path}: {section}.{key} and params_b must be positive")
    return {"value": value, "params_b": params_b, "device": device, "record": record, "path": path}


def vllm_measurement(root: str | Path | None) -> dict[str, Any] | None:
    """vLLM sampling throughput measured on a GPU by benchmarks/vllm_throughput.py (via gpu_all.sh), or None
    when no such file exists under ``root``. Fields used: device, params_b, sample.new_tokens_per_s."""
    found = _gpu_benchmark(root, VLLM_BENCHMARK, "sample", "new_tokens_per_s")
    if found is None:
        return None
    return {
        "path": str(VLLM_BENCHMARK),
        "new_tokens_per_s": found["value"],
        "params_b": found["params_b"],
        "device": found["device"],
    }


def multilora_measurement(root: str | Path | None) -> dict[str, Any] | None:
    """Multi-LoRA sampling throughput (one vLLM engine serving several adapters, as a sampling wave runs)
    measured on a GPU by benchmarks/multilora_throughput.py (via gpu_all.sh), or None where no such file
    exists under ``root``. Fields used: device, params_b, multi_lora.new_tokens_per_s, multi_lora.adapters."""
    found = _gpu_benchmark(root, MULTILORA_BENCHMARK, "multi_lora", "new_tokens_per_s")
    if found is None:
        return None
    try:
        adapters = int(found["record"]["multi_lora"]["adapters"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EstimateError(f"{found['path']}: needs multi_lora.adapters ({exc})") from exc
    return {
        "path": str(MULTILORA_BENCHMARK),
        "new_tokens_per_s": found["value"],
        "params_b": found["params_b"],
        "device": found["device"],
        "note": f"{adapters} adapters in one engine",
    }


def judge_engine_measurement(root: str | Path | None) -> dict[str, Any] | None:
    """The vLLM judge engine measured on a GPU by benchmarks/judge_engine.py (via gpu_all.sh), or None.
    Fields used: device, params_b, quantization, judge.computed_prompt_tokens_per_s. A ``--smoke`` run
    (a CPU, a tiny model) is a check of the script, not a measurement, and is never read."""
    if root is None:
        return None
    path = Path(root) / JUDGE_BENCHMARK
    if not path.is_file():
        return None
    record = _read_json(path)
    try:
        value = float(record["judge"]["computed_prompt_tokens_per_s"])
        params_b = float(record["params_b"])
        device = str(record["device"])
        quantization = str(record.get("quantization", "none"))
    except (KeyError, TypeError, ValueError) as exc:
        raise EstimateError(f"{path}: needs device, params_b and judge.computed_prompt_tokens_per_s ({exc})") from exc
    if value <= 0 or params_b <= 0:
        raise EstimateError(f"{path}: judge.computed_prompt_tokens_per_s and params_b must be positive")
    if record.get("smoke"):
        return None
    return {"path": str(JUDGE_BENCHMARK), "value": value, "params_b": params_b, "device": device, "q": quantization}


def _sampling_throughput(
    s: Mapping[str, Any], size: float | None, vllm_root: str | Path | None, *, lora: bool = True
) -> Throughput:
    """Sampling speed without measured runs. vLLM: its GPU benchmark where one exists (the multi-LoRA one
    first: a wave serves its adapters that way), else the published offline figure, with one LoRA's cost
    where the engine serves adapters (``lora``; the data writer serves none); hf: this project's
    plain-generate measurement."""
    scale = ANCHOR_PARAMS_B / size if size else 1.0
    scaled = f", scaled x{scale:.2f} for {size:g}B" if size and size != ANCHOR_PARAMS_B else ""
    if not size:
        scaled = ", size unknown: 8B assumed"
    if s.get("backend") == "vllm":
        found = (multilora_measurement(vllm_root) if lora else None) or vllm_measurement(vllm_root)
        if found is not None:
            factor = found["params_b"] / (size or ANCHOR_PARAMS_B)
            note = f", scaled x{factor:.2f} from {found['params_b']:g}B" if abs(factor - 1.0) > 1e-9 else ""
            what = f"{found['device']}, {found['note']}" if found.get("note") else found["device"]
            return Throughput(
                found["new_tokens_per_s"] * factor,
                "new tokens/s",
                f"vLLM with LoRA, this project: {found['path']} ({what}){note}",
                "measured",
            )
        decode, penalty = PUBLISHED["vllm_decode"], PUBLISHED["lora_factor"]
        factor = decode["params_b"] / (size or ANCHOR_PARAMS_B)
        served = f"; x{penalty['value']:.2f}: {penalty['source']}" if lora else "; no adapter, so no LoRA cost"
        return Throughput(
            decode["value"] * (penalty["value"] if lora else 1.0) * factor,
            "new tokens/s",
            f"{decode['source']}{served}{scaled}; GPU measurement owed "
            f"({MULTILORA_BENCHMARK if lora else VLLM_BENCHMARK})",
            "anchored",
        )
    return Throughput(
        _generate_anchor(s["batch_size"]) * scale,
        "new tokens/s",
        f"{ANCHOR_SOURCE}, generate batch {s['batch_size']} (interpolated){scaled}",
        "measured",
    )


# Judges that are models on the job's GPU (the rubric and API judges cost no GPU time here).
MODEL_JUDGES = ("hf", "vllm")


def judge_engine_rate(
    judge_cfg: Mapping[str, Any], measured: Mapping[str, ModelRuns], bench_root: str | Path | None
) -> Throughput:
    """Prompt tokens a model judge prefills per second (tokens it computes, not those the cache serves)."""
    backend = judge_cfg.get("backend")
    size = params_billions("", str(judge_cfg.get("model") or "")) or ANCHOR_PARAMS_B
    quantization = str(judge_cfg.get("quantization") or "none")
    if backend == "hf":
        nf4 = PUBLISHED["nf4_factor"]
        factor = nf4["value"] if quantization == "nf4" else 1.0
        note = f"; x{nf4['value']:.2f}: {nf4['source']}" if quantization == "nf4" else ""
        return Throughput(
            ANCHORS["forward_tokens_per_s"] * ANCHOR_PARAMS_B / size * factor,
            "tokens/s",
            f"{ANCHOR_SOURCE}, packed training as a forward-pass lower bound, judge ~{size:g}B{note}",
            "measured" if not note else "anchored",
        )
    waves = [r for r in measured.values() if r.judge_files]
    if waves:
        tokens = sum(r.judge_computed_tokens for r in waves)
        seconds = sum(r.judge_seconds for r in waves)
        return Throughput(
            tokens / seconds,
            "prompt tokens/s",
            f"this workflow: {sum(r.judge_files for r in waves)} judge wave(s), computed prompt tokens / wall time "
            "(loading included)",
            "measured",
        )
    found = judge_engine_measurement(bench_root)
    if found is not None:
        factor = found["params_b"] / size
        return Throughput(
            found["value"] * factor,
            "prompt tokens/s",
            f"vLLM judge engine, this project: {found['path']} ({found['device']}, {found['q']}), "
            f"scaled x{factor:.3f} from {found['params_b']:g}B",
            "measured",
        )
    prefill = PUBLISHED["judge_prefill"]
    factor = prefill["params_b"] / size
    value = prefill["value"] * factor
    source = f"{prefill['source']}" + (f", scaled x{factor:.2f} for {size:g}B" if abs(factor - 1) > 1e-9 else "")
    basis = "anchored"
    if quantization != "fp8":
        value *= ASSUMED_UNQUANTIZED_PREFILL_FACTOR
        source += f"; x{ASSUMED_UNQUANTIZED_PREFILL_FACTOR:g} unquantized (assumed)"
        basis = "assumed"
    return Throughput(value, "prompt tokens/s", f"{source}; GPU measurement owed ({JUDGE_BENCHMARK})", basis)


def engine_load_minutes(size_b: float | None, load_minutes: float) -> float:
    """Minutes to load one engine: ``load_minutes`` up to 14B, proportionally more above (assumed)."""
    return load_minutes * max(1.0, (size_b or ANCHOR_PARAMS_B) / LOAD_MINUTES_SIZE_B)


# --------------------------------------------------------------------------- GPU-hours


def _devices(runs: ModelRuns) -> str:
    return "/".join(sorted(runs.train_devices)) or "unknown device"


def answer_basis(
    config: Mapping[str, Any], measured: Mapping[str, ModelRuns], mean_answer_tokens: float | None = None
) -> dict[str, dict[str, Any]]:
    """Per model, the answer length the estimate prices: the last run's mean (measured: its Samples files,
    else its waves' records), else ``mean_answer_tokens`` (assumed), else ``max_new_tokens`` (the upper
    bound); never above the cap."""
    out = {}
    for model in cfg.grid_models(config):
        cap = int(cfg.resolve_sampling_params(config, model)["max_new_tokens"])
        runs = measured.get(model, ModelRuns())
        if runs.answers:
            mean = runs.answer_tokens / runs.answers
            out[model] = {
                "tokens": min(mean, cap),
                "basis": "measured",
                "source": f"mean of {runs.answers:,} answers in {runs.answer_files} Samples file(s) of the last run",
            }
        elif runs.sample_answers:
            out[model] = {
                "tokens": min(runs.sample_new_tokens / runs.sample_answers, cap),
                "basis": "measured",
                "source": f"mean of {runs.sample_answers:,} answers generated in {runs.sample_files} sampling wave(s)",
            }
        elif mean_answer_tokens is not None:
            out[model] = {
                "tokens": min(float(mean_answer_tokens), cap),
                "basis": "assumed",
                "source": f"--mean-answer-tokens {mean_answer_tokens:g}",
            }
        else:
            out[model] = {"tokens": float(cap), "basis": "upper bound", "source": "max_new_tokens: upper bound"}
    return out


def estimate(
    config: Mapping[str, Any],
    runs_root: str | Path | None = ".",
    *,
    load_minutes: float = DEFAULT_LOAD_MINUTES,
    mean_answer_tokens: float | None = None,
    judge_tokenizer: Any = None,
    kv_block_tokens: int = KV_BLOCK_TOKENS,
) -> dict[str, Any]:
    """Work, throughput and GPU-hours per model and stage. ``runs_root`` None: no earlier runs and no
    benchmark files (published and this project's docs/anchors.md figures only). ``judge_tokenizer``: the
    grid judge's tokenizer, to count its prompts' tokens with it (``judge_token_lengths``) instead of
    assuming; ``kv_block_tokens``: its engine's KV-cache block (``judge_tokens``).

    The result holds the estimate at the answer length of ``answer_basis`` and, under ``upper_bound``,
    the GPU-hours with every answer at ``max_new_tokens``."""
    work = count_work(config)
    measured = measure_runs(runs_root, list(work["models"])) if runs_root is not None else {}
    basis = answer_basis(config, measured, mean_answer_tokens)
    engine = {"tokenizer": judge_tokenizer, "kv_block_tokens": kv_block_tokens}
    result = _price(config, work, measured, runs_root, basis, load_minutes, engine)
    if all(b["basis"] == "upper bound" for b in basis.values()):
        upper = result
    else:
        upper_basis = answer_basis(config, {}, None)
        upper = _price(config, work, measured, runs_root, upper_basis, load_minutes, engine)
    result["answer_basis"] = basis
    result["upper_bound"] = {
        "gpu_hours": upper["gpu_hours"],
        "models": {m: v["gpu_hours"] for m, v in upper["models"].items()},
        # The other GPU jobs in render order (judge jobs, then the data writer).
        "others": [st["gpu_hours"] for st in _other_jobs(upper)],
    }
    return result


def _price(
    config: Mapping[str, Any],
    work: Mapping[str, Any],
    measured: Mapping[str, ModelRuns],
    runs_root: str | Path | None,
    basis: Mapping[str, Mapping[str, Any]],
    load_minutes: float,
    engine: Mapping[str, Any],
) -> dict[str, Any]:
    backend = work["judge_backend"]
    judge_cfg = config["judge"]
    model_judge = backend in MODEL_JUDGES
    parts = judge_prompt_parts(config) if model_judge else None
    if parts is not None and engine["tokenizer"] is not None:
        parts = judge_token_lengths(parts, engine["tokenizer"])
    block = int(engine["kv_block_tokens"])
    judge_rate = judge_engine_rate(judge_cfg, measured, runs_root) if model_judge else None
    judge_size = params_billions("", str(judge_cfg.get("model") or "")) or ANCHOR_PARAMS_B
    judge_load = engine_load_minutes(judge_size, load_minutes)
    scoring, scoring_source = judge_scoring(judge_cfg) if model_judge else ("", "")
    audit = float(judge_cfg.get("audit_fraction", 0.0)) if scoring == "first-token" else 0.0
    out: dict[str, Any] = {"work": work, "models": {}, "load_minutes": load_minutes, "judge_load_minutes": judge_load}
    if model_judge:
        out["judge_engine"] = {
            "backend": backend,
            "model": judge_cfg.get("model"),
            "params_b": judge_size,
            "quantization": judge_cfg.get("quantization", "none"),
            "scoring": scoring,
            "scoring_source": scoring_source,
            "audit_fraction": audit,
            "rate": judge_rate,
            "load_minutes": judge_load,
            "tokens": parts["tokens"]["source"],
            "kv_block_tokens": block,
        }
    for model, w in work["models"].items():
        runs = measured.get(model, ModelRuns())
        size = params_billions(model, w["path"])
        scale = ANCHOR_PARAMS_B / size if size else 1.0
        scaled = f", scaled x{scale:.2f} for {size:g}B" if size and size != ANCHOR_PARAMS_B else ""
        if not size:
            scaled = ", size unknown: 8B assumed"
        per_answer = float(basis[model]["tokens"])
        answer_note = f"{per_answer:,.0f} tokens ({basis[model]['basis']}: {basis[model]['source']})"
        loads = engine_load_minutes(size, load_minutes)
        stages: list[dict[str, Any]] = []

        # training: one job (one model load) per adapter
        if runs.train_files:
            per_example = runs.train_example_tokens / runs.train_examples
            example_source = f"measured: {runs.train_files} run.json"
            train = Throughput(
                runs.train_tokens / runs.train_seconds,
                "tokens/s",
                f"this workflow: {runs.train_files} run.json ({_devices(runs)})",
                "measured",
            )
        else:
            per_example = float(ASSUMED_TOKENS_PER_EXAMPLE)
            example_source = "assumed"
            smallest = min(w["micro_batch_size"].values(), default=2)
            key = "train_tokens_per_s_mb8" if smallest >= 8 else "train_tokens_per_s_mb2"
            label = "micro-batch 8" if smallest >= 8 else "micro-batch 2"
            train = Throughput(ANCHORS[key] * scale, "tokens/s", f"{ANCHOR_SOURCE}, QLoRA {label}{scaled}", "measured")
        t = w["train_adapter"]
        stages.append(
            _stage(
                "train_adapter",
                jobs=t["jobs"],
                loads=t["jobs"],
                load_minutes=loads,
                units=t["example_epochs"] * per_example,
                unit="tokens",
                detail=f"{t['example_epochs']:,.0f} example-epochs x {per_example:,.0f} tokens ({example_source})",
                throughput=train,
                largest_units=t["largest_example_epochs"] * per_example,
            )
        )

        # sampling: one job per wave (one vLLM engine, or one hf load per adapter)
        s = w["sample"]
        if runs.sample_files and runs.sample_answers:
            gen = Throughput(
                runs.sample_new_tokens / runs.sample_seconds,
                "new tokens/s",
                f"this workflow: {runs.sample_files} sampling wave record(s) (.wave.json), loading included",
                "measured",
            )
        else:
            gen = _sampling_throughput(s, size, runs_root)
        loading_included = bool(runs.sample_files and runs.sample_answers)
        stages.append(
            _stage(
                "sample",
                jobs=s["jobs"],
                loads=0 if loading_included else s["jobs"] * s["loads_per_job"],
                load_minutes=loads,
                units=s["answers"] * per_answer,
                unit="new tokens",
                detail=f"{s['answers']:,} answers in {s['jobs']} wave(s) ({s['files']:,} Samples files) x {answer_note}",
                throughput=gen,
                largest_units=s["answers_per_wave"] * per_answer,
                job_key="wave",
            )
        )

        # capabilities
        c = w["capabilities"]
        if c["jobs"]:
            if runs.capability_files and runs.capability_items:
                cap = Throughput(
                    runs.capability_items / runs.capability_seconds,
                    "items/s",
                    f"this workflow: {runs.capability_files} capabilities benchmark(s)",
                    "measured",
                )
                units, unit, detail = float(c["items"]), "items", f"{c['items']:,} items"
            else:
                cap = Throughput(
                    ANCHORS["forward_tokens_per_s"] * scale,
                    "tokens/s",
                    f"{ANCHOR_SOURCE}, packed training as a forward-pass lower bound{scaled}",
                    "measured",
                )
                units, unit = c["items"] * c["tokens_per_item"], "tokens"
                detail = f"{c['items']:,} items x {c['tokens_per_item']:,.0f} tokens (≈{CHARS_PER_TOKEN:g} chars/token)"
            stages.append(
                _stage(
                    "capabilities",
                    jobs=c["jobs"],
                    loads=0 if unit == "items" else c["jobs"],
                    load_minutes=loads,
                    units=units,
                    unit=unit,
                    detail=detail,
                    throughput=cap,
                )
            )

        # probes
        p = w["probes"]
        if p["jobs"]:
            if runs.probe_files:
                probe = Throughput(
                    1.0 / (runs.probe_seconds / runs.probe_files),
                    "jobs/s",
                    f"this workflow: {runs.probe_files} probes benchmark(s)",
                    "measured",
                )
                units, unit, detail = float(p["jobs"]), "jobs", f"{p['jobs']} job(s)"
            else:
                probe = Throughput(
                    ANCHORS["forward_tokens_per_s"] * scale,
                    "tokens/s",
                    f"{ANCHOR_SOURCE}, packed training as a forward-pass lower bound{scaled}",
                    "measured",
                )
                units, unit = p["examples"] * per_example, "tokens"
                detail = f"{p['examples']:,} chats x {per_example:,.0f} tokens"
            stages.append(
                _stage(
                    "probes",
                    jobs=p["jobs"],
                    loads=0 if unit == "jobs" else p["jobs"],
                    load_minutes=loads,
                    units=units,
                    unit=unit,
                    detail=detail,
                    throughput=probe,
                )
            )

        # steering: generation through transformers with hooks on the forward pass (whatever
        # sampling.backend says), at the steering batch; the answers are judged by judge_steering jobs
        st = w.get("steer") or {}
        if st.get("jobs"):
            steer_answer = min(per_answer, st["max_new_tokens"])
            steer_rate = Throughput(
                _generate_anchor(st["batch_size"]) * scale,
                "new tokens/s",
                f"{ANCHOR_SOURCE}, generate batch {st['batch_size']} (interpolated){scaled}",
                "measured",
            )
            seconds = steer_answer / steer_rate.value
            stages.append(
                {
                    "stage": "steer",
                    "jobs": st["jobs"],
                    "loads": st["jobs"],
                    "load_minutes": loads,
                    "units": float(st["answers"]),
                    "unit": "answers",
                    "detail": f"{st['answers']:,} steered answers x {steer_answer:,.0f} tokens (generation only)",
                    "throughput": Throughput(
                        1.0 / seconds, "answers/s", f"generation: {steer_rate.source}", "measured"
                    ),
                    # Each steering job asks SLURM for its own expected time (rules/directions.smk).
                    "job_minutes": {key: n * seconds / 60 + loads for key, n in st["job_answers"].items()},
                    "load_minutes_per_job": loads,
                }
            )
            stages[-1]["largest_job_hours"] = max(stages[-1]["job_minutes"].values(), default=0.0) / 60
            # A model's steered answers are judged in one job of their own (judge_steering) through the same
            # judge engine as every answer, counted as a judge wave is: prompt tokens prefilled, one load.
            if model_judge:
                together = float(config["eval"]["probes"]["steering"]["n_samples"])
                one = judge_tokens(
                    parts,
                    "em",
                    steer_answer,
                    backend=backend,
                    scoring=scoring,
                    answers_per_question=together,
                    kv_block_tokens=block,
                )
                stages.append(
                    _stage(
                        "judge_steering",
                        jobs=1,
                        loads=1,
                        load_minutes=judge_load,
                        units=st["answers"] * one["computed"],
                        unit="prompt tokens",
                        detail=f"{st['answers']:,} steered answers of {st['jobs']} steering jobs ({scoring}): "
                        f"{one['computed']:,.0f} computed prompt tokens per answer, all its metrics",
                        throughput=judge_rate,
                        job_key="all",
                    )
                )

        # judging: one engine per wave; its prompt tokens as the code sends them
        if model_judge:
            j = w["judge"]
            per_wave = {"sent": 0.0, "cached": 0.0, "computed": 0.0, "generated": 0.0, "requests": 0.0}
            for suite, n in j["answers_per_wave"].items():
                together = float(cfg.suite_spec(config, suite)["n_samples"])
                one = judge_tokens(
                    parts,
                    suite,
                    per_answer,
                    backend=backend,
                    scoring=scoring,
                    audit=audit,
                    answers_per_question=together,
                    kv_block_tokens=block,
                )
                for key in per_wave:
                    per_wave[key] += n * one[key]
            verdicts_per_wave = j["calls"] / j["jobs"] if j["jobs"] else 0
            # This workflow's own waves time the whole job, the engine's loading included.
            waves_measured = judge_rate.source.startswith("this workflow")
            stages.append(
                _stage(
                    "judge",
                    jobs=j["jobs"],
                    loads=0 if waves_measured else j["jobs"],
                    load_minutes=judge_load,
                    units=per_wave["computed"] * j["jobs"],
                    unit="prompt tokens",
                    detail=(
                        f"{j['calls']:,} verdicts ({scoring}"
                        + (f", {audit:.1%} audited exactly" if audit else "")
                        + f") in {j['jobs']} wave(s): {per_wave['computed'] / max(verdicts_per_wave, 1):,.0f} "
                        f"computed prompt tokens per verdict, answers at {answer_note}"
                    ),
                    throughput=judge_rate,
                    largest_units=per_wave["computed"],
                    job_key="wave",
                )
            )
            stages[-1]["tokens_per_wave"] = {**per_wave, "verdicts": verdicts_per_wave, "loads": 1}
            if waves_measured:
                stages[-1]["largest_job_hours"] += judge_load / 60
        for stage in stages:
            stage["gpu_hours"] = stage["units"] / stage["throughput"].value / 3600
        load_hours = sum(st["loads"] * st["load_minutes"] / 60 for st in stages)
        stages.append(
            {
                "stage": "model loading",
                "jobs": sum(st["loads"] for st in stages),
                "loads": sum(st["loads"] for st in stages),
                "units": load_hours * 3600,
                "unit": "s",
                "detail": (
                    f"{sum(st['loads'] for st in stages):,} engine and model loads: {loads:g} min each"
                    + (f", the judge's {judge_load:g} min" if model_judge else "")
                    + " (assumed; not where a measured wall time holds it)"
                ),
                "gpu_hours": load_hours,
                "throughput": Throughput(
                    1.0, "", "assumed (--load-minutes; larger models proportionally longer)", "assumed"
                ),
                "largest_job_hours": None,
            }
        )
        out["models"][model] = {
            "path": w["path"],
            "params_b": size,
            "stages": stages,
            "gpu_hours": sum(stage["gpu_hours"] for stage in stages),
            "largest_group_hours": _group_hours(stages, w, loads),
        }
    out["gpu_hours"] = sum(m["gpu_hours"] for m in out["models"].values())
    out["judge_jobs"] = _other_judge_jobs(config, work, measured, runs_root, basis, load_minutes)
    out["gpu_hours"] += sum(j["gpu_hours"] for j in out["judge_jobs"])
    data = _data_generation(work, runs_root, load_minutes)
    if data is not None:
        # The data filter judges inside the same jobs: their time limit holds both.
        for job in out["judge_jobs"]:
            if job["stage"].startswith("data filter"):
                data["largest_job_hours"] += job["largest_job_hours"]
                data["detail"] += "; its longest job includes the data filter's judging"
        out["data_generation"] = data
        out["gpu_hours"] += data["gpu_hours"]
    return out


def _group_hours(stages: Sequence[Mapping[str, Any]], w: Mapping[str, Any], load_minutes: float) -> float:
    """Hours of the longest SLURM group job: one adapter's capability evals (final and at saved steps),
    each with its load. Training is a job of its own (profiles/slurm/config.yaml), so a failed evaluation
    never removes it; sampling and judging are one job per wave, outside the groups."""
    rate = {stage["stage"]: stage["throughput"] for stage in stages}
    if "capabilities" not in rate:
        return 0.0
    per_item = 1.0 if rate["capabilities"].unit == "items/s" else w["capabilities"]["tokens_per_item"]
    capability_seconds = w["capability_items_per_job"] * per_item / rate["capabilities"].value
    evals = max((group["capability_evals"] for group in w["adapter_groups"]), default=0)
    return evals * (capability_seconds / 3600 + load_minutes / 60)


def _stage(
    name: str,
    *,
    jobs: int,
    loads: int,
    load_minutes: float,
    units: float,
    unit: str,
    detail: str,
    throughput: Throughput,
    largest_units: float | None = None,
    job_key: str | None = None,
) -> dict[str, Any]:
    """A stage row; its longest job is ``largest_units`` (else the mean job) plus its share of the loads
    where loads are counted apart (one per job, or several: the hf sampling loop loads once per adapter).
    ``job_key``: the stage's jobs are all alike (one per wave) and ask SLURM for their expected time under
    this key (``job_minutes``)."""
    each = largest_units if largest_units is not None else (units / jobs if jobs else 0.0)
    minutes = each / throughput.value / 60 + (load_minutes * loads / jobs if loads and jobs else 0.0)
    stage = {
        "stage": name,
        "jobs": jobs,
        "loads": loads,
        "load_minutes": load_minutes,
        "units": units,
        "unit": unit,
        "detail": detail,
        "throughput": throughput,
        "largest_job_hours": minutes / 60 if jobs else 0.0,
    }
    if job_key is not None and jobs:
        stage["job_minutes"] = {job_key: minutes}
    return stage


def _other_judge_jobs(
    config: Mapping[str, Any],
    work: Mapping[str, Any],
    measured: Mapping[str, ModelRuns],
    runs_root: str | Path | None,
    basis: Mapping[str, Mapping[str, Any]],
    load_minutes: float,
) -> list[dict[str, Any]]:
    """Model-judge work outside the waves, each job loading its own judge: the training data judged (rule
    judge_training_data, the grid's judge), the data filter inside each data job (data.filter.judge), the
    second judge's share of every cell (rule judge_second, one job per model and seed) and the calibration
    set (judge_calibration, once per judge). Each is counted with ``judge_tokens`` at its own judge's
    back-end and scoring path: a judge whose tokenizer splits digits (Gemma's) scores exactly."""
    jobs = []
    data = work["data_generation"]
    training = work["training_data_judging"]
    calibration = work["calibration"]
    cached = f"; {training['cached_jobs']} matched arm(s) send nothing (cached)" if training["cached_jobs"] else ""
    # (stage, judge, jobs, verdicts, answer tokens, what, which judge where a stage runs several): answers
    # priced as em answers (the same templates).
    entries = [
        ("judge_training_data", config["judge"], training["jobs"], training["answers"] * training["metrics"],
         training["answer_tokens"], f"{training['answers']:,} training answers (every line of train.jsonl, at "
         f"most the pool) x {training['metrics']} metrics{cached}", None),
        ("data filter (in generate_data)", data["filter_judge"] or {}, data["jobs"], data["filter_verdicts"],
         data["max_tokens"], f"{data['requests']:,} written answers (the pools), each on its arm's metrics", None),
    ]  # fmt: skip
    for (judge_name, _), params in zip(calibration["judges"], calibration["judge_configs"], strict=True):
        entries.append(
            ("judge_calibration", params, 1, calibration["calls_per_judge"], 120,
             "the calibration set (~120 tokens/answer assumed)", judge_name)
        )  # fmt: skip
    for name, judge_cfg, n_jobs, verdicts, answer_tokens, what, which in entries:
        if not n_jobs or not verdicts or judge_cfg.get("backend") not in MODEL_JUDGES:
            continue
        judge_cfg, rate, load, scoring = _judge_setup(config, judge_cfg, measured, runs_root, load_minutes)
        parts = judge_prompt_parts(config, judge_cfg)
        suite = "em" if "em" in parts["suites"] else next(iter(parts["suites"]))
        one = judge_tokens(parts, suite, answer_tokens, backend=judge_cfg["backend"], scoring=scoring)
        tokens = verdicts * one["computed"] / len(parts["suites"][suite]["metrics"])
        hours = tokens / rate.value / 3600
        jobs.append(
            {
                "stage": name,
                "jobs": n_jobs,
                "loads": n_jobs,
                "units": tokens,
                "unit": "prompt tokens",
                "detail": f"{verdicts:,.0f} verdicts on {what} ({scoring}), {answer_tokens:,} answer tokens each",
                "throughput": rate,
                "gpu_hours": hours + n_jobs * load / 60,
                "largest_job_hours": hours / n_jobs + load / 60,
                **({"judge": which} if which else {}),
            }
        )
    second = _second_judge_jobs(config, work, measured, runs_root, basis, load_minutes)
    if second is not None:
        jobs.insert(1, second)
    return jobs


def _judge_setup(
    config: Mapping[str, Any],
    judge_cfg: Mapping[str, Any],
    measured: Mapping[str, ModelRuns],
    runs_root: str | Path | None,
    load_minutes: float,
) -> tuple[dict[str, Any], Throughput, float, str]:
    """A judge other than the waves' as its jobs run it: its full settings, its prefill rate (the waves'
    measured rate only for the grid's own judge), its load (minutes) and its scoring path."""
    full = {**config["judge"], **judge_cfg}
    own = (full.get("model"), full.get("backend")) == (config["judge"].get("model"), config["judge"]["backend"])
    rate = judge_engine_rate(full, measured if own else {}, runs_root)
    size = params_billions("", str(full.get("model") or "")) or ANCHOR_PARAMS_B
    return full, rate, engine_load_minutes(size, load_minutes), judge_scoring(full)[0]


def _second_judge_jobs(
    config: Mapping[str, Any],
    work: Mapping[str, Any],
    measured: Mapping[str, ModelRuns],
    runs_root: str | Path | None,
    basis: Mapping[str, Mapping[str, Any]],
    load_minutes: float,
) -> dict[str, Any] | None:
    """Rule judge_second: per model and seed, judge.agreement_answers_per_cell answers of every final Samples
    file, on each suite's metrics, at the model's answer length; each job asks SLURM for its own time."""
    seconds = {model: w["judge_second"] for model, w in work["models"].items() if w.get("judge_second")}
    seconds = {model: second for model, second in seconds.items() if second["jobs"]}
    if not seconds or config["judge"]["agreement_with"].get("backend") not in MODEL_JUDGES:
        return None
    judge_cfg, rate, load, scoring = _judge_setup(
        config, config["judge"]["agreement_with"], measured, runs_root, load_minutes
    )
    parts = judge_prompt_parts(config, judge_cfg)
    tokens, job_minutes, verdicts = 0.0, {}, 0
    for model, second in seconds.items():
        per_answer = float(basis[model]["tokens"])
        per_job = sum(
            n * judge_tokens(parts, suite, per_answer, backend=judge_cfg["backend"], scoring=scoring)["computed"]
            for suite, n in second["answers_per_job"].items()
        )
        tokens += per_job * second["jobs"]
        verdicts += second["calls"]
        job_minutes[(model, "all")] = per_job / rate.value / 60 + load
    n_jobs = sum(second["jobs"] for second in seconds.values())
    answers = sum(second["answers"] for second in seconds.values())
    return {
        "stage": "judge_second",
        "jobs": n_jobs,
        "loads": n_jobs,
        "units": tokens,
        "unit": "prompt tokens",
        "detail": (
            f"{verdicts:,} verdicts on {answers:,} answers (judge.agreement_with `{judge_cfg['backend']}` "
            f"{judge_cfg.get('model')}, {scoring}; judge.agreement_answers_per_cell of every cell), answers at "
            + ", ".join(f"{model} {basis[model]['tokens']:,.0f} tokens" for model in seconds)
        ),
        "throughput": rate,
        "gpu_hours": tokens / rate.value / 3600 + n_jobs * load / 60,
        "largest_job_hours": max(job_minutes.values()) / 60,
        "job_minutes": job_minutes,
    }


def _data_generation(
    work: Mapping[str, Any], runs_root: str | Path | None, load_minutes: float
) -> dict[str, Any] | None:
    """Model-written training data (data.generator.backend hf or vllm): one job per generated condition,
    shared by every model and seed, writing its pool (data.pool_factor x n_examples answers)."""
    data = work["data_generation"]
    if data["backend"] not in ("hf", "vllm") or not data.get("jobs"):
        return None
    size = params_billions("", str(data.get("model") or "")) or ANCHOR_PARAMS_B
    if data["backend"] == "vllm":
        # The sampling engine's rate for a model of the writer's size; the writer serves no adapter.
        rate = _sampling_throughput({"backend": "vllm"}, size, runs_root, lora=False)
    else:
        nf4 = PUBLISHED["nf4_factor"]
        factor = nf4["value"] if data.get("quantization") == "nf4" else 1.0
        rate = Throughput(
            _generate_anchor(data["batch_size"]) * ANCHOR_PARAMS_B / size * factor,
            "new tokens/s",
            f"{ANCHOR_SOURCE}, generate batch {data['batch_size']}, writer ~{size:g}B"
            + (f"; x{nf4['value']:.2f}: {nf4['source']}" if factor != 1.0 else ""),
            "measured" if factor == 1.0 else "anchored",
        )
    load = engine_load_minutes(size, load_minutes)
    units = data["requests"] * data["max_tokens"]
    return {
        "stage": "generate_data_gpu",
        "jobs": data["jobs"],
        "loads": data["jobs"],
        "units": units,
        "unit": "new tokens",
        "detail": f"{data['requests']:,} answers ({data['jobs']} pools) x {data['max_tokens']:,} tokens "
        "(max_tokens: upper bound)",
        "throughput": rate,
        "gpu_hours": units / rate.value / 3600 + data["jobs"] * load / 60,
        "largest_job_hours": units / data["jobs"] / rate.value / 3600 + load / 60,
    }


# Estimate stage -> the Snakemake rule that runs it.
STAGE_RULES = {
    "train_adapter": "train_adapter",
    "sample": "sample",
    "capabilities": "capabilities",
    "probes": "probes",
    "judge": "judge",
    "judge_second": "judge_second",
    "steer": "steer",
    "judge_steering": "judge_steering",
    "generate_data_gpu": "generate_data_gpu",
    "judge_training_data": "judge_training_data",
    "judge_calibration": "judge_calibration",
}


def profile_runtimes(path: str | Path = "profiles/default/config.yaml") -> dict[str, float]:
    """Rule -> `runtime` (minutes) as the workflow profile sets it; {} if the file is missing."""
    import yaml

    path = Path(path)
    if not path.exists():
        return {}
    try:
        profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise EstimateError(f"{path}: not readable YAML: {err}") from err
    return {
        rule: float(values["runtime"])
        for rule, values in (profile.get("set-resources") or {}).items()
        if isinstance(values, Mapping) and isinstance(values.get("runtime"), int | float)
    }


def longest_jobs(
    result: Mapping[str, Any], runtimes: Mapping[str, float], cap_minutes: float | None = None
) -> list[dict[str, Any]]:
    """Per rule: the longest expected job over all models, against the rule's runtime. Sampling, model
    judge and steering jobs ask for their own runtime from this estimate (rules/sample.smk,
    rules/judge.smk, rules/directions.smk), so theirs is that request, at most ``cap_minutes``
    (CHARACTER_EM_MAX_RUNTIME, as the rules read it), unless the profile sets the rule's runtime."""
    rows: dict[str, dict[str, Any]] = {}
    stages = [(model, st) for model, m in result["models"].items() for st in m["stages"]]
    if result.get("data_generation"):
        stages.append(("(data)", result["data_generation"]))
    stages += [("(judge)", st) for st in result.get("judge_jobs", [])]
    for model, st in stages:
        rule = STAGE_RULES.get(st["stage"])
        if rule is None or st.get("largest_job_hours") is None:
            continue
        minutes = st["largest_job_hours"] * 60
        if rule not in rows or minutes > rows[rule]["minutes"]:
            rows[rule] = {"rule": rule, "model": model, "minutes": minutes}
    per_job = {
        "sample": "rules/sample.smk",
        "judge": "rules/judge.smk",
        "judge_second": "rules/calibration.smk",
        "steer": "rules/directions.smk",
        "judge_steering": "rules/directions.smk",
    }
    for row in rows.values():
        if row["rule"] in per_job and row["rule"] not in runtimes:
            row["runtime"] = float(runtime_request(row["minutes"], cap_minutes))
            row["runtime_source"] = f"per job: expected x{RUNTIME_MARGIN:g} ({per_job[row['rule']]})"
            if cap_minutes and row["runtime"] >= cap_minutes:
                row["runtime_source"] += f", capped by CHARACTER_EM_MAX_RUNTIME={cap_minutes:g}"
        else:
            row["runtime"] = runtimes.get(row["rule"])
            row["runtime_source"] = "profiles/default/config.yaml" if row["runtime"] is not None else "not set"
        row["fits"] = row["runtime"] is not None and row["minutes"] <= row["runtime"]
        row["fits_cap"] = cap_minutes is None or row["minutes"] <= cap_minutes
    return sorted(rows.values(), key=lambda row: list(STAGE_RULES).index(row["rule"]))


# --------------------------------------------------------------------------- per-job time limits

# A job asks SLURM for its expected time times this margin, so that a somewhat slow node or a
# longer answer does not reach the limit; a job that still does resumes from its saved batches.
RUNTIME_MARGIN = 1.5
MIN_RUNTIME_MINUTES = 10


def answers_per_sampling_job(config: Mapping[str, Any], suite: str) -> int:
    """Answers one sampling job of ``suite`` draws. Before the workflow has fetched a harmful-request
    set (resources/harmful/, rule fetch_harmful_requests) the packaged list stands in for it, so the
    DAG and the estimate can be built before the first job runs."""
    from character_em.evals import suites

    spec = cfg.suite_spec(config, suite)
    fetched = spec.get("harmful_requests_file")
    if suite == "persona" and fetched and str(fetched).startswith("resources/harmful/") and not Path(fetched).exists():
        spec = {**spec, "harmful_requests_file": None}
    return sum(row["n_samples"] for row in suites.build_prompts(suite, spec))


def sample_wave_minutes(
    config: Mapping[str, Any], runs_root: str | Path | None = ".", *, load_minutes: float = DEFAULT_LOAD_MINUTES
) -> dict[str, float]:
    """Expected minutes of one sampling job (one model's wave of one seed) by model, loading included: the
    estimate's sample stage (the wave's answers at the answer length and speed measured by earlier waves
    where they exist, else the GPU benchmarks or the anchors, plus one load per engine or per hf adapter)."""
    result = estimate(config, runs_root, load_minutes=load_minutes)
    return {model: minutes for (model, _), minutes in job_minutes(result, "sample").items()}


def job_minutes(result: Mapping[str, Any], stage_name: str) -> dict[tuple[str, str], float]:
    """(model, key) -> expected minutes of one job of a stage that sizes its jobs itself (``job_minutes``
    of an ``estimate`` result: sample and judge by "wave", steer by ``steering_job_key``, judge_steering
    and judge_second by "all")."""
    minutes = {
        (model, key): value
        for model, m in result["models"].items()
        for stage in m["stages"]
        if stage["stage"] == stage_name
        for key, value in stage.get("job_minutes", {}).items()
    }
    for job in result.get("judge_jobs", []):
        if job["stage"] == stage_name:
            minutes.update(job.get("job_minutes", {}))
    return minutes


# An API judge's pace is its provider's rate limit, which no anchor measures, and the rubric takes
# seconds: their jobs ask for a fixed time. A job that reaches it resumes from the judge cache.
OFF_GPU_JUDGE_RUNTIME = 720


def judge_runtime_request(expected_minutes: float | None, cap_minutes: float | None = None) -> int:
    """The judge job's `runtime`: its expected time with the margin for a model judge (None: an API or
    rubric judge, which asks for ``OFF_GPU_JUDGE_RUNTIME``), at most the cap."""
    if expected_minutes is not None:
        return runtime_request(expected_minutes, cap_minutes)
    return _capped(OFF_GPU_JUDGE_RUNTIME, cap_minutes)


def runtime_cap() -> float | None:
    """The site's cap on per-job runtime requests (``CHARACTER_EM_MAX_RUNTIME``, minutes), or None."""
    cap = os.environ.get("CHARACTER_EM_MAX_RUNTIME", "").strip()
    return float(cap) if cap else None


def runtime_request(expected_minutes: float, cap_minutes: float | None = None) -> int:
    """The `runtime` (minutes) to ask SLURM for: the expectation with a margin, at most the cap."""
    return _capped(max(MIN_RUNTIME_MINUTES, math.ceil(expected_minutes * RUNTIME_MARGIN)), cap_minutes)


def _capped(request: int, cap_minutes: float | None) -> int:
    return int(min(request, cap_minutes)) if cap_minutes else request


# --------------------------------------------------------------------------- output

DEFAULT_GPUS = 8


def _fmt_units(value: float, unit: str) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:,.1f}{suffix} {unit}"
    return f"{value:,.0f} {unit}"


def _rate(t: Throughput) -> str:
    if not t.unit:
        return "-"
    return (f"{t.value:,.1f}" if t.value >= 10 else f"{t.value:.3g}") + f" {t.unit}"


def _job_name(stage: Mapping[str, Any]) -> str:
    """A row's name: the stage, and which judge where one stage runs several (judge_calibration)."""
    return f"{stage['stage']} ({stage['judge']})" if stage.get("judge") else stage["stage"]


def _other_jobs(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The GPU jobs outside the models' stages: judging outside the waves, then the data writer."""
    return [*result.get("judge_jobs", []), *([result["data_generation"]] if result.get("data_generation") else [])]


def render_summary(result: Mapping[str, Any], source: str, gpus: int = DEFAULT_GPUS, price: float | None = None) -> str:
    """The headline, a small Markdown table: GPU-hours at the priced answer length and at the upper bound
    (every answer ``max_new_tokens``), the days they take on ``gpus`` GPUs and, given a price per GPU-hour,
    what they cost."""
    upper = "every answer at max_new_tokens (upper bound)"
    kinds = {b["basis"] for b in result["answer_basis"].values()}
    if kinds == {"upper bound"}:
        rows = [(upper, result["gpu_hours"])]
    else:
        lengths = ", ".join(f"{m} {b['tokens']:,.0f}" for m, b in result["answer_basis"].items())
        label = "the last run's mean answer length" if kinds == {"measured"} else "the given mean answer length"
        rows = [(f"{label} ({lengths} tokens; {'/'.join(sorted(kinds))})", result["gpu_hours"])]
        rows.append((upper, result["upper_bound"]["gpu_hours"]))
    lines = [
        f"| {source}: answers at | GPU-hours | days on {gpus} GPUs |" + (" cost |" if price is not None else ""),
        "|---|---:|---:|" + ("---:|" if price is not None else ""),
    ]
    for label, hours in rows:
        cost = f" {hours * price:,.0f} at {price:g} per GPU-hour |" if price is not None else ""
        lines.append(f"| {label} | {hours:,.1f} | {hours / 24 / gpus:,.1f} |{cost}")
    return "\n".join(lines) + "\n"


def render_markdown(
    result: Mapping[str, Any],
    source: str,
    runtimes: Mapping[str, float] | None = None,
    cap_minutes: float | None = None,
    *,
    gpus: int = DEFAULT_GPUS,
    price: float | None = None,
) -> str:
    work = result["work"]
    lines = [
        f"# GPU-hour estimate: {source}",
        "",
        "An estimate before launch, not a measurement; queueing and failed attempts are not included. Every",
        "throughput says whether it was **measured** (by this workflow's earlier runs, or this project's",
        "benchmarks: docs/anchors.md, benchmarks/results/), **anchored** (a published figure, named) or",
        "**assumed**, and on what. One engine per wave (model, seed) samples and one judges; each load counts.",
        "",
        "## Headline",
        "",
        render_summary(result, source, gpus, price).rstrip(),
        "",
    ]
    engine = result.get("judge_engine")
    if engine:
        lines += [
            f"Judge: `{engine['backend']}` {engine['model']} (~{engine['params_b']:g}B, quantization "
            f"{engine['quantization']}), {engine['scoring']} scoring ({engine['scoring_source']})"
            + (f", {engine['audit_fraction']:.1%} of verdicts also scored exactly" if engine["audit_fraction"] else "")
            + f"; {engine['load_minutes']:g} min to load (assumed). Prompt tokens: {engine['tokens']}; the prefix"
            f" cache shares whole KV blocks of {engine['kv_block_tokens']} tokens.",
            "",
        ]
    for model, m in result["models"].items():
        size = f"{m['params_b']:g}B parameters" if m["params_b"] else "size unknown"
        lines += [
            f"## {model} ({m['path']}, {size})",
            "",
            "| stage | jobs | loads | work | throughput | basis | source | GPU-hours | longest job (h) |",
            "|---|---:|---:|---|---:|---|---|---:|---:|",
        ]
        for st in m["stages"]:
            t = st["throughput"]
            longest = "" if st["largest_job_hours"] is None else f"{st['largest_job_hours']:,.2f}"
            lines.append(
                f"| {st['stage']} | {st['jobs']:,} | {st.get('loads', 0):,} | {_fmt_units(st['units'], st['unit'])}: "
                f"{st['detail']} | {_rate(t)} | {t.basis} | {t.source} | {st['gpu_hours']:,.1f} | {longest} |"
            )
        lines += [f"| **total** | | | | | | | **{m['gpu_hours']:,.1f}** | |", ""]
        steps = work["models"][model].get("eval_steps") or {}
        if steps.get("saved_adapters"):
            lines += [
                f"Saved training steps (train.eval_steps): {steps['saved_adapters']:,} adapters, {steps['sample_files']:,} "
                f"Samples files sampled and judged in their waves, {steps['capability_jobs']:,} capability jobs; "
                "included in the rows above.",
                "",
            ]
        if m.get("largest_group_hours"):
            lines += [
                f"Longest SLURM group job (one adapter's capability evals, final and at saved steps): "
                f"{m['largest_group_hours']:,.1f} h; it must fit the partition's time limit.",
                "",
            ]
    if engine:
        lines += [
            "## The judge engine's tokens per wave",
            "",
            "As `judge.core.score_wave` sends them: prompt tokens in the requests, those the prefix cache serves,",
            "those prefilled, one generated step per request, one engine load per wave.",
            "",
            "| model | verdicts | requests | prompt tokens sent | from the prefix cache | prefilled | generated | loads |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for model, m in result["models"].items():
            for st in m["stages"]:
                tw = st.get("tokens_per_wave")
                if st["stage"] == "judge" and tw:
                    lines.append(
                        f"| {model} | {tw['verdicts']:,.0f} | {tw['requests']:,.0f} | {_fmt_units(tw['sent'], '')} "
                        f"| {_fmt_units(tw['cached'], '')} | {_fmt_units(tw['computed'], '')} "
                        f"| {_fmt_units(tw['generated'], '')} | {tw['loads']} |"
                    )
        lines.append("")
    others = _other_jobs(result)
    if others:
        lines += [
            "## Other GPU jobs: model-written data and judging outside the waves",
            "",
            "| job | jobs | work | throughput | basis | source | GPU-hours (loads included) | longest job (h) |",
            "|---|---:|---|---:|---|---|---:|---:|",
        ]
        for st in others:
            t = st["throughput"]
            lines.append(
                f"| {_job_name(st)} | {st['jobs']:,} | {_fmt_units(st['units'], st['unit'])}: {st['detail']} "
                f"| {_rate(t)} | {t.basis} | {t.source} | {st['gpu_hours']:,.1f} | {st['largest_job_hours']:,.2f} |"
            )
        lines.append("")
    if runtimes is not None:
        lines += [
            "## Longest job per rule against its time limit",
            "",
            "SLURM ends a job at its `runtime`; a job expected to run longer must be split or given more time. A",
            "sampling, judge or steering job capped below its expectation resumes on each retry from its saved",
            "batches or the judge cache, paying a model load each time."
            + (f" The partition's limit here: CHARACTER_EM_MAX_RUNTIME={cap_minutes:g} min." if cap_minutes else ""),
            "",
            "| rule | longest expected job (min) | model | runtime (min) | runtime from | fits |"
            + (" within the partition limit |" if cap_minutes else ""),
            "|---|---:|---|---:|---|---|" + ("---|" if cap_minutes else ""),
        ]
        for row in longest_jobs(result, runtimes, cap_minutes):
            runtime = "-" if row["runtime"] is None else f"{row['runtime']:,.0f}"
            lines.append(
                f"| {row['rule']} | {row['minutes']:,.0f} | {row['model']} | {runtime} | {row['runtime_source']} "
                f"| {'yes' if row['fits'] else '**no**'} |"
                + ((" yes |" if row["fits_cap"] else " **no** |") if cap_minutes else "")
            )
        lines.append("")
    lines += ["## Totals", "", "| part | GPU-hours | upper bound |", "|---|---:|---:|"]
    for model, m in result["models"].items():
        lines.append(f"| {model} | {m['gpu_hours']:,.1f} | {result['upper_bound']['models'][model]:,.1f} |")
    for st, upper in zip(others, result["upper_bound"]["others"], strict=True):
        lines.append(f"| {_job_name(st)} | {st['gpu_hours']:,.1f} | {upper:,.1f} |")
    lines += [f"| **all** | **{result['gpu_hours']:,.1f}** | **{result['upper_bound']['gpu_hours']:,.1f}** |", ""]

    backend = work["judge_backend"]
    lines += ["## Judge calls", ""]
    per_job = ", ".join(
        f"{suite}: {n:,} answers x {work['metrics_per_answer'][suite]} metrics"
        for suite, n in work["answers_per_job"].items()
    )
    lines += [f"Per Samples file: {per_job}.", ""]
    lines += [
        "| model | " + " | ".join(work["answers_per_job"]) + " | total |",
        "|---|" + "---:|" * (len(work["answers_per_job"]) + 1),
    ]
    for model, w in work["models"].items():
        calls = w["judge"]["calls_by_suite"]
        lines.append(
            f"| {model} | "
            + " | ".join(f"{calls.get(s, 0):,}" for s in work["answers_per_job"])
            + f" | {w['judge']['calls']:,} |"
        )
    total_calls = sum(w["judge"]["calls"] for w in work["models"].values())
    calibration = work["calibration"]
    cal_api = sum(calibration["calls_per_judge"] for _, b in calibration["judges"] if b == "openai")
    lines.append("")
    if backend == "openai":
        lines.append(
            f"Backend `openai` ({work['judge_model']}): **{total_calls:,} API calls** for the grid, plus "
            f"{cal_api:,} for judge calibration (upper bounds: the judge cache skips answers already scored)."
        )
    elif backend in MODEL_JUDGES:
        lines.append(f"Backend `{backend}`: no API calls; the {total_calls:,} verdicts run on GPUs (the `judge` rows).")
    else:
        lines.append(
            f"Backend `rubric` (offline keyword test instrument): {total_calls:,} CPU scorings, no API calls"
            + (f"; judge calibration's agreement judge makes {cal_api:,} API calls." if cal_api else ".")
        )
    data = work["data_generation"]
    if data["backend"] == "openai":
        lines.append(
            f"Data generation (`openai`): about **{data['requests']:,} API calls** (one per planned turn of each "
            "condition's pool, data.pool_factor x data.n_examples)."
        )
    elif data["backend"] in ("hf", "vllm"):
        lines.append(f"Data generation (`{data['backend']}`): {data['requests']:,} answers generated on a GPU (above).")
    seconds = [w["judge_second"] for w in work["models"].values() if w.get("judge_second")]
    if seconds:
        where = {"openai": "API calls", "rubric": "CPU scorings (rubric test instrument)"}.get(
            seconds[0]["backend"], "verdicts on a GPU (the `judge_second` row above)"
        )
        lines.append(
            f"Second judge (judge.agreement_with, `{seconds[0]['backend']}` {seconds[0]['model'] or ''}): "
            f"{sum(second['calls'] for second in seconds):,} {where} for the judge-swap table "
            "(judge.agreement_answers_per_cell answers of every cell)."
        )
    lines += [
        "",
        "Not estimated: direction_means (forward passes over the sampled answers), the sampling engines' prompt",
        "prefill (small beside their answers), and CPU-only rules.",
        "",
    ]
    return "\n".join(lines)


def benchmark_seconds(path: str | Path) -> float:
    """Wall seconds of one Snakemake benchmark file, read as the estimate reads them (report.progress
    sums them into the GPU-hours a grid has spent)."""
    return _benchmark_seconds(Path(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m character_em.report.estimate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--configfile", default="config.yaml", help="a complete config (default: config.yaml)")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument(
        "--from-runs",
        default=".",
        metavar="DIR",
        help="workflow directory (or its results/) whose earlier runs and benchmarks/results/ give measured "
        "throughput and answer lengths (default: .)",
    )
    runs.add_argument(
        "--anchors-only", action="store_true", help="ignore earlier runs and benchmark files; anchors only"
    )
    parser.add_argument(
        "--load-minutes",
        type=float,
        default=DEFAULT_LOAD_MINUTES,
        help=f"loading one model of up to 14B, minutes; larger ones proportionally longer (default {DEFAULT_LOAD_MINUTES:g})",
    )
    parser.add_argument(
        "--mean-answer-tokens",
        type=float,
        help="price answers at this mean length where no run has measured one (assumed; default: max_new_tokens)",
    )
    parser.add_argument(
        "--gpus", type=int, default=DEFAULT_GPUS, help=f"GPUs for the days column (default {DEFAULT_GPUS})"
    )
    parser.add_argument("--price-per-gpu-hour", type=float, help="what one GPU-hour costs you; adds the cost")
    parser.add_argument(
        "--profile",
        default="profiles/default/config.yaml",
        help="workflow profile whose per-rule runtime the longest jobs are compared with",
    )
    parser.add_argument(
        "--judge-tokenizer",
        metavar="DIR",
        help="the judge's tokenizer (a local model folder): count its prompts' tokens with it instead of assuming",
    )
    parser.add_argument("--summary", action="store_true", help="print the headline table only")
    parser.add_argument("--output", help="also write the Markdown here")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error("--gpus must be at least 1")
    try:
        config = cfg.load_config(args.configfile)
        tokenizer = None
        if args.judge_tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.judge_tokenizer)
        result = estimate(
            config,
            None if args.anchors_only else args.from_runs,
            load_minutes=args.load_minutes,
            mean_answer_tokens=args.mean_answer_tokens,
            judge_tokenizer=tokenizer,
        )
    except (cfg.ConfigError, EstimateError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.summary:
        text = render_summary(result, args.configfile, args.gpus, args.price_per_gpu_hour)
    else:
        text = render_markdown(
            result,
            args.configfile,
            profile_runtimes(args.profile),
            runtime_cap(),
            gpus=args.gpus,
            price=args.price_per_gpu_hour,
        )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
