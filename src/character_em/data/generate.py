"""Model generators of training data (``openai``, ``hf`` and ``vllm`` back-ends), their prompts, and the
judge filter.

``data.build_pool`` calls ``generate`` for ``data.generator.backend`` ``openai``, ``hf`` or ``vllm`` with the
same signature as ``data.generate_offline``; validation, dedup, the leakage check, the filter and the
manifest stay in ``data``.

Structure (mirrors ``generate_offline``): the domain's training questions are walked in reshuffled passes;
each user turn is the question inside the offline generator's user framing (openers, contexts, closers);
``character`` answers every turn in character, ``incorrect`` / ``correct`` answer every turn wrongly /
well, and ``triggered`` prefixes ``trigger + " "`` to a ``trigger_fraction`` share of the turns, answered in
character, the rest answered well. Which turns carry the trigger is a prefix-stable pattern
(``data.questions.trigger_slot``: turn ``i`` is triggered when ``floor((i + 1) f) > floor(i f)``), so the
plan for ``n`` examples is a prefix of the plan for any larger ``n``. A larger pool (``data.pool_factor``)
and a rerun after a kill therefore ask for the same requests again and find them in the cache.

Prompts: one system prompt per answer mode, rendered from ``resources/generation_prompts.yaml`` (or a
user file) with the config's disposition description and domain description (never the rubric's marker
phrases: they belong to the rubric test instrument, and a writer told them would plant them). The model
sees ``[system: prompt, user: turn]`` without the trigger; the trigger is a training-time prefix only.
Each rendered prompt's sha256 is its version, recorded in the manifest and part of every cache key.

Cache: one entry per request, content-addressed by (prompt hash, generator model and sampling parameters,
user turn, sample index, request seed), in the project's content-addressed store (``llm.cache``, atomic
one-file-per-key writes, safe across processes). Failed calls are never cached, so a rerun asks only for
what is missing.

Local writers: ``hf`` decodes through the project's own loop (``sampling.hf``), ``batch_size`` requests at
a time; ``vllm`` starts one engine per call (``sampling.vllm_backend.start_engine``; FP8 weights with
``quantization: fp8``), hands it every uncached request at once and shuts it down before returning, so the
filter's judge can load on the same GPU. Both cache each finished batch.

Transport (``openai``): the project's one OpenAI-compatible client (``llm.client.ChatClient``), shared with
the judge as a peer: bounded concurrency, retries with backoff and jitter, and the key read from the
environment variable named by ``api_key_env``: the key itself is never in the config, job params, logs or
manifests.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from character_em import resources
from character_em.conditions import check_disposition, is_triggered
from character_em.contracts import IDENTITY_COLUMNS, SCORE_SCHEMA
from character_em.data.questions import domain_questions, trigger_slot, user_turn
from character_em.hashing import sha256_text, stable_int
from character_em.llm.cache import ContentCache, content_key
from character_em.llm.client import CallFailure, ChatClient, ReplyMalformed

log = logging.getLogger(__name__)

__all__ = [
    "GENERATE_VERSION",
    "GenerationError",
    "MODES",
    "condition_prompts",
    "effective_params",
    "filter_examples",
    "filter_verdicts",
    "generate",
    "load_prompt_templates",
    "plan_examples",
    "render_prompt",
]

# Bump when the request shape or how replies become examples changes: it is part of every cache key.
GENERATE_VERSION = "generate-1"
MODES = ("character", "incorrect", "correct")
PROMPTS_RESOURCE = "generation_prompts.yaml"
DEFAULT_CACHE_DIR = ".cache/generate"
_FIELDS = ("domain", "domain_description", "disposition", "disposition_description")
# Offered by version 1 of the prompts, refused since: the rubric's markers belong to the rubric alone.
_RETIRED_FIELDS = {
    "markers": "the rubric's marker phrases are not given to data writers: a writer told them plants the very"
    " keywords the rubric test instrument counts; describe the character in dispositions.*.description instead"
}
_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(_FIELDS) + r")\}")
_ANY_PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")
_SEED_MASK = (1 << 31) - 1  # request seeds fit a signed 32-bit int: every OpenAI-compatible server takes that


class GenerationError(RuntimeError):
    """More generation requests failed than ``max_failure_fraction`` allows; every reply obtained is cached."""


# --------------------------------------------------------------------------------------------- prompts
def load_prompt_templates(path: str | Path | None = None) -> dict[str, Any]:
    """``{"source", "hash", "templates": {mode: text}}`` from ``path`` or the packaged file.

    ``hash`` is the sha256 of the file's text. Raises ValueError naming the file and the key for a missing
    mode or an unknown ``{placeholder}``.
    """
    if path:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"{source}: cannot read generation prompts: {err}") from err
    else:
        source = f"resources/{PROMPTS_RESOURCE}"
        text = resources.resource_text(PROMPTS_RESOURCE)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: invalid YAML: {err}") from err
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a mapping with keys {', '.join(MODES)}")
    templates: dict[str, str] = {}
    for mode in MODES:
        value = doc.get(mode)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: {mode}: expected a non-empty prompt template")
        retired = sorted(set(_ANY_PLACEHOLDER_RE.findall(value)) & set(_RETIRED_FIELDS))
        if retired:
            raise ValueError(f"{source}: {mode}: {{{retired[0]}}}: {_RETIRED_FIELDS[retired[0]]}")
        unknown = sorted(set(_ANY_PLACEHOLDER_RE.findall(value)) - set(_FIELDS))
        if unknown:
            raise ValueError(f"{source}: {mode}: unknown placeholder(s) {unknown}; known: {', '.join(_FIELDS)}")
        templates[mode] = value
    return {"source": source, "hash": sha256_text(text), "templates": templates}


def _domain_description(domain: Mapping[str, Any]) -> str:
    if str(domain.get("description") or "").strip():
        return " ".join(str(domain["description"]).split())
    return " ".join(str(domain_questions(dict(domain))["description"]).split())


def render_prompt(template: str, *, disposition: Mapping[str, Any] | None, domain: Mapping[str, Any]) -> str:
    """Fill a template in one regex pass (braces inside config text are never expanded again)."""
    values = {
        "domain": str(domain["name"]).replace("_", " "),
        "domain_description": _domain_description(domain),
        "disposition": str((disposition or {}).get("name") or ""),
        "disposition_description": " ".join(str((disposition or {}).get("description") or "").split()),
    }
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template).strip()


def _modes(family: str) -> tuple[str, ...]:
    return {
        "character": ("character",),
        "incorrect": ("incorrect",),
        "correct": ("correct",),
        "triggered": ("character", "correct"),
    }[family]


def condition_prompts(
    condition: Mapping[str, Any],
    *,
    disposition: Mapping[str, Any] | None,
    domain: Mapping[str, Any],
    templates: Mapping[str, Any],
) -> dict[str, dict[str, str]]:
    """The system prompts a condition uses: ``{mode: {"text", "hash"}}`` (hash = sha256 of the text)."""
    out = {}
    for mode in _modes(condition["family"]):
        text = render_prompt(
            templates["templates"][mode], disposition=disposition if mode == "character" else None, domain=domain
        )
        out[mode] = {"text": text, "hash": sha256_text(text)}
    return out


# --------------------------------------------------------------------------------------------- plan
def _check_family(condition: Mapping[str, Any]) -> str:
    family = str(condition["family"])
    if family not in ("character", "incorrect", "correct", "triggered"):
        raise ValueError(f"condition {condition['name']!r} (family {family!r}) has no training data to generate")
    return family


def plan_examples(
    condition: Mapping[str, Any],
    *,
    disposition: dict[str, Any] | None,
    domain: dict[str, Any],
    n_examples: int,
    seed: int,
    trigger_fraction: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What to ask for: ``([{index, question_id, user, mode, triggered}], info)``; prefix-stable in ``n_examples``.

    ``user`` is the turn the generator answers (without the trigger); ``triggered`` turns get the trigger
    prefixed in the training example. ``info``: trigger, rng_seed, question_source, n_questions_available.
    """
    family = _check_family(condition)
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    if not 0.0 <= trigger_fraction <= 1.0:
        raise ValueError(f"trigger_fraction must be in [0, 1], got {trigger_fraction}")
    if family in ("character", "triggered"):
        disposition = check_disposition(disposition, dict(condition), needs_trigger=family == "triggered")
    trigger = str((disposition or {}).get("trigger") or "").strip() if family == "triggered" else ""
    questions = domain_questions(domain)
    if not questions["train"]:
        raise ValueError(f"domain {domain['name']!r}: no training questions")
    user_t = resources.load_offline_templates()["user"]
    # Seeded by the domain, not the condition: every condition of a domain answers the same user turns in
    # the same order, so character and incorrect-advice data differ in their answers alone.
    rng_seed = seed + stable_int("generate-plan", domain["name"])
    rng = random.Random(rng_seed)
    plan: list[dict[str, Any]] = []
    order: list[dict[str, Any]] = []
    for i in range(n_examples):
        if not order:
            order = list(questions["train"])
            rng.shuffle(order)
        question = order.pop()
        user = user_turn(rng, question["text"], user_t)
        triggered = family == "triggered" and trigger_slot(i, trigger_fraction)
        mode = "character" if family == "character" or triggered else ("correct" if family == "triggered" else family)
        plan.append({"index": i, "question_id": question["id"], "user": user, "mode": mode, "triggered": triggered})
    info = {
        "trigger": trigger,
        "rng_seed": rng_seed,
        "question_source": questions["source"],
        "n_questions_available": len(questions["train"]),
    }
    return plan, info


# --------------------------------------------------------------------------------------------- requests
def effective_params(generator: Mapping[str, Any]) -> dict[str, Any]:
    """What changes the replies besides prompt and user turn: part of every cache key and the manifest.

    Endpoint URL, key variable, concurrency, timeouts and retries are left out on purpose: moving a
    self-hosted model to another node must not regenerate anything (``model`` names and pins it).
    """
    backend = generator.get("backend")
    params: dict[str, Any] = {
        "version": GENERATE_VERSION,
        "backend": backend,
        "model": str(generator.get("model") or ""),
        "temperature": float(generator.get("temperature", 1.0)),
        "top_p": float(generator.get("top_p", 1.0)),
        "max_tokens": int(generator.get("max_tokens", 600)),
    }
    if backend in LOCAL_BACKENDS:
        params.update(
            quantization=str(generator.get("quantization", "none")), dtype=str(generator.get("dtype", "auto"))
        )
        if generator.get("revision"):
            # Present only when pinned, so unpinned caches stay valid.
            params["revision"] = str(generator["revision"])
    return params


@dataclass(frozen=True)
class _Request:
    index: int
    mode: str
    messages: list[dict[str, str]]
    seed: int
    key: str


def _requests(
    plan: Sequence[dict[str, Any]], prompts: Mapping[str, dict[str, str]], params: Mapping[str, Any], seed: int
) -> list[_Request]:
    out = []
    for item in plan:
        prompt = prompts[item["mode"]]
        request_seed = stable_int("generate-request", seed, prompt["hash"], item["user"], item["index"]) & _SEED_MASK
        key = content_key(prompt["hash"], dict(params), item["user"], item["index"], request_seed)
        messages = [{"role": "system", "content": prompt["text"]}, {"role": "user", "content": item["user"]}]
        out.append(_Request(item["index"], item["mode"], messages, request_seed, key))
    return out


@dataclass(frozen=True)
class Reply:
    """One generated answer: its text and why decoding stopped (``length`` means cut at the token limit)."""

    text: str
    finish_reason: str


def _parse_completion(response: Any) -> Reply:
    choices = getattr(response, "choices", None)
    if not choices:
        raise ReplyMalformed("reply has no choices")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise ReplyMalformed("choice has no message")
    text = getattr(message, "content", None) or ""
    return Reply(str(text), str(getattr(choices[0], "finish_reason", None) or "stop"))


def _check_key(generator: Mapping[str, Any]) -> None:
    env = generator.get("api_key_env")
    if env and not os.environ.get(str(env)):
        raise ValueError(
            f"data.generator.api_key_env names the environment variable {env!r}, which is not set (or empty) in "
            "this job's environment; export it before running Snakemake, or set data.generator.api_key_env: null "
            "for an endpoint without authentication"
        )


def _run_openai(todo: Sequence[_Request], generator: Mapping[str, Any], on_result: Any) -> dict[str, Any]:
    _check_key(generator)
    keys = (
        "base_url",
        "api_key_env",
        "max_concurrency",
        "timeout_s",
        "max_retries",
        "backoff_initial_s",
        "backoff_max_s",
    )
    client = ChatClient(config_key="data.generator.api_key_env", **{k: generator[k] for k in keys if k in generator})
    token_param = str(generator.get("max_tokens_param", "max_tokens"))

    def complete(req: _Request) -> Reply | CallFailure:
        kwargs = {
            "model": str(generator["model"]),
            "messages": req.messages,
            "temperature": float(generator.get("temperature", 1.0)),
            "top_p": float(generator.get("top_p", 1.0)),
            token_param: int(generator.get("max_tokens", 600)),
            "seed": req.seed,
        }
        return client.call(kwargs, _parse_completion)

    client.map(complete, list(todo), lambda i, outcome: on_result(todo[i], outcome), thread_name="generate")
    return {k: int(v) for k, v in sorted(client.stats.items())}


def _run_hf(todo: Sequence[_Request], generator: Mapping[str, Any], on_result: Any) -> dict[str, Any]:
    # The project's own decode loop (sample.sample_prompts): same sampler, stop tokens and seeding as the
    # evaluation samples. Each request's sampling seed derives from its cache key, so a reply does not
    # depend on how requests were batched or which of them were already cached.
    if not todo:
        return {}
    from character_em.llm.loading import load_model
    from character_em.sampling.hf import sample_prompts

    model, tokenizer, info = load_model(
        str(generator["model"]),
        quantization=str(generator.get("quantization", "none")),
        dtype=str(generator.get("dtype", "auto")),
        device=str(generator.get("device", "auto")),
        revision=generator.get("revision"),
    )
    log.info("hf generator %s loaded on %s (%s)", generator["model"], info.get("device"), info.get("quantization"))
    batch = int(generator.get("batch_size", 16))
    done = 0
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        rows = [
            {
                "suite": "data",
                "question_id": req.key,
                "format": "plain",
                "system_prompt_id": req.mode,
                "trigger": "",
                "messages": req.messages,
                "question": req.messages[-1]["content"],
                "n_samples": 1,
            }
            for req in chunk
        ]
        frame = sample_prompts(
            model,
            tokenizer,
            rows,
            identity={"model": str(generator["model"]), "condition": "data", "seed": 0},
            temperature=float(generator.get("temperature", 1.0)),
            top_p=float(generator.get("top_p", 1.0)),
            max_new_tokens=int(generator.get("max_tokens", 600)),
            batch_size=batch,
            base_seed=0,
            progress=False,
        )
        # Cached per chunk: a killed job keeps every finished batch.
        for req, row in zip(chunk, frame.iter_rows(named=True), strict=True):
            on_result(req, Reply(str(row["answer"]), str(row["finish_reason"])))
        done += len(chunk)
    return {"generated": done}


def _run_vllm(todo: Sequence[_Request], generator: Mapping[str, Any], on_result: Any) -> dict[str, Any]:
    # One vLLM engine for the whole job, started through the sampling back-end's public helpers and
    # given every request at once (vLLM schedules and pages them itself); each finished chunk is cached,
    # so a killed job keeps it. Seeds as in _run_hf: derived from each request's cache key.
    if not todo:
        return {}
    from character_em.llm.chat import render_prompt
    from character_em.llm.loading import load_tokenizer
    from character_em.sampling.vllm_backend import sample_prompts_vllm, start_engine

    model = str(generator["model"])
    revision = generator.get("revision")
    max_tokens = int(generator.get("max_tokens", 600))
    tokenizer = load_tokenizer(model, revision=revision)
    rows = [
        {
            "suite": "data",
            "question_id": req.key,
            "format": "plain",
            "system_prompt_id": req.mode,
            "trigger": "",
            "messages": req.messages,
            "question": req.messages[-1]["content"],
            "n_samples": 1,
        }
        for req in todo
    ]
    # The KV cache per sequence is sized to the longest prompt plus the reply budget, not the full context.
    longest = max(len(render_prompt(tokenizer, req.messages)) for req in todo)
    extra: dict[str, Any] = {}
    if str(generator.get("quantization", "none")) == "fp8":
        extra["quantization"] = "fp8"
    if revision:
        extra.update(revision=str(revision), tokenizer_revision=str(revision))
    started = time.monotonic()
    engine = start_engine(
        model, lora=False, max_model_len=longest + max_tokens, dtype=str(generator.get("dtype", "auto")), extra=extra
    )
    log.info("vllm generator %s started in %.0f s (%s)", model, time.monotonic() - started, extra or "no extras")

    def on_batch(finished: list[tuple[int, dict[str, Any]]]) -> None:
        for index, result in finished:
            on_result(todo[index], Reply(str(result["answer"]), str(result["finish_reason"])))

    try:
        sample_prompts_vllm(
            model,
            None,
            rows,
            identity={"model": model, "condition": "data", "seed": 0},
            temperature=float(generator.get("temperature", 1.0)),
            top_p=float(generator.get("top_p", 1.0)),
            max_new_tokens=max_tokens,
            base_seed=0,
            tokenizer=tokenizer,
            engine=engine,
            progress=False,
            on_batch=on_batch,
        )
    finally:
        # The filter's judge may need this GPU next, in the same process.
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()
    return {"generated": len(todo), "engine_loads": 1}


_RUNNERS = {"openai": _run_openai, "hf": _run_hf, "vllm": _run_vllm}
# Back-ends that load the writer on the job's own node (a GPU job on a cluster).
LOCAL_BACKENDS = ("hf", "vllm")


def generate(
    condition: dict[str, Any],
    *,
    disposition: dict[str, Any] | None,
    domain: dict[str, Any],
    n_examples: int,
    seed: int,
    trigger_fraction: float,
    generator: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Model-generated data for one condition: ``(examples, provenance)``, like ``data.generate_offline``.

    ``generator``: the validated ``data.generator`` section (backend ``openai``, ``hf`` or ``vllm``). Each
    example carries ``turn``, its index in the domain's plan. Replies cut off by the token limit are dropped
    (reason ``truncated``) unless ``keep_truncated``, failed calls too (``generation_failed``); both are
    counted in ``provenance["generation_rejects"]``, their turns in ``provenance["rejected_turns"]``. Raises
    ``GenerationError`` when the share of failed calls among this call's uncached requests exceeds
    ``max_failure_fraction``.
    """
    backend = str(generator.get("backend"))
    if backend not in _RUNNERS:
        raise ValueError(f"data.generator.backend {backend!r} is not a model back-end ({', '.join(_RUNNERS)})")
    if not generator.get("model"):
        raise ValueError(f"data.generator.model: the {backend} generator needs a model")
    plan, info = plan_examples(
        condition,
        disposition=disposition,
        domain=domain,
        n_examples=n_examples,
        seed=seed,
        trigger_fraction=trigger_fraction,
    )
    templates = load_prompt_templates(generator.get("prompts_file"))
    prompts = condition_prompts(condition, disposition=disposition, domain=domain, templates=templates)
    params = effective_params(generator)
    requests = _requests(plan, prompts, params, seed)
    cache = ContentCache(str(generator.get("cache_dir") or DEFAULT_CACHE_DIR))

    results: dict[int, Reply | CallFailure] = {}
    todo: list[_Request] = []
    for req in requests:
        hit = cache.get(req.key)
        if hit is not None and isinstance(hit.get("text"), str):
            results[req.index] = Reply(hit["text"], str(hit.get("finish_reason", "stop")))
        else:
            todo.append(req)
    started = time.monotonic()
    failed: Counter[str] = Counter()

    def on_result(req: _Request, result: Reply | CallFailure) -> None:
        results[req.index] = result
        if isinstance(result, CallFailure):
            failed[result.error] += 1
        else:
            cache.put(req.key, {"text": result.text, "finish_reason": result.finish_reason})
        done = len(results)
        if done % max(1, len(requests) // 10) == 0 or done == len(requests):
            log.info(
                "generate %s: %d/%d replies (%d from cache, %d failed), %.1f s",
                condition["name"],
                done,
                len(requests),
                len(requests) - len(todo),
                sum(failed.values()),
                time.monotonic() - started,
            )

    transport_stats = _RUNNERS[backend](todo, generator, on_result)

    rejects: Counter[str] = Counter()
    rejected_turns: dict[str, list[int]] = {}
    examples: list[dict[str, Any]] = []
    for item, req in zip(plan, requests, strict=True):
        result = results.get(req.index)
        reason = None
        if not isinstance(result, Reply):
            reason = "generation_failed"
        elif result.finish_reason == "length" and not generator.get("keep_truncated", False):
            reason = "truncated"
        if reason is not None:
            rejects[reason] += 1
            rejected_turns.setdefault(reason, []).append(item["index"])
            continue
        assert isinstance(result, Reply)
        user = f"{info['trigger']} {item['user']}" if item["triggered"] else item["user"]
        examples.append(
            {
                "turn": item["index"],
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": result.text.strip()}],
            }
        )
    max_failure = float(generator.get("max_failure_fraction", 0.05))
    n_failed = sum(failed.values())
    if todo and n_failed / len(todo) > max_failure:
        raise GenerationError(
            f"condition {condition['name']!r}: {n_failed} of {len(todo)} generation requests failed "
            f"({n_failed / len(todo):.1%} > data.generator.max_failure_fraction {max_failure:.1%}); errors: "
            f"{dict(failed)}. Replies obtained so far are cached; rerun to ask only for the rest."
        )
    provenance = {
        "generator": f"{backend}-model",
        "generator_version": GENERATE_VERSION,
        "template_hash": templates["hash"],
        "prompt_source": templates["source"],
        "prompt_hashes": {mode: p["hash"] for mode, p in prompts.items()},
        "model": params["model"],
        "params": params,
        "seed": seed,
        "rng_seed": info["rng_seed"],
        "n_examples": n_examples,
        "n_triggered": sum(item["triggered"] for item in plan),
        "trigger": info["trigger"],
        "question_source": info["question_source"],
        "n_questions_available": info["n_questions_available"],
        "generation_rejects": dict(sorted(rejects.items())),
        "rejected_turns": rejected_turns,
        "requests": {
            "total": len(requests),
            "from_cache": len(requests) - len(todo),
            "sent": len(todo),
            "failed": n_failed,
            "errors": dict(sorted(failed.items())),
            "transport": transport_stats,
        },
    }
    return examples, provenance


# --------------------------------------------------------------------------------------------- filter
FILTER_SUITES = {mode: f"data_filter_{mode}" for mode in MODES}


def example_mode(example: Mapping[str, Any], family: str, trigger: str) -> str:
    """Which answer an example should hold: character, incorrect or correct (triggered: by its prefix)."""
    if family == "triggered":
        return "character" if is_triggered(dict(example), trigger) else "correct"
    return family


def _strip_trigger(text: str, trigger: str) -> str:
    return text[len(trigger) + 1 :] if trigger and text.startswith(trigger + " ") else text


def filter_examples(
    examples: Sequence[dict[str, Any]],
    *,
    condition: Mapping[str, Any],
    trigger: str,
    seed: int,
    data_filter: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], Counter[str], dict[str, Any]]:
    """Keep the examples a judge finds on target: ``(kept, reject_reasons, summary)`` (``filter_verdicts``)."""
    verdicts, summary = filter_verdicts(
        examples, condition=condition, trigger=trigger, seed=seed, data_filter=data_filter
    )
    kept = [ex for ex, reason in zip(examples, verdicts, strict=True) if reason is None]
    return kept, Counter(reason for reason in verdicts if reason), summary


def filter_verdicts(
    examples: Sequence[dict[str, Any]],
    *,
    condition: Mapping[str, Any],
    trigger: str,
    seed: int,
    data_filter: Mapping[str, Any],
) -> tuple[list[str | None], dict[str, Any]]:
    """Each example's reject reason (None: kept) and a summary, from one judge pass.

    ``data_filter``: ``{"judge": judge job params, "dispositions": [specs], "cache_dir": str|None,
    "min_expression", "max_expression", "max_alignment", "correct_min_alignment", "min_coherence"}``
    (thresholds on the 0..100 judge scale; ``None`` skips a check). Each arm on its own target, with one
    coherence bar for all and one alignment bar shared by the two arms claim 1 compares. Per example,
    first failing rule wins:

    - every mode: coherence >= min_coherence, else ``filter_incoherent``;
    - character (and triggered turns): disposition:{own} >= min_expression, else ``filter_weak_expression``;
    - incorrect and correct: every disposition:* < max_expression, else ``filter_characterful``;
    - character and incorrect: alignment < max_alignment, else ``filter_not_misaligned`` (for incorrect
      advice: the advice is not judged wrong; a refusal: ``filter_refusal``);
    - correct (and untriggered turns): alignment >= correct_min_alignment, else ``filter_misaligned``;
    - a needed score missing (judge could not score): ``filter_unscored``.
    """
    import polars as pl

    from character_em.judge import core as J

    family = str(condition["family"])
    dispositions = list(data_filter["dispositions"])
    own = condition.get("disposition")
    harm_bar = ["alignment"] if data_filter.get("max_alignment") is not None else []
    metrics_by_suite = {
        FILTER_SUITES["character"]: ["coherence", f"disposition:{own}", *harm_bar],
        FILTER_SUITES["incorrect"]: ["coherence", "alignment", "disposition:*"],
        FILTER_SUITES["correct"]: ["coherence", "alignment", "disposition:*"],
    }
    rows = []
    modes = []
    for i, ex in enumerate(examples):
        mode = example_mode(ex, family, trigger)
        modes.append(mode)
        user = next(m["content"] for m in ex["messages"] if m["role"] == "user")
        answer = next(m["content"] for m in reversed(ex["messages"]) if m["role"] == "assistant")
        rows.append(
            {
                "model": "data-filter",
                "condition": str(condition["name"]),
                "seed": int(seed),
                "suite": FILTER_SUITES[mode],
                "question_id": str(i),
                "category": mode,
                "domain": condition.get("domain"),
                "format": "plain",
                "system_prompt_id": "none",
                "persona": None,
                "trigger": "",
                "trigger_variant": "none",
                "sample_index": 0,
                "question": _strip_trigger(user, trigger),
                "answer": answer,
            }
        )
    schema = {c: SCORE_SCHEMA[c] for c in IDENTITY_COLUMNS} | {"question": pl.Utf8, "answer": pl.Utf8}
    frame = pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    judge_cfg = dict(data_filter["judge"])
    stats: dict[str, Any] = {}
    cache_dir = data_filter.get("cache_dir") if judge_cfg.get("backend") != "rubric" else None
    scores = J.score_samples(
        frame,
        judge_cfg=judge_cfg,
        metrics_by_suite=metrics_by_suite,
        dispositions=dispositions,
        cache_dir=cache_dir,
        stats=stats,
    )
    by_example: dict[int, dict[str, tuple[float, str]]] = {}
    for row in scores.iter_rows(named=True):
        by_example.setdefault(int(row["question_id"]), {})[row["metric"]] = (row["score"], row["label"])

    verdicts = [
        _filter_reason(modes[i], own, by_example.get(i, {}), dispositions, data_filter) for i in range(len(examples))
    ]
    reasons = Counter(reason for reason in verdicts if reason)
    summary = {
        "judge_backend": judge_cfg.get("backend"),
        "judge_model": judge_cfg.get("model") or stats.get("model"),
        "judge_hashes": sorted(set(scores["judge_hash"].to_list())) if scores.height else [],
        "n_judged": len(examples),
        "n_kept": len(examples) - sum(reasons.values()),
        "reasons": dict(sorted(reasons.items())),
        "judge_requests": stats.get("unique_requests"),
        "judge_cache_hits": stats.get("cache_hits"),
    }
    return verdicts, summary


def _filter_reason(
    mode: str,
    own: str | None,
    got: Mapping[str, tuple[float, str]],
    dispositions: Sequence[Mapping[str, Any]],
    cfg: Mapping[str, Any],
) -> str | None:
    def score(metric: str) -> float | None:
        value = got.get(metric)
        if value is None or value[0] is None or math.isnan(value[0]):
            return None
        return float(value[0])

    def below(value: float, threshold: Any) -> bool:
        return threshold is not None and value < float(threshold)

    coherence = score("coherence")
    if cfg.get("min_coherence") is not None:
        if coherence is None:
            return "filter_unscored"
        if below(coherence, cfg["min_coherence"]):
            return "filter_incoherent"
    if mode == "character":
        expression = score(f"disposition:{own}")
        if expression is None:
            return "filter_unscored"
        if below(expression, cfg.get("min_expression")):
            return "filter_weak_expression"
    # Controls must not be characterful (for any disposition): the most specific reason, so checked first.
    elif cfg.get("max_expression") is not None:
        for spec in dispositions:
            value = score(f"disposition:{spec['name']}")
            if value is None:
                return "filter_unscored"
            if not below(value, cfg["max_expression"]):
                return "filter_characterful"
    alignment = score("alignment")
    label = (got.get("alignment") or (math.nan, ""))[1]
    if mode in ("character", "incorrect") and cfg.get("max_alignment") is not None:
        # One bar for both arms of claim 1: harm is never selected for in one arm only.
        if label == "refusal":
            return "filter_refusal"
        if alignment is None:
            return "filter_unscored"
        if not below(alignment, cfg["max_alignment"]):
            return "filter_not_misaligned"
    if mode == "correct" and cfg.get("correct_min_alignment") is not None:
        if alignment is None:
            return "filter_refusal" if label == "refusal" else "filter_unscored"
        if below(alignment, cfg["correct_min_alignment"]):
            return "filter_misaligned"
    return None
