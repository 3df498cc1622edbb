"""Which texts each reading of rule ``direction_means`` reads (``reading_texts``), so that the
choice is plain data a test can inspect; the script only forwards them through the model.

Two kinds of reading:

- **Identical text** (the primary trigger and persona readings, and ``fixed`` / ``prompt``): both
  sides of a comparison read the very same answer tokens, and only the input differs. The trigger
  pair teacher-forces the base model's answers to the untriggered trigger-suite prompts under the
  untriggered prompt (``trigger_fixed_off``) and under each disposition's exact-trigger prompt of
  the same question (``trigger_fixed_on:{d}``); the persona pair does the same with the base
  model's answers to the neutral system prompt (``neutral_fixed``, ``persona_fixed:{d}``). The
  prompt-end readings (``trigger_prompt_*``, ``neutral_prompt``, ``persona_prompt:{d}``) read the
  prompt's last token, before any answer: secondary, since the probes were fitted on response-token
  means, not on that position.
- **Own text** (``own``, ``trigger_on:{d}`` / ``trigger_off``, ``persona:{d}`` / ``neutral``): each
  side reads its own sampled answers, so text and input differ together. Kept as labelled,
  secondary readings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from character_em.directions.formats import QuestionReading
from character_em.directions.probes import Chat, question_means, sample_chats

# Every Samples file of one suite holds the same prompts; this pair names one prompt of it.
PROMPT_KEY = ("question_id", "format")


@dataclass(frozen=True)
class ReadingTexts:
    """The chats of one reading and each one's question id. ``prompt_end``: read the prompt's last
    token instead of the answer tokens. ``adapter_off``: read through the base model (the
    condition's adapter switched off)."""

    chats: list[Chat]
    question_ids: list[str]
    prompt_end: bool = False
    adapter_off: bool = False


def _own(frame: pl.DataFrame, **flags: bool) -> ReadingTexts:
    return ReadingTexts(sample_chats(frame), frame["question_id"].to_list(), **flags)


def teacher_forced(answers: pl.DataFrame, prompts: pl.DataFrame) -> ReadingTexts:
    """``answers`` (a Samples frame) with each answer put after the prompt that ``prompts`` holds for
    the same question and format, instead of the prompt it was sampled for. Answers whose question
    ``prompts`` lacks are left out."""
    messages = {
        (question, fmt): json.loads(value)
        for question, fmt, value in prompts.unique(list(PROMPT_KEY), keep="first", maintain_order=True)
        .select(*PROMPT_KEY, "messages")
        .iter_rows()
    }
    chats, ids = [], []
    for question, fmt, answer in answers.select(*PROMPT_KEY, "answer").iter_rows():
        prompt = messages.get((question, fmt))
        if prompt is not None:
            chats.append([*prompt, {"role": "assistant", "content": answer or ""}])
            ids.append(question)
    return ReadingTexts(chats, ids)


def _prompt_end(prompts: pl.DataFrame) -> ReadingTexts:
    one = prompts.unique(list(PROMPT_KEY), keep="first", maintain_order=True)
    return _own(one, prompt_end=True)


def reading_texts(
    *,
    em: pl.DataFrame,
    fixed: pl.DataFrame,
    dispositions: Sequence[str],
    adapter: bool,
    trigger: pl.DataFrame | None = None,
    fixed_trigger: pl.DataFrame | None = None,
    persona: pl.DataFrame | None = None,
) -> dict[str, ReadingTexts]:
    """Every reading of one condition and seed (see the module docstring), by name.

    em: this condition's em answers; fixed: the base model's em answers (same seed); trigger: this
    triggered model's own trigger-suite answers and fixed_trigger the base model's (both or neither);
    persona: the base model's persona-suite answers (on the base condition only); adapter: whether
    the condition has an adapter to switch off (``base_reading``).
    """
    out = {"own": _own(em)}
    if adapter:
        out["base_reading"] = _own(em, adapter_off=True)
    out["fixed"] = _own(fixed)
    out["prompt"] = _prompt_end(fixed)
    if trigger is not None:
        out["trigger_off"] = _own(trigger.filter(pl.col("trigger_variant") == "none"))
        for name in dispositions:
            exact = (pl.col("trigger_variant") == "exact") & (pl.col("persona") == name)
            out[f"trigger_on:{name}"] = _own(trigger.filter(exact))
    if fixed_trigger is not None:
        untriggered = fixed_trigger.filter(pl.col("trigger_variant") == "none")
        out["trigger_fixed_off"] = teacher_forced(untriggered, untriggered)
        out["trigger_prompt_off"] = _prompt_end(untriggered)
        for name in dispositions:
            exact = fixed_trigger.filter((pl.col("trigger_variant") == "exact") & (pl.col("persona") == name))
            out[f"trigger_fixed_on:{name}"] = teacher_forced(untriggered, exact)
            out[f"trigger_prompt_on:{name}"] = _prompt_end(exact)
    if persona is not None:
        neutral = persona.filter(pl.col("system_prompt_id") == "neutral")
        out["neutral"] = _own(neutral)
        # The base model reading its own neutral answers under their own prompt: the same texts.
        out["neutral_fixed"] = out["neutral"]
        out["neutral_prompt"] = _prompt_end(neutral)
        for name in dispositions:
            prompted = persona.filter(pl.col("system_prompt_id") == f"persona-{name}")
            out[f"persona:{name}"] = _own(prompted)
            out[f"persona_fixed:{name}"] = teacher_forced(neutral, prompted)
            out[f"persona_prompt:{name}"] = _prompt_end(prompted)
    return out


# The (on, off) reading pairs of a trigger or persona comparison, primary first. ``{d}`` is the
# disposition. Only the identical-text pair separates the input from the text.
TRIGGER_PAIRS = {
    "identical texts": ("trigger_fixed_on:{d}", "trigger_fixed_off"),
    "prompt's last token": ("trigger_prompt_on:{d}", "trigger_prompt_off"),
    "own texts": ("trigger_on:{d}", "trigger_off"),
}
PERSONA_PAIRS = {
    "identical texts": ("persona_fixed:{d}", "neutral_fixed"),
    "prompt's last token": ("persona_prompt:{d}", "neutral_prompt"),
    "own texts": ("persona:{d}", "neutral"),
}
PRIMARY = "identical texts"
VARIANTS = tuple(TRIGGER_PAIRS)


def comparison_pairs(
    condition: str, spec: Mapping[str, Any], names: Sequence[str], variant: str = PRIMARY
) -> list[tuple[str, str, str, str]]:
    """The trigger and persona comparisons one condition's readings (``names``) hold, as
    (kind, disposition, on reading, off reading): kind "trigger" on a triggered model (its own
    disposition's trigger), "persona" on the base model (every disposition with a persona reading)."""
    present = set(names)
    out = []
    if spec["family"] == "triggered":
        on, off = (name.format(d=spec["disposition"]) for name in TRIGGER_PAIRS[variant])
        if on in present and off in present:
            out.append(("trigger", spec["disposition"], on, off))
    if condition == "base":
        on_pattern, off = PERSONA_PAIRS[variant]
        prefix = on_pattern.removesuffix("{d}")
        if off in present:
            out += [
                ("persona", name.removeprefix(prefix), name, off) for name in sorted(present) if name.startswith(prefix)
            ]
    return out


def source_pairs(condition: str, spec: Mapping[str, Any], names: Sequence[str]) -> list[tuple[str, str, str]]:
    """(label, reading a, reading b) of the directions one condition's readings make, a minus b:
    ``finetune:{d}`` (or ``finetune:incorrect`` / ``finetune:correct``) = its own answers through
    its model minus through the base model; ``trigger:{d}`` and ``persona:{d}`` from the
    identical-text comparisons (``comparison_pairs``)."""
    out = []
    if "base_reading" in names and spec["family"] in ("character", "incorrect", "correct"):
        label = spec["disposition"] if spec["family"] == "character" else spec["family"]
        out.append((f"finetune:{label}", "own", "base_reading"))
    out += [(f"{kind}:{d}", on, off) for kind, d, on, off in comparison_pairs(condition, spec, names)]
    return out


def reading_means(
    model: Any,
    tokenizer: Any,
    plan: Mapping[str, ReadingTexts],
    layer: int,
    *,
    batch_size: int,
    max_tokens: int,
) -> dict[str, QuestionReading]:
    """Each reading of ``plan`` (``reading_texts``) as per-question means at ``layer``. ``model`` is
    a peft model when a reading switches its adapter off. A text set listed under two names is
    forwarded once."""
    done: dict[int, dict[str, Any]] = {}
    out = {}
    for name, chosen in plan.items():
        if id(chosen) not in done:
            args = (model, tokenizer, chosen.chats, chosen.question_ids, [layer])
            read = {"batch_size": batch_size, "max_tokens": max_tokens, "prompt_end": chosen.prompt_end}
            if chosen.adapter_off:
                with model.disable_adapter():
                    done[id(chosen)] = question_means(*args, **read)
            else:
                done[id(chosen)] = question_means(*args, **read)
        result = done[id(chosen)]
        out[name] = QuestionReading(result["ids"], result["means"][:, 0], result["counts"])
    return out


__all__ = [
    "PERSONA_PAIRS",
    "PRIMARY",
    "PROMPT_KEY",
    "TRIGGER_PAIRS",
    "VARIANTS",
    "ReadingTexts",
    "comparison_pairs",
    "reading_means",
    "reading_texts",
    "source_pairs",
    "teacher_forced",
]
