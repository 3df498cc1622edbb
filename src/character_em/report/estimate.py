"""GPU-hours and judge calls of a grid, before launch.

``count_work(config)`` is plain grid arithmetic over a validated config: jobs of each kind, training
tokens (examples x epochs x tokens per example), sampled answers and new tokens (answers x
``max_new_tokens``), judge calls (answers x metrics), capability items and probe examples.
``estimate(config, runs_root)`` turns that into GPU-hours, with a throughput for every stage that is
either measured on this model by earlier runs (run.json of finished training, Snakemake benchmark files
of sampling, capabilities and probes under ``runs_root``) or, where there is none, a default anchor:
docs/anchors.md, measured on one H200 with the Llama-3.1-8B shape and scaled by parameter count.
Every number in the output says where it came from.

CLI (prints Markdown; ``--output`` also writes it)::

    python -m character_em.report.estimate --configfile config.yaml [--from-runs DIR | --anchors-only]

The estimate is a planning number, not a measurement: anchors are from one GPU type and one model
shape, and sampling assumes every answer runs to ``max_new_tokens`` unless earlier runs measured the
mean answer length. Pure Python (polars reads measured sample files); no torch.
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
    "EstimateError",
    "Throughput",
    "count_work",
    "estimate",
    "measure_runs",
    "render_markdown",
    "main",
]

ANCHOR_SOURCE = "docs/anchors.md anchor (H200, Llama-3.1-8B shape)"
ANCHOR_PARAMS_B = 8.0
# docs/anchors.md, one H200. Training: QLoRA NF4 r=32; the recipe's micro-batch 2 is the slow
# (and therefore safe) figure; 8 or more uses the micro-batch-8 figure.
ANCHORS: dict[str, Any] = {
    "train_tokens_per_s_mb2": 453.0,
    "train_tokens_per_s_mb8": 2621.0,
    # generate, bf16, LoRA unmerged, 256 new tokens: batch -> new tokens/s. Sampling merges the
    # adapter, which is faster; the unmerged figures keep the estimate on the safe side.
    "generate_new_tokens_per_s": {16: 167.0, 64: 637.0, 256: 2734.0},
    # Forward-only scoring (capabilities, probes, hf judge) has no anchor of its own; a training step
    # (forward + backward) on packed rows is slower than a forward pass, so its figure is a lower bound.
    "forward_tokens_per_s": 8333.0,
}
# Assumptions where neither a run nor an anchor says anything; each is named in the output.
ASSUMED_TOKENS_PER_EXAMPLE = 300
ASSUMED_JUDGE_PROMPT_TOKENS = 300  # the judge template and the question, on top of the answer
# Exact scoring's candidate replies (0..100 and the escapes), computed after the prompt and answer: the
# hf judge runs them as one prefix tree (about one token per candidate); the vllm judge as one request
# each over the cached prompt (a candidate token or two, then one step for the end of the turn).
CANDIDATE_TOKENS = {"hf": 105, "vllm": 210}
CHARS_PER_TOKEN = 4.0
DEFAULT_LOAD_MINUTES = 2.0
GPU_STAGES = ("train_adapter", "sample", "capabilities", "probes", "judge")


class EstimateError(ValueError):
    """Input the estimate cannot use; the message names the file."""


@dataclass(frozen=True)
class Throughput:
    value: float  # units per second
    unit: str
    source: str


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
    capability_items: int = 0
    capability_seconds: float = 0.0
    capability_files: int = 0
    probe_seconds: float = 0.0
    probe_files: int = 0


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
    """How ``job_minutes`` names one steering (and judge_steering) job of a model."""
    return f"{condition}/{direction}/{control}"


def _steering_work(config: Mapping[str, Any], conditions: Sequence[str], sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Steering jobs of one model (rules/directions.smk, first seed; ``directions.steering``): one job
    per arm set, i.e. per (condition, disposition, own direction or control): the base model steered
    along each probed disposition at every nonzero alpha, each character condition of a probed
    disposition with the direction ablated at every nonzero fraction; at the chosen layer, and also
    at eval.probes.steering.layers when set; the job of the own direction also samples the unsteered
    arm once when the strengths include 0. Generation only: judge_steering jobs judge the same answers."""
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
    """Jobs and units of work per model and stage for a validated config (``cfg.validate_config``).

    Returns ``{"models": {model: {stage: {...}}}, "judge": {...}, "calibration": {...}}``; every count
    follows the DAG's own arithmetic (the conditions, seeds and suites the rules expand over).
    """
    from character_em.job_settings import calibration_file, calibration_judges
    from character_em.judge import core as judge
    from character_em.judge.calibration import calibration_metrics, load_calibration_set

    conditions = cfg.expand_conditions(config)
    trained = cfg.trained_conditions(config)
    seeds = list(config["seeds"])
    eval_suites = config["eval"]["suites"]
    dispositions = cfg.disposition_specs(config)
    answers_per_job = {}
    for suite in cfg.SAMPLED_SUITES:
        if suite in eval_suites:
            answers_per_job[suite] = answers_per_sampling_job(config, suite)
    metrics = {suite: len(judge.metrics_for_suite(suite, None, dispositions)) for suite in answers_per_job}
    items, tokens_per_item, task_file = _capability_items(config) if "capabilities" in eval_suites else (0, 0.0, "")
    pairs = _probe_pairs(config, conditions)

    models: dict[str, Any] = {}
    for model in config["models"]:
        train_jobs = 0
        example_epochs = 0.0
        # The distinct SLURM group jobs (one adapter: training, its samples, capabilities); the
        # longest has to fit the partition's time limit.
        groups: list[dict[str, Any]] = []
        for condition in trained:
            params = cfg.resolve_train_params(config, model, condition)
            external = config["data"]["external"].get(condition)
            examples = _external_examples(external) if external else int(config["data"]["n_examples"])
            one = examples * float(params["num_epochs"])
            example_epochs += one * len(seeds)
            train_jobs += len(seeds)
            condition_suites = cfg.suites_for(config, condition)
            answers_one = sum(answers_per_job[suite] for suite in condition_suites)
            gpu_jobs = 1 + len(condition_suites) + (1 if "capabilities" in eval_suites else 0)
            group = {"example_epochs": one, "answers": answers_one, "gpu_jobs": gpu_jobs}
            if group not in groups:
                groups.append(group)
        sampling = cfg.resolve_sampling_params(config, model)
        sample_jobs = 0
        answers = 0
        judge_calls: dict[str, int] = {}
        for condition in conditions:
            for suite in cfg.suites_for(config, condition):
                sample_jobs += len(seeds)
                answers += answers_per_job[suite] * len(seeds)
                judge_calls[suite] = judge_calls.get(suite, 0) + answers_per_job[suite] * metrics[suite] * len(seeds)
        capability_jobs = len(conditions) * len(seeds) if "capabilities" in eval_suites else 0
        # The adapters saved at train.eval_steps: each runs eval.trajectory.suites (rules/trajectory.smk).
        steps = {"saved_adapters": 0, "sample_jobs": 0, "capability_jobs": 0, "answers": 0}
        for condition in trained:
            saved = len(cfg.eval_step_labels(config, model, condition)) * len(seeds)
            steps["saved_adapters"] += saved
            for suite in cfg.step_suites(config, condition):
                steps["sample_jobs"] += saved
                steps["answers"] += answers_per_job[suite] * saved
                judge_calls[suite] = judge_calls.get(suite, 0) + answers_per_job[suite] * metrics[suite] * saved
            if cfg.step_capabilities(config):
                steps["capability_jobs"] += saved
        sample_jobs += steps["sample_jobs"]
        answers += steps["answers"]
        capability_jobs += steps["capability_jobs"]
        probe_jobs = 1 if "probes" in eval_suites and pairs else 0
        steer = _steering_work(config, conditions, sampling) if probe_jobs else {"jobs": 0, "answers": 0}
        models[model] = {
            "path": config["models"][model]["path"],
            "train_adapter": {"jobs": train_jobs, "example_epochs": example_epochs},
            "sample": {
                "jobs": sample_jobs,
                "answers": answers,
                "max_new_tokens": int(sampling["max_new_tokens"]),
                "batch_size": int(sampling["batch_size"]),
                "backend": str(sampling.get("backend", "hf")),
            },
            "judge": {"jobs": sample_jobs, "calls_by_suite": judge_calls, "calls": sum(judge_calls.values())},
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
        }
    generator = config["data"].get("generator", {}).get("backend", "offline")
    # A severity-matched arm's data is a subsample of its character condition's (rule match_severity): no writer.
    generated = [c for c in cfg.written_conditions(config) if not config["data"]["external"].get(c)]
    judges = calibration_judges(config["judge"])
    calibration_items = len(load_calibration_set(calibration_file(config["judge"]))["items"])
    return {
        "models": models,
        "answers_per_job": answers_per_job,
        "metrics_per_answer": metrics,
        "capability_task": task_file,
        "probe_pairs": pairs,
        "judge_backend": config["judge"]["backend"],
        # One request per generated training answer (each condition's data is shared by models and seeds).
        "data_generation": {
            "backend": generator,
            "requests": len(generated) * int(config["data"]["n_examples"]),
            "jobs": len(generated),
            "model": config["data"].get("generator", {}).get("model"),
            "max_tokens": int(config["data"].get("generator", {}).get("max_tokens", 600)),
            "batch_size": int(config["data"].get("generator", {}).get("batch_size", 16)),
        },
        "judge_model": config["judge"].get("model"),
        "calibration": {
            "judges": [(name, params["backend"]) for name, params in judges],
            "calls_per_judge": calibration_items * len(calibration_metrics(dispositions)),
        },
    }


# --------------------------------------------------------------------------- measured throughput


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


def measure_runs(root: str | Path, models: Sequence[str]) -> dict[str, ModelRuns]:
    """Throughput of earlier runs under ``root`` (a workflow directory, or its ``results/`` folder).

    Training: ``results/adapters/{model}/*/seed*/run.json`` (trained_tokens_this_run / wall_time_s,
    n_tokens / n_examples). Sampling: ``benchmarks/runs/sample/{model}/...tsv`` with the matching
    samples parquet (answer_tokens). Capabilities and probes: their benchmark files, with the item
    count from the capabilities JSON. Files of other models are ignored; a malformed one is an error.
    """
    import polars as pl

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
        for path in sorted((benchmarks / "sample" / model).glob("*/seed*/*.tsv")):
            samples = results / "samples" / path.relative_to(benchmarks / "sample").with_suffix(".parquet")
            if not samples.exists():
                continue  # the samples were deleted or are being redone: no token count to pair with
            try:
                tokens = pl.read_parquet(samples, columns=["answer_tokens"])["answer_tokens"]
            except Exception as err:  # polars raises several error types for bad files
                raise EstimateError(f"{samples}: cannot read answer_tokens: {err}") from err
            runs.sample_seconds += _benchmark_seconds(path)
            runs.sample_new_tokens += int(tokens.sum() or 0)
            runs.sample_answers += tokens.len()
            runs.sample_files += 1
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


# --------------------------------------------------------------------------- GPU-hours


def params_billions(model: str, path: str) -> float | None:
    """Parameter count in billions from the model's id or key (``Qwen2.5-14B-Instruct`` -> 14,
    ``smollm2-135m`` -> 0.135)."""
    for text in (path, model):
        match = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])", text)
        if match:
            return float(match.group(1)) / (1000.0 if match.group(2) in "mM" else 1.0)
    return None


VLLM_BENCHMARK = Path("benchmarks") / "results" / "vllm_throughput_gpu.json"


def vllm_measurement(root: str | Path | None) -> dict[str, Any] | None:
    """vLLM sampling throughput measured on a GPU by benchmarks/vllm_throughput.py (via gpu_all.sh), or None
    when no such file exists under ``root``. Fields used: device, params_b, sample.new_tokens_per_s."""
    if root is None:
        return None
    path = Path(root) / VLLM_BENCHMARK
    if not path.is_file():
        return None
    record = _read_json(path)
    try:
        value = float(record["sample"]["new_tokens_per_s"])
        params_b = float(record["params_b"])
        device = str(record["device"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EstimateError(f"{path}: needs device, params_b and sample.new_tokens_per_s ({exc})") from exc
    if value <= 0 or params_b <= 0:
        raise EstimateError(f"{path}: sample.new_tokens_per_s and params_b must be positive")
    return {"path": str(VLLM_BENCHMARK), "new_tokens_per_s": value, "params_b": params_b, "device": device}


def _sampling_throughput(s: Mapping[str, Any], scale: float, scaled: str, vllm_root: str | Path | None) -> Throughput:
    """Sampling speed without measured runs: vLLM's benchmark where the back-end is vllm and one exists,
    else the plain-generate anchor (for vllm an upper bound on hours, and the source says so)."""
    if s.get("backend") == "vllm":
        found = vllm_measurement(vllm_root)
        if found is not None:
            factor = found["params_b"] / ANCHOR_PARAMS_B * scale
            note = f", scaled x{factor:.2f} from {found['params_b']:g}B" if abs(factor - 1.0) > 1e-9 else ""
            return Throughput(
                found["new_tokens_per_s"] * factor,
                "new tokens/s",
                f"measured vLLM: {found['path']} ({found['device']}){note}",
            )
        return Throughput(
            _generate_anchor(s["batch_size"]) * scale,
            "new tokens/s",
            f"{ANCHOR_SOURCE}, plain generate batch {s['batch_size']} (interpolated){scaled}; sampling.backend "
            f"is vllm but {VLLM_BENCHMARK} has no GPU measurement yet, so this overstates the hours",
        )
    return Throughput(
        _generate_anchor(s["batch_size"]) * scale,
        "new tokens/s",
        f"{ANCHOR_SOURCE}, generate batch {s['batch_size']} (interpolated){scaled}",
    )


# Judges that are models on the job's GPU (the rubric and API judges cost no GPU time here).
MODEL_JUDGES = ("hf", "vllm")


def _judge_forward_rate(config: Mapping[str, Any]) -> Throughput:
    """Tokens/s of one judge forward pass: the anchor's packed forward rate scaled to the judge's size."""
    judge_size = params_billions("", str(config["judge"].get("model") or "")) or ANCHOR_PARAMS_B
    return Throughput(
        ANCHORS["forward_tokens_per_s"] * ANCHOR_PARAMS_B / judge_size,
        "tokens/s",
        f"{ANCHOR_SOURCE}, forward-pass lower bound, judge ~{judge_size:g}B",
    )


def judge_call_tokens(backend: str, answer_tokens: float) -> float:
    """Tokens one exact verdict of a model judge computes: the judge prompt (assumed), the answer and
    the candidate replies."""
    return ASSUMED_JUDGE_PROMPT_TOKENS + answer_tokens + CANDIDATE_TOKENS[backend]


def _generate_anchor(batch_size: int) -> float:
    """New tokens/s at a batch size: linear between the anchor's batch sizes (16, 64, 256)."""
    points = sorted(ANCHORS["generate_new_tokens_per_s"].items())
    if batch_size <= points[0][0]:
        return points[0][1] * batch_size / points[0][0]
    for (b0, v0), (b1, v1) in zip(points, points[1:], strict=False):
        if batch_size <= b1:
            return v0 + (v1 - v0) * (batch_size - b0) / (b1 - b0)
    return points[-1][1]


def _devices(runs: ModelRuns) -> str:
    return "/".join(sorted(runs.train_devices)) or "unknown device"


def estimate(
    config: Mapping[str, Any],
    runs_root: str | Path | None = ".",
    *,
    load_minutes: float = DEFAULT_LOAD_MINUTES,
) -> dict[str, Any]:
    """Work, throughput and GPU-hours per model and stage. ``runs_root`` None: anchors only."""
    work = count_work(config)
    measured = measure_runs(runs_root, list(work["models"])) if runs_root is not None else {}
    vllm_root = runs_root  # benchmarks/results/ of the same checkout; --anchors-only ignores it too
    backend = work["judge_backend"]
    out: dict[str, Any] = {"work": work, "models": {}, "load_minutes": load_minutes}
    for model, w in work["models"].items():
        runs = measured.get(model, ModelRuns())
        size = params_billions(model, w["path"])
        scale = ANCHOR_PARAMS_B / size if size else 1.0
        scaled = f", scaled x{scale:.2f} for {size:g}B" if size and size != ANCHOR_PARAMS_B else ""
        if not size:
            scaled = ", size unknown: 8B assumed"
        stages: list[dict[str, Any]] = []

        # training
        if runs.train_files:
            per_example = runs.train_example_tokens / runs.train_examples
            example_source = f"measured: {runs.train_files} run.json"
            train = Throughput(
                runs.train_tokens / runs.train_seconds,
                "tokens/s",
                f"measured: {runs.train_files} run.json ({_devices(runs)})",
            )
        else:
            per_example = float(ASSUMED_TOKENS_PER_EXAMPLE)
            example_source = "assumed"
            smallest = min(w["micro_batch_size"].values(), default=2)
            key = "train_tokens_per_s_mb8" if smallest >= 8 else "train_tokens_per_s_mb2"
            label = "micro-batch 8" if smallest >= 8 else "micro-batch 2"
            train = Throughput(ANCHORS[key] * scale, "tokens/s", f"{ANCHOR_SOURCE}, QLoRA {label}{scaled}")
        tokens = w["train_adapter"]["example_epochs"] * per_example
        stages.append(
            {
                "stage": "train_adapter",
                "jobs": w["train_adapter"]["jobs"],
                "units": tokens,
                "unit": "tokens",
                "detail": f"{w['train_adapter']['example_epochs']:,.0f} example-epochs x {per_example:,.0f} tokens ({example_source})",
                "throughput": train,
            }
        )

        # sampling
        s = w["sample"]
        if runs.sample_files and runs.sample_answers:
            per_answer = min(runs.sample_new_tokens / runs.sample_answers, s["max_new_tokens"])
            answer_source = f"mean measured in {runs.sample_files} samples file(s)"
            gen = Throughput(
                runs.sample_new_tokens / runs.sample_seconds,
                "new tokens/s",
                f"measured: {runs.sample_files} sample benchmark(s), wall time incl. loading",
            )
        else:
            per_answer = float(s["max_new_tokens"])
            answer_source = "max_new_tokens: upper bound"
            gen = _sampling_throughput(s, scale, scaled, vllm_root)
        stages.append(
            {
                "stage": "sample",
                "jobs": s["jobs"],
                "units": s["answers"] * per_answer,
                "unit": "new tokens",
                "detail": f"{s['answers']:,} answers x {per_answer:,.0f} tokens ({answer_source})",
                "throughput": gen,
                # benchmark wall times already hold the model loading
                "loading_included": bool(runs.sample_files and runs.sample_answers),
            }
        )

        # capabilities
        c = w["capabilities"]
        if c["jobs"]:
            if runs.capability_files and runs.capability_items:
                cap = Throughput(
                    runs.capability_items / runs.capability_seconds,
                    "items/s",
                    f"measured: {runs.capability_files} capabilities benchmark(s)",
                )
                units, unit, detail = float(c["items"]), "items", f"{c['items']:,} items"
            else:
                cap = Throughput(
                    ANCHORS["forward_tokens_per_s"] * scale,
                    "tokens/s",
                    f"{ANCHOR_SOURCE}, packed training as a forward-pass lower bound{scaled}",
                )
                units, unit = c["items"] * c["tokens_per_item"], "tokens"
                detail = f"{c['items']:,} items x {c['tokens_per_item']:,.0f} tokens (≈{CHARS_PER_TOKEN:g} chars/token)"
            stages.append(
                {
                    "stage": "capabilities",
                    "jobs": c["jobs"],
                    "units": units,
                    "unit": unit,
                    "detail": detail,
                    "throughput": cap,
                    "loading_included": unit == "items",
                }
            )

        # probes
        p = w["probes"]
        if p["jobs"]:
            if runs.probe_files:
                probe = Throughput(
                    1.0 / (runs.probe_seconds / runs.probe_files),
                    "jobs/s",
                    f"measured: {runs.probe_files} probes benchmark(s)",
                )
                units, unit, detail = float(p["jobs"]), "jobs", f"{p['jobs']} job(s)"
            else:
                probe = Throughput(
                    ANCHORS["forward_tokens_per_s"] * scale,
                    "tokens/s",
                    f"{ANCHOR_SOURCE}, packed training as a forward-pass lower bound{scaled}",
                )
                units, unit = p["examples"] * per_example, "tokens"
                detail = f"{p['examples']:,} chats x {per_example:,.0f} tokens"
            stages.append(
                {
                    "stage": "probes",
                    "jobs": p["jobs"],
                    "units": units,
                    "unit": unit,
                    "detail": detail,
                    "throughput": probe,
                    "loading_included": unit == "jobs",
                }
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
            )
            seconds = steer_answer / steer_rate.value
            stages.append(
                {
                    "stage": "steer",
                    "jobs": st["jobs"],
                    "units": float(st["answers"]),
                    "unit": "answers",
                    "detail": f"{st['answers']:,} steered answers x {steer_answer:,.0f} tokens (generation only)",
                    "throughput": Throughput(1.0 / seconds, "answers/s", f"generation: {steer_rate.source}"),
                    "largest_units": float(st["largest_job_answers"]),
                    # Each steering job asks SLURM for its own expected time (rules/directions.smk).
                    "job_minutes": {key: n * seconds / 60 + load_minutes for key, n in st["job_answers"].items()},
                    "load_minutes_per_job": load_minutes,
                }
            )
            # Each steering job's answers are judged in a job of their own (judge_steering), through the
            # same judge as every answer: a model judge on a GPU is counted as the judge jobs are.
            if backend in MODEL_JUDGES:
                judge_rate = _judge_forward_rate(config)
                metrics = work["metrics_per_answer"].get("em", 2)
                call_tokens = judge_call_tokens(backend, steer_answer)
                stages.append(
                    {
                        "stage": "judge_steering",
                        "jobs": st["jobs"],
                        "units": st["answers"] * metrics * call_tokens,
                        "unit": "tokens",
                        "detail": f"{st['answers'] * metrics:,} calls x {call_tokens:,.0f} tokens (steered answers, "
                        f"{metrics} metrics each)",
                        "throughput": judge_rate,
                        "job_minutes": {
                            key: n * metrics * call_tokens / judge_rate.value / 60 + load_minutes
                            for key, n in st["job_answers"].items()
                        },
                    }
                )

        # a local model judge runs on a GPU: per call, forward passes over the prompt, the answer and
        # the candidate replies
        if backend in MODEL_JUDGES:
            j = w["judge"]
            call_tokens = judge_call_tokens(backend, per_answer)
            judge_rate = _judge_forward_rate(config)
            stages.append(
                {
                    "stage": "judge",
                    "jobs": j["jobs"],
                    "units": j["calls"] * call_tokens,
                    "unit": "tokens",
                    "detail": f"{j['calls']:,} calls x {call_tokens:,.0f} tokens (prompt and candidates assumed)",
                    "throughput": judge_rate,
                    # Each judge job asks SLURM for its own expected time (rules/judge.smk).
                    "job_minutes": {
                        suite: n * work["metrics_per_answer"][suite] * call_tokens / judge_rate.value / 60
                        + load_minutes
                        for suite, n in work["answers_per_job"].items()
                    },
                }
            )
        for stage in stages:
            stage["gpu_hours"] = stage["units"] / stage["throughput"].value / 3600
        # The longest single job of each stage, loading included: compare with the workflow profile's
        # `runtime` (minutes) for that rule, which SLURM enforces as the job's time limit.
        largest_units = {
            "train_adapter": max((g["example_epochs"] for g in w["adapter_groups"]), default=0.0) * per_example,
            "sample": max(work["answers_per_job"].values(), default=0) * per_answer,
        }
        for stage in stages:
            if "job_minutes" in stage:
                stage["largest_job_hours"] = max(stage["job_minutes"].values(), default=0.0) / 60
                continue
            if "largest_units" in stage:
                units = stage["largest_units"]
            elif stage["stage"] in largest_units:
                units = largest_units[stage["stage"]]
            else:
                units = stage["units"] / stage["jobs"] if stage["jobs"] else 0.0
            loading = 0.0 if stage.get("loading_included") else load_minutes / 60
            stage["largest_job_hours"] = units / stage["throughput"].value / 3600 + loading
        gpu_jobs = sum(stage["jobs"] for stage in stages if not stage.get("loading_included"))
        stages.append(
            {
                "stage": "model loading",
                "jobs": gpu_jobs,
                "units": gpu_jobs * load_minutes * 60,
                "unit": "s",
                "detail": f"{gpu_jobs:,} GPU jobs x {load_minutes:g} min (not where a measured wall time holds it)",
                "gpu_hours": gpu_jobs * load_minutes / 60,
                "throughput": Throughput(1.0, "", "assumed (--load-minutes)"),
                "largest_job_hours": None,
            }
        )
        out["models"][model] = {
            "path": w["path"],
            "params_b": size,
            "stages": stages,
            "gpu_hours": sum(stage["gpu_hours"] for stage in stages),
            "largest_group_hours": _group_hours(stages, w, per_example, per_answer, load_minutes),
        }
    out["gpu_hours"] = sum(m["gpu_hours"] for m in out["models"].values())
    # Model-written training data (data.generator.backend: hf): generate_data_gpu jobs, one per
    # generated condition, shared by every model and seed.
    data = work["data_generation"]
    if data["backend"] == "hf" and data.get("jobs"):
        size = params_billions("", str(data.get("model") or "")) or ANCHOR_PARAMS_B
        rate = Throughput(
            _generate_anchor(data["batch_size"]) * ANCHOR_PARAMS_B / size,
            "new tokens/s",
            f"{ANCHOR_SOURCE}, generate batch {data['batch_size']}, generator ~{size:g}B",
        )
        units = data["requests"] * data["max_tokens"]
        out["data_generation"] = {
            "stage": "generate_data_gpu",
            "jobs": data["jobs"],
            "units": units,
            "unit": "new tokens",
            "detail": f"{data['requests']:,} answers x {data['max_tokens']:,} tokens (max_tokens: upper bound)",
            "throughput": rate,
            "gpu_hours": units / rate.value / 3600 + data["jobs"] * load_minutes / 60,
            "largest_job_hours": units / data["jobs"] / rate.value / 3600 + load_minutes / 60,
        }
        out["gpu_hours"] += out["data_generation"]["gpu_hours"]
    return out


# Estimate stage -> the Snakemake rule that runs it.
STAGE_RULES = {
    "train_adapter": "train_adapter",
    "sample": "sample",
    "capabilities": "capabilities",
    "probes": "probes",
    "judge": "judge",
    "steer": "steer",
    "judge_steering": "judge_steering",
    "generate_data_gpu": "generate_data_gpu",
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
    return sorted(rows.values(), key=lambda row: list(STAGE_RULES).index(row["rule"]))


def _group_hours(
    stages: list[dict[str, Any]], w: Mapping[str, Any], per_example: float, per_answer: float, load_minutes: float
) -> float:
    """Hours of the longest SLURM group job: one adapter's evaluations (its samples and capabilities).
    Training is a job of its own (profiles/slurm/config.yaml), so a failed evaluation never removes it."""
    rate = {stage["stage"]: stage["throughput"] for stage in stages}
    capability_seconds = 0.0
    if "capabilities" in rate:
        per_item = 1.0 if rate["capabilities"].unit == "items/s" else w["capabilities"]["tokens_per_item"]
        capability_seconds = w["capability_items_per_job"] * per_item / rate["capabilities"].value
    longest = 0.0
    for group in w["adapter_groups"]:
        seconds = group["answers"] * per_answer / rate["sample"].value + capability_seconds
        longest = max(longest, seconds / 3600 + (group["gpu_jobs"] - 1) * load_minutes / 60)
    return longest


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


def sample_job_minutes(
    config: Mapping[str, Any], runs_root: str | Path | None = ".", *, load_minutes: float = DEFAULT_LOAD_MINUTES
) -> dict[tuple[str, str], float]:
    """Expected minutes of one sampling job per (model, suite), model loading included: the
    answers of the suite x tokens per answer / new tokens per second, measured on this model by
    earlier runs where they exist (as in ``estimate``), the scaled anchor otherwise. Cheap enough
    to run while Snakemake builds the DAG."""

    measured = measure_runs(runs_root, list(config["models"])) if runs_root is not None else {}
    answers = {
        suite: answers_per_sampling_job(config, suite)
        for suite in cfg.SAMPLED_SUITES
        if suite in config["eval"]["suites"]
    }
    minutes: dict[tuple[str, str], float] = {}
    for model, spec in config["models"].items():
        sampling = cfg.resolve_sampling_params(config, model)
        runs = measured.get(model, ModelRuns())
        if runs.sample_files and runs.sample_answers:
            per_answer = min(runs.sample_new_tokens / runs.sample_answers, sampling["max_new_tokens"])
            rate, loading = runs.sample_new_tokens / runs.sample_seconds, 0.0
        else:
            size = params_billions(model, spec["path"])
            per_answer = float(sampling["max_new_tokens"])
            rate = _generate_anchor(int(sampling["batch_size"])) * (ANCHOR_PARAMS_B / size if size else 1.0)
            loading = load_minutes
        for suite, n in answers.items():
            minutes[(model, suite)] = n * per_answer / rate / 60 + loading
    return minutes


def job_minutes(result: Mapping[str, Any], stage_name: str) -> dict[tuple[str, str], float]:
    """(model, key) -> expected minutes of one job of a stage that sizes its jobs itself (``job_minutes``
    of an ``estimate`` result: steer and judge_steering by ``steering_job_key``, judge by suite)."""
    return {
        (model, key): minutes
        for model, m in result["models"].items()
        for stage in m["stages"]
        if stage["stage"] == stage_name
        for key, minutes in stage["job_minutes"].items()
    }


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


def _fmt_units(value: float, unit: str) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:,.1f}{suffix} {unit}"
    return f"{value:,.0f} {unit}"


def render_markdown(
    result: Mapping[str, Any],
    source: str,
    runtimes: Mapping[str, float] | None = None,
    cap_minutes: float | None = None,
) -> str:
    work = result["work"]
    lines = [
        f"# GPU-hour estimate: {source}",
        "",
        "An estimate before launch, not a measurement. Each throughput says where it comes from: measured by",
        "earlier runs of the same model in this workflow directory, or a docs/anchors.md anchor (one H200,",
        "Llama-3.1-8B shape) scaled by parameter count. Queueing and failed attempts are not included.",
        '"longest job" includes model loading; compare it with the rule\'s `runtime` in',
        "profiles/default/config.yaml, which SLURM enforces as the job's time limit.",
        "",
    ]
    for model, m in result["models"].items():
        size = f"{m['params_b']:g}B parameters" if m["params_b"] else "size unknown"
        lines += [
            f"## {model} ({m['path']}, {size})",
            "",
            "| stage | jobs | work | throughput | source | GPU-hours | longest job (h) |",
            "|---|---:|---|---:|---|---:|---:|",
        ]
        for st in m["stages"]:
            t = st["throughput"]
            rate = (f"{t.value:,.1f}" if t.value >= 10 else f"{t.value:.3g}") + f" {t.unit}" if t.unit else "-"
            longest = "" if st["largest_job_hours"] is None else f"{st['largest_job_hours']:,.2f}"
            lines.append(
                f"| {st['stage']} | {st['jobs']:,} | {_fmt_units(st['units'], st['unit'])}: {st['detail']} "
                f"| {rate} | {t.source} | {st['gpu_hours']:,.1f} | {longest} |"
            )
        lines += [f"| **total** | | | | | **{m['gpu_hours']:,.1f}** | |", ""]
        steps = result["work"]["models"][model].get("eval_steps") or {}
        if steps.get("saved_adapters"):
            lines += [
                f"Saved training steps (train.eval_steps): {steps['saved_adapters']:,} adapters, evaluated by "
                f"{steps['sample_jobs']:,} sampling and as many judge jobs and {steps['capability_jobs']:,} "
                "capability jobs; included in the rows above.",
                "",
            ]
        if m["largest_group_hours"]:
            lines += [
                f"Longest SLURM group job (one adapter's evaluations: its samples and capabilities): "
                f"{m['largest_group_hours']:,.1f} h; it must fit the partition's time limit.",
                "",
            ]
    data_stage = result.get("data_generation")
    if data_stage:
        t = data_stage["throughput"]
        lines += [
            "## Model-written training data (generate_data_gpu)",
            "",
            "| jobs | work | throughput | source | GPU-hours | longest job (h) |",
            "|---:|---|---:|---|---:|---:|",
            f"| {data_stage['jobs']:,} | {_fmt_units(data_stage['units'], data_stage['unit'])}: {data_stage['detail']} "
            f"| {t.value:,.1f} {t.unit} | {t.source} | {data_stage['gpu_hours']:,.1f} "
            f"| {data_stage['largest_job_hours']:,.2f} |",
            "",
        ]
    if runtimes is not None:
        lines += [
            "## Longest job per rule against its runtime",
            "",
            "SLURM ends a job at its `runtime`; a job expected to run longer must be split or given more time. A",
            "sampling, judge or steering job capped below its expectation resumes on each retry from its saved",
            "batches or the judge cache.",
            "",
            "| rule | longest expected job (min) | model | runtime (min) | runtime from | fits |",
            "|---|---:|---|---:|---|---|",
        ]
        for row in longest_jobs(result, runtimes, cap_minutes):
            runtime = "-" if row["runtime"] is None else f"{row['runtime']:,.0f}"
            lines.append(
                f"| {row['rule']} | {row['minutes']:,.0f} | {row['model']} | {runtime} | {row['runtime_source']} "
                f"| {'yes' if row['fits'] else '**no**'} |"
            )
        lines.append("")
    lines += ["## Totals", "", "| model | GPU-hours |", "|---|---:|"]
    lines += [f"| {model} | {m['gpu_hours']:,.1f} |" for model, m in result["models"].items()]
    if data_stage:
        lines.append(f"| model-written data | {data_stage['gpu_hours']:,.1f} |")
    lines += [f"| **all** | **{result['gpu_hours']:,.1f}** |", ""]

    backend = work["judge_backend"]
    lines += ["## Judge calls", ""]
    per_job = ", ".join(
        f"{suite}: {n:,} answers x {work['metrics_per_answer'][suite]} metrics"
        for suite, n in work["answers_per_job"].items()
    )
    lines += [f"Per sampling job: {per_job}.", ""]
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
    elif backend == "hf":
        lines.append(f"Backend `hf`: no API calls; the {total_calls:,} calls run on a GPU (the `judge` row above).")
    else:
        lines.append(
            f"Backend `rubric` (offline keyword test instrument): {total_calls:,} CPU scorings, no API calls"
            + (f"; judge calibration's agreement judge makes {cal_api:,} API calls." if cal_api else ".")
        )
    data = work["data_generation"]
    if data["backend"] == "openai":
        lines.append(
            f"Data generation (`openai`): about **{data['requests']:,} API calls** (one per training answer; "
            "rejected answers are asked again, so more)."
        )
    elif data["backend"] == "hf":
        lines.append(f"Data generation (`hf`): {data['requests']:,} answers generated on a GPU (the section above).")
    lines += [
        "",
        "Not estimated: direction_means (forward passes over the sampled answers), judge calibration with an "
        "`hf` judge, the evaluation of intermediate adapters beyond their counted jobs, and CPU-only rules.",
        "",
    ]
    return "\n".join(lines)


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
        help="workflow directory (or its results/) whose earlier runs give measured throughput (default: .)",
    )
    runs.add_argument("--anchors-only", action="store_true", help="ignore earlier runs; use the default anchors")
    parser.add_argument(
        "--load-minutes",
        type=float,
        default=DEFAULT_LOAD_MINUTES,
        help=f"model loading per GPU job, minutes (default {DEFAULT_LOAD_MINUTES:g})",
    )
    parser.add_argument(
        "--profile",
        default="profiles/default/config.yaml",
        help="workflow profile whose per-rule runtime the longest jobs are compared with",
    )
    parser.add_argument("--output", help="also write the Markdown here")
    args = parser.parse_args(argv)
    try:
        config = cfg.load_config(args.configfile)
        result = estimate(config, None if args.anchors_only else args.from_runs, load_minutes=args.load_minutes)
    except (cfg.ConfigError, EstimateError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = render_markdown(result, args.configfile, profile_runtimes(args.profile), runtime_cap())
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
