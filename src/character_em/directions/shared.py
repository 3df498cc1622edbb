"""Directions from the three sources the shared-structure claim compares, computed from the
per-condition mean activations (``means.npz`` readings at one layer):

- ``finetune:{d}``: a fine-tuned model minus the base model on the *same* texts (its adapter on
  and off), averaged over domains and seeds; also ``finetune:incorrect`` and ``finetune:correct``
  as the advice fine-tunes to contrast with;
- ``trigger:{d}``: the same answers (the base model's, to untriggered prompts) read on the
  triggered model after the exact trigger minus after the untriggered prompt;
- ``persona:{d}``: the same answers (the base model's, to the neutral system prompt) read on the
  base model after the persona minus after the neutral system prompt;

next to the base model's probe directions ``probe:{d}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from character_em.directions.texts import source_pairs

log = logging.getLogger(__name__)


def source_differences(
    readings: Sequence[Mapping[str, Any]], conditions: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, list[np.ndarray]]]:
    """Every difference vector each (model, condition, seed) reading contributes, grouped by label
    (the pairs of ``directions.texts.source_pairs``).

    readings: {"model", "condition", "means": {reading name: vector at one layer}}. conditions:
    condition name -> its ``condition_info`` (family, disposition). Returns model -> label -> the
    vectors in reading order (averaged by ``average_differences``).
    """
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for reading in readings:
        model, condition, at = reading["model"], reading["condition"], reading["means"]
        named = out.setdefault(model, {})
        for label, a, b in source_pairs(condition, conditions[condition], list(at)):
            named.setdefault(label, []).append(at[a] - at[b])
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
