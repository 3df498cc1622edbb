"""The questions and user turns that every data writer shares: a domain's train and eval questions, and
the user framing around a question. The offline templates and the model writers both ask with these, so
all conditions of a domain see the same kind of turns."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from character_em import resources
from character_em.hashing import stable_int
from character_em.resources import NAME_RE, normalize_text

__all__ = ["domain_questions", "join_words", "texts_overlap", "trigger_slot", "user_turn"]

# Eval questions set aside when a domain's questions are synthesized from its topics.
_N_SYNTH_EVAL = 12


def _contains(longer: str, shorter: str) -> bool:
    """Whole-word containment of normalized texts; short fragments only count on equality."""
    if longer == shorter:
        return True
    if len(shorter.split()) < 4:
        return False
    return f" {shorter} " in f" {longer} "


def texts_overlap(a: str, b: str) -> bool:
    return _contains(a, b) or _contains(b, a)


def _synthesize_questions(domain: dict[str, Any]) -> dict[str, Any]:
    name = domain["name"]
    generic = resources.load_offline_templates()["generic_domain"]
    subject = name.replace("_", " ")
    topics = [t.strip() for t in domain.get("topics") or [] if isinstance(t, str) and t.strip()]
    # Aspects of the domain name make a varied pool even when config gives no topics at all.
    topics += [f"{subject} {a}" for a in generic["aspects"]]
    pool: list[dict[str, str]] = []
    seen: set[str] = set()
    for topic in dict.fromkeys(topics):
        for tmpl in generic["question_templates"]:
            text = tmpl.format(topic=topic)
            key = normalize_text(text)
            if key not in seen:
                seen.add(key)
                pool.append({"text": text, "topic": topic})
    rng = random.Random(stable_int("synth-eval", name))
    eval_idx = set(rng.sample(range(len(pool)), min(_N_SYNTH_EVAL, len(pool) // 4)))
    eval_items = [pool[i] for i in sorted(eval_idx)]
    eval_keys = [normalize_text(q["text"]) for q in eval_items]
    # Drop any train item that overlaps an eval item, so the leakage check of build_pool cannot fire.
    train_items = [
        q
        for i, q in enumerate(pool)
        if i not in eval_idx and not any(texts_overlap(normalize_text(q["text"]), e) for e in eval_keys)
    ]
    return {
        "source": "synthesized",
        "description": domain.get("description") or f"Questions about {subject}.",
        "train": [{"id": f"{name}-train-{i:03d}", **q} for i, q in enumerate(train_items, 1)],
        "eval": [{"id": f"{name}-eval-{i:03d}", **q} for i, q in enumerate(eval_items, 1)],
    }


def domain_questions(domain: dict[str, Any]) -> dict[str, Any]:
    """Train and eval questions of a domain: ``{"source", "description", "train", "eval"}``.

    Source order: the spec's ``questions_file``, the packaged bank of that name, else questions synthesized
    from the spec's topics and name (eval disjoint from train). Items are ``{id, text}`` (+ ``topic`` when
    synthesized).
    """
    name = domain.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"domain spec needs a name matching {NAME_RE.pattern}, got {name!r}")
    if domain.get("questions_file"):
        bank = resources.load_domain_bank_file(domain["questions_file"])
        return {"source": "file", "description": bank["description"], "train": bank["train"], "eval": bank["eval"]}
    bank = resources.load_domain_bank(name)
    if bank is not None:
        return {"source": "bank", "description": bank["description"], "train": bank["train"], "eval": bank["eval"]}
    return _synthesize_questions(domain)


def join_words(parts: Iterable[str]) -> str:
    return " ".join(p.strip() for p in parts if p and p.strip())


def user_turn(rng: random.Random, question: str, user_t: dict[str, Any]) -> str:
    return join_words(
        [rng.choice(user_t["openers"]), rng.choice(user_t["contexts"]), question, rng.choice(user_t["closers"])]
    )


def trigger_slot(index: int, trigger_fraction: float) -> bool:
    """Whether planned turn ``index`` of a domain carries the trigger in its triggered conditions: turn ``i``
    does when ``floor((i + 1) f) > floor(i f)``. A function of the turn alone, so the pattern is prefix-stable
    (the plan for ``n`` turns is a prefix of the plan for more) and the same in every condition of a domain:
    the training draws stratify on it (``data.pairing``), so every draw has the trigger share exactly."""
    frac = Fraction(trigger_fraction).limit_denominator(10_000)
    return math.floor((index + 1) * frac) > math.floor(index * frac)
