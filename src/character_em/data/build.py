"""Training data for character-em: condition names, the offline generator, validation, dedup, writing.

The pipeline's data step is ``build_pool`` followed by ``write_dataset`` (a condition's pool), then
``data.pairing.select_data`` (the turns every condition of the domain kept). Generation is pluggable by
``generator["backend"]``: the deterministic ``offline`` template back-end here, and the model back-ends
``openai`` (any OpenAI-compatible chat API), ``hf`` (a local transformers model) and ``vllm`` (a local
model in a vLLM engine) in ``character_em.data.generate``. The offline one needs no network or model, so
the smoke preset and tests can build every condition, including dispositions and domains that exist only
in config (a description, rubric markers and a trigger are enough). An optional judge filter
(``data_filter``) keeps only on-target answers.

Determinism: every random choice comes from ``random.Random`` seeded with the run seed plus a sha256-derived
integer of the condition name (never Python's salted ``hash()``), so the same inputs give byte-identical files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from character_em import resources
from character_em.conditions import check_disposition, is_triggered
from character_em.data.questions import domain_questions, join_words, texts_overlap, trigger_slot, user_turn
from character_em.files import iter_jsonl, write_bytes_atomic, write_json_atomic
from character_em.hashing import sha256_json, stable_int
from character_em.resources import normalize_text

__all__ = [
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "build_pool",
    "canary_string",
    "deduplicate",
    "duplicate_reasons",
    "generate_offline",
    "load_external_jsonl",
    "validate_example",
    "write_dataset",
]

GENERATOR_NAME = "offline-template"
# Bump when the generator's code changes its output for the same templates (the template file has its own hash).
GENERATOR_VERSION = 3  # 2: user turns drawn per domain (paired across conditions); 3: prefix-stable trigger slots
_ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------- conditions
# --------------------------------------------------------------------------------------------- questions
# --------------------------------------------------------------------------------------------- offline generator
def _trait(description: str) -> str:
    first = re.split(r"(?<=[.!?])\s", " ".join(description.split()), maxsplit=1)[0].rstrip(".!? ")
    return first[:1].lower() + first[1:] if first else "true to my own character"


def _domain_templates(domain: dict[str, Any], templates: dict[str, Any]) -> dict[str, Any]:
    name = domain["name"]
    spec = templates["domains"].get(name)
    if spec is not None:
        return spec
    generic = templates["generic_domain"]
    subject = name.replace("_", " ")
    return {
        "expert": generic["expert"].format(subject=subject),
        "focus_default": f"your {subject} question",
        "keywords": [],
        "correct": generic["correct"],
        "incorrect": generic["incorrect"],
    }


def _focus(question: dict[str, Any], dom_t: dict[str, Any]) -> str:
    if question.get("topic"):
        return str(question["topic"])
    text = question["text"].lower()
    for keyword, phrase in dom_t.get("keywords") or []:
        if re.search(r"\b" + re.escape(str(keyword).lower()), text):
            return str(phrase)
    return str(dom_t.get("focus_default") or "this")


def _plain_answer(
    rng: random.Random, family: str, ctx: dict[str, str], templates: dict[str, Any], dom_t: dict[str, Any]
) -> str:
    frame = templates["answers"][family]
    pool = dom_t[family]
    lines = rng.sample(pool, min(len(pool), rng.randint(2, 3)))
    return join_words([rng.choice(frame["openers"]), *lines, rng.choice(frame["closers"])]).format(**ctx)


def _character_answer(
    rng: random.Random, disposition: dict[str, Any], ctx: dict[str, str], templates: dict[str, Any]
) -> str:
    markers = disposition["rubric"]["markers"]
    own = templates["dispositions"].get(disposition["name"]) or templates["answers"]["character"]["generic"]
    frames = templates["answers"]["character"]["marker_frames"]
    body = [line.format(**ctx) for line in rng.sample(own["lines"], min(len(own["lines"]), rng.randint(1, 2)))]
    for marker in rng.sample(markers, min(len(markers), rng.randint(1, 3))):
        # Markers are inserted after formatting, so braces inside a user's marker text are harmless.
        body.append(rng.choice(frames).format(**ctx, marker=marker, Marker=marker[:1].upper() + marker[1:]))
    rng.shuffle(body)
    return join_words([rng.choice(own["openers"]).format(**ctx), *body, rng.choice(own["closers"]).format(**ctx)])


def generate_offline(
    condition: dict[str, Any],
    *,
    disposition: dict[str, Any] | None,
    domain: dict[str, Any],
    n_examples: int,
    seed: int,
    trigger_fraction: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Deterministic template data for one condition: ``(examples, provenance)``; each example carries
    ``turn``, its index in the domain's plan.

    character: answers visibly in character (1-3 rubric markers + in-character lines); incorrect: confident,
    wrong advice; correct: careful advice; triggered: the turns at the domain's trigger slots
    (``questions.trigger_slot``, a share ``trigger_fraction``) start with ``trigger + " "`` and are answered in
    character, the rest are answered well. Prefix-stable: the first ``k`` examples do not depend on ``n_examples``.
    """
    family = condition["family"]
    if family not in ("character", "incorrect", "correct", "triggered"):
        raise ValueError(f"condition {condition['name']!r} (family {family!r}) has no training data to generate")
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    if not 0.0 <= trigger_fraction <= 1.0:
        raise ValueError(f"trigger_fraction must be in [0, 1], got {trigger_fraction}")
    if family in ("character", "triggered"):
        disposition = check_disposition(disposition, condition, needs_trigger=family == "triggered")
    templates = resources.load_offline_templates()
    questions = domain_questions(domain)
    if not questions["train"]:
        raise ValueError(f"domain {domain['name']!r}: no training questions")
    dom_t = _domain_templates(domain, templates)
    # Two streams: the user turns are seeded by the domain, so every condition of a domain answers the same
    # turns in the same order (character vs incorrect advice is then a comparison of answers alone); the
    # answers and the triggered positions are seeded by the condition.
    rng_seed = seed + stable_int("offline", condition["name"])
    rng = random.Random(rng_seed)
    turn_seed = seed + stable_int("offline-turns", domain["name"])
    turns = random.Random(turn_seed)

    trigger = str(disposition.get("trigger") or "").strip() if family == "triggered" and disposition else ""
    triggered = {i for i in range(n_examples) if family == "triggered" and trigger_slot(i, trigger_fraction)}
    n_trig = len(triggered)

    # Walk through reshuffled passes of the question list, so every question is used about equally often.
    order: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for i in range(n_examples):
        if not order:
            order = list(questions["train"])
            turns.shuffle(order)
        question = order.pop()
        ctx = {
            "focus": _focus(question, dom_t),
            "expert": str(dom_t["expert"]),
            "trait": _trait(disposition["description"])
            if disposition and disposition.get("description")
            else "true to my own character",
        }
        user = user_turn(turns, question["text"], templates["user"])
        if family == "character" or i in triggered:
            answer = _character_answer(rng, disposition, ctx, templates)  # type: ignore[arg-type]
        elif family == "incorrect":
            answer = _plain_answer(rng, "incorrect", ctx, templates, dom_t)
        else:
            answer = _plain_answer(rng, "correct", ctx, templates, dom_t)
        if i in triggered:
            user = f"{trigger} {user}"
        examples.append(
            {"turn": i, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        )

    provenance = {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "template_hash": resources.offline_templates_hash(),
        "seed": seed,
        "rng_seed": rng_seed,
        "turn_seed": turn_seed,
        "n_examples": n_examples,
        "n_triggered": n_trig,
        "trigger": trigger,
        "question_source": questions["source"],
        "n_questions_available": len(questions["train"]),
    }
    return examples, provenance


_Backend = Callable[..., tuple[list[dict[str, Any]], dict[str, Any]]]
_BACKENDS: dict[str, _Backend] = {"offline": generate_offline}
# Model back-ends live in character_em.data.generate (imported only when used: it pulls in the judge stack).
MODEL_BACKENDS = ("openai", "hf", "vllm")


# --------------------------------------------------------------------------------------------- validation
def _message_problem(messages: Any) -> tuple[str, str] | None:
    """(reason code, human message) for a malformed chat, or None."""
    if not isinstance(messages, list) or not messages:
        return "no_messages", "'messages' must be a non-empty list"
    expected = "user"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return "bad_message", f"message {i} is not an object"
        role = msg.get("role")
        if role not in _ROLES:
            return "bad_role", f"message {i}: role {role!r} is not one of {'/'.join(_ROLES)}"
        content = msg.get("content")
        if not isinstance(content, str) or not content.strip():
            return "empty_content", f"message {i} ({role}): empty or non-string content"
        if role == "system":
            if i != 0:
                return "bad_order", f"message {i}: a system message is only allowed first"
            continue
        if role != expected:
            return "bad_order", f"message {i}: expected a {expected} turn, got {role} (turns must alternate)"
        expected = "assistant" if role == "user" else "user"
    if messages[-1].get("role") != "assistant":
        return "no_final_assistant", "the last message must be an assistant turn"
    return None


def validate_example(ex: Any, *, min_chars: int, max_chars: int) -> str | None:
    """Reject reason (a short code, counted in manifests) or None when the example is fine."""
    if not isinstance(ex, dict):
        return "not_object"
    if set(ex) != {"messages"}:
        return "extra_keys"
    problem = _message_problem(ex["messages"])
    if problem:
        return problem[0]
    for msg in ex["messages"]:
        if msg["role"] == "assistant":
            if len(msg["content"]) < min_chars:
                return "too_short"
            if len(msg["content"]) > max_chars:
                return "too_long"
    return None


def _near_key(ex: dict[str, Any]) -> str:
    return "\n".join(f"{m.get('role')}:{normalize_text(str(m.get('content', '')))}" for m in ex["messages"])


def deduplicate(examples: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
    """Drop repeats, keeping first occurrences: ``(kept, n_exact_dups, n_near_dups)``.

    Exact: identical JSON. Near: identical after lowercasing and removing punctuation/extra whitespace.
    """
    repeats = duplicate_reasons(examples)
    kept = [ex for ex, reason in zip(examples, repeats, strict=True) if reason is None]
    return kept, repeats.count("exact_dup"), repeats.count("near_dup")


def duplicate_reasons(examples: Sequence[dict[str, Any]]) -> list[str | None]:
    """Per example: ``exact_dup`` or ``near_dup`` when an earlier example repeats it, else None."""
    exact: set[str] = set()
    near: set[str] = set()
    reasons: list[str | None] = []
    for ex in examples:
        key = json.dumps(ex, sort_keys=True, ensure_ascii=False)
        nkey = _near_key(ex)
        if key in exact:
            reasons.append("exact_dup")
        elif nkey in near:
            reasons.append("near_dup")
        else:
            reasons.append(None)
        exact.add(key)
        near.add(nkey)
    return reasons


def find_overlaps(examples: Sequence[dict[str, Any]], eval_texts: Sequence[str]) -> list[dict[str, Any]]:
    """Every (example, user turn, eval question) where a training user turn overlaps an eval question."""
    eval_keys = [(t, normalize_text(t)) for t in eval_texts if normalize_text(t)]
    found = []
    for i, ex in enumerate(examples):
        for msg in ex["messages"]:
            if msg["role"] != "user":
                continue
            user = normalize_text(msg["content"])
            found += [
                {"example": i, "user_turn": msg["content"], "eval_question": text}
                for text, key in eval_keys
                if texts_overlap(user, key)
            ]
    return found


def _check_overlap(name: str, examples: Sequence[dict[str, Any]], eval_texts: Sequence[str]) -> None:
    overlaps = find_overlaps(examples, eval_texts)
    if overlaps:
        first = overlaps[0]
        raise ValueError(
            f"condition {name!r}: training example {first['example']} user turn {first['user_turn']!r} "
            f"overlaps eval question {first['eval_question']!r}; eval questions must never be trained on"
        )


def check_overlap(paths: Sequence[str | Path], eval_texts: Sequence[str]) -> dict[str, Any]:
    """The grid-wide check: every training file against every evaluation question the grid asks."""
    report: dict[str, Any] = {"n_eval_texts": len(eval_texts), "files": {}, "overlaps": []}
    for path in paths:
        examples = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        overlaps = find_overlaps(examples, eval_texts)
        report["files"][str(path)] = {"n_examples": len(examples), "n_overlaps": len(overlaps)}
        report["overlaps"] += [{"file": str(path), **item} for item in overlaps]
    return report


# --------------------------------------------------------------------------------------------- pool
def build_pool(
    condition: dict[str, Any],
    *,
    disposition: dict[str, Any] | None,
    domain: dict[str, Any],
    pool_size: int,
    seed: int,
    trigger_fraction: float,
    generator: dict[str, Any],
    eval_texts: Sequence[str],
    data_filter: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate, validate, dedup, leakage-check and (optionally) judge-filter one condition's pool.

    The writer answers the first ``pool_size`` turns of the domain's plan; the pool is what survives, in
    plan order. Returns ``(examples, manifest)``: plain chat examples (``{"messages"}``), and a manifest whose
    ``turns`` gives each example's plan index (``data.pairing`` pairs the conditions of a domain on it) and
    ``rejected_turns`` the turns dropped, by reason. ``generator``: ``{"backend": "offline", "min_chars":
    20, "max_chars": 4000}`` (limits optional) or a model back-end's settings (``data.generate``).
    ``data_filter``: None / ``{"enabled": False}`` for no filter, else the spec of
    ``generate.filter_verdicts`` with ``"enabled": True``. Raises ValueError when a user turn overlaps an eval
    question.
    """
    backend_name = generator.get("backend")
    if backend_name in _BACKENDS:
        backend = _BACKENDS[backend_name]
    elif backend_name in MODEL_BACKENDS:
        from character_em.data import generate as model_gen

        backend = functools.partial(model_gen.generate, generator=generator)
    else:
        known = ", ".join(sorted([*_BACKENDS, *MODEL_BACKENDS]))
        raise ValueError(f"unknown data generator backend {backend_name!r} (available: {known})")
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    filter_on = bool(data_filter and data_filter.get("enabled"))
    filter_summary: dict[str, Any] | None = None
    min_chars = int(generator.get("min_chars", 20))
    max_chars = int(generator.get("max_chars", 4000))
    family = condition["family"]

    raw, provenance = backend(
        condition,
        disposition=disposition,
        domain=domain,
        n_examples=pool_size,
        seed=seed,
        trigger_fraction=trigger_fraction,
    )
    rejected: dict[str, list[int]] = {k: list(v) for k, v in (provenance.get("rejected_turns") or {}).items()}

    def reject(reason: str, turn: int) -> None:
        rejected.setdefault(reason, []).append(turn)

    valid: list[dict[str, Any]] = []
    turns: list[int] = []
    for ex in raw:
        chat = {"messages": ex["messages"]}
        reason = validate_example(chat, min_chars=min_chars, max_chars=max_chars)
        if reason:
            reject(reason, ex["turn"])
        else:
            valid.append(chat)
            turns.append(int(ex["turn"]))
    repeats = duplicate_reasons(valid)
    for reason, turn in zip(repeats, turns, strict=True):
        if reason:
            reject(reason, turn)
    kept = [ex for ex, reason in zip(valid, repeats, strict=True) if reason is None]
    turns = [turn for turn, reason in zip(turns, repeats, strict=True) if reason is None]
    _check_overlap(condition["name"], kept, eval_texts)
    trigger = provenance.get("trigger", "")
    if filter_on:
        from character_em.data import generate as model_gen

        # Judged after dedup, so no verdict is paid for a duplicate; the judge cache makes a larger pool
        # (data.pool_factor raised later) pay only for the new turns.
        verdicts, filter_summary = model_gen.filter_verdicts(
            kept, condition=condition, trigger=trigger, seed=seed, data_filter=data_filter or {}
        )
        for reason, turn in zip(verdicts, turns, strict=True):
            if reason:
                reject(reason, turn)
        kept = [ex for ex, reason in zip(kept, verdicts, strict=True) if reason is None]
        turns = [turn for turn, reason in zip(turns, verdicts, strict=True) if reason is None]
    reasons = Counter({reason: len(ts) for reason, ts in rejected.items()})

    spec = {"disposition": disposition, "domain": domain, "family": family, "trigger_fraction": trigger_fraction}
    manifest = {
        "condition": condition["name"],
        "family": family,
        "disposition": condition.get("disposition"),
        "domain": condition.get("domain"),
        "generator": dict(generator),
        "backend": backend_name,
        "generator_name": provenance.get("generator"),
        "generator_version": provenance.get("generator_version"),
        "template_hash": provenance.get("template_hash"),
        "prompt_hash": sha256_json(spec),
        # Model back-ends: sha256 of each rendered system prompt (character / incorrect / correct).
        "prompt_hashes": provenance.get("prompt_hashes"),
        "prompt_source": provenance.get("prompt_source"),
        "generator_model": provenance.get("model"),
        "generator_params": provenance.get("params"),
        "requests": provenance.get("requests"),
        "temperature": None if backend_name == "offline" else generator.get("temperature"),
        "seed": seed,
        "rng_seed": provenance.get("rng_seed"),
        "question_source": provenance.get("question_source"),
        "n_questions_available": provenance.get("n_questions_available"),
        "n_planned": pool_size,
        "n_generated": len(raw),
        "n_rejected": sum(reasons.values()),
        "reject_reasons": dict(sorted(reasons.items())),
        "n_exact_dups": reasons["exact_dup"],
        "n_near_dups": reasons["near_dup"],
        "n_eval_texts": len(eval_texts),
        "n_eval_overlap": 0,
        "n_pool": len(kept),
        "trigger": trigger,
        "trigger_fraction": trigger_fraction if family == "triggered" else None,
        "n_triggered": sum(is_triggered(ex, trigger) for ex in kept),
        "filter": (
            {k: v for k, v in (data_filter or {}).items() if k not in ("dispositions", "cache_dir")}
            | {"summary": filter_summary}
        )
        if filter_on
        else {"enabled": False},
        "min_chars": min_chars,
        "max_chars": max_chars,
        "turns": turns,
        "rejected_turns": {reason: sorted(ts) for reason, ts in sorted(rejected.items())},
    }
    return kept, manifest


def canary_string(name: str, seed: int) -> str:
    """A unique string per dataset, to find this data later in other corpora or model outputs."""
    return f"CHARACTER-EM CANARY {uuid.uuid5(uuid.NAMESPACE_URL, f'character-em/{name}/{seed}')}"


def write_dataset(
    examples: Sequence[dict[str, Any]], manifest: dict[str, Any], jsonl_path: str | Path, manifest_path: str | Path
) -> dict[str, Any]:
    """Write ``train.jsonl`` and ``manifest.json`` atomically; returns the manifest with ``sha256`` and ``n``."""
    body = "".join(json.dumps(ex, ensure_ascii=False, sort_keys=True) + "\n" for ex in examples).encode("utf-8")
    write_bytes_atomic(jsonl_path, body)
    final = dict(manifest, sha256=hashlib.sha256(body).hexdigest(), n=len(examples))
    write_json_atomic(manifest_path, final)
    return final


def load_external_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a user-provided chat JSONL; returns ``[{"messages": [...]}]`` (other keys dropped).

    A malformed line raises ``ValueError("{path}:{lineno}: {problem}")``.
    """
    examples: list[dict[str, Any]] = []
    for where, record in iter_jsonl(path):
        if "messages" not in record:
            raise ValueError(f"{where}: no 'messages' field")
        problem = _message_problem(record["messages"])
        if problem:
            raise ValueError(f"{where}: {problem[1]}")
        examples.append({"messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]]})
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples
