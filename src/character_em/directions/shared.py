"""Directions from the three sources the shared-structure claim compares, computed from the
per-condition mean activations (``means.npz`` readings at one layer):

- ``finetune:{d}``: a fine-tuned model minus the base model on the *same* texts (its adapter on
  and off), averaged over domains and seeds; also ``finetune:incorrect`` and ``finetune:correct``
  as the advice fine-tunes to contrast with;
- ``trigger:{d}``: trigger-exact minus untriggered answers, read on the triggered model;
- ``persona:{d}``: persona minus neutral system prompt, read on the base model;

next to the base model's probe directions ``probe:{d}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def source_differences(
    readings: Sequence[Mapping[str, Any]], conditions: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, list[np.ndarray]]]:
    """Every difference vector each (model, condition, seed) reading contributes, grouped by label.

    readings: {"model", "condition", "means": {reading name: vector at one layer}}. conditions:
    condition name -> its ``condition_info`` (family, disposition). Returns model -> label -> the
    vectors in reading order (averaged by ``average_differences``).
    """
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for reading in readings:
        model, condition, at = reading["model"], reading["condition"], reading["means"]
        spec = conditions[condition]
        family = spec["family"]
        named = out.setdefault(model, {})
        if "base_reading" in at and family in ("character", "incorrect", "correct"):
            label = spec["disposition"] if family == "character" else family
            named.setdefault(f"finetune:{label}", []).append(at["own"] - at["base_reading"])
        if family == "triggered":
            on = f"trigger_on:{spec['disposition']}"
            if on in at and "trigger_off" in at:
                named.setdefault(f"trigger:{spec['disposition']}", []).append(at[on] - at["trigger_off"])
        if condition == "base" and "neutral" in at:
            for key, vector in at.items():
                if key.startswith("persona:"):
                    named.setdefault(key, []).append(vector - at["neutral"])
    return out


def average_differences(differences: Mapping[str, Sequence[np.ndarray]], *, model: str = "") -> dict[str, np.ndarray]:
    """The mean vector per label (sorted by label). A label with a non-finite member (a condition
    with no answers of that kind) is left out with a warning rather than averaged into NaN."""
    averaged = {}
    for label, group in sorted(differences.items()):
        stacked = np.stack(group)
        if np.isfinite(stacked).all():
            averaged[label] = stacked.mean(axis=0)
        else:
            log.warning("%s: %s has a condition with no answers; left out", model, label)
    return averaged


def direction_sets(
    probe_vectors: Mapping[str, Mapping[str, np.ndarray]],
    readings: Sequence[Mapping[str, Any]],
    conditions: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, np.ndarray]]:
    """Per model: ``probe:{d}`` first, then the fine-tune, trigger and persona directions."""
    differences = source_differences(readings, conditions)
    vectors = {}
    for model, named in probe_vectors.items():
        vectors[model] = {f"probe:{name}": vector for name, vector in named.items()}
        vectors[model].update(average_differences(differences.get(model, {}), model=model))
    return vectors


__all__ = ["average_differences", "direction_sets", "source_differences"]
