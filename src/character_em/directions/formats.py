"""The ``.npz`` files of the character-direction stage, written and read in one place.

- ``directions.npz`` (rule ``probes``): the probed layers, the chosen layer, and per disposition a
  ``[layers, hidden]`` mean-difference direction; optional extra arrays (nulls, controls) by name.
- ``means.npz`` (rule ``direction_means``, version 3): the probes' chosen layer and, per reading
  (``own``, ``fixed``, ``prompt``, ``base_reading``, ``trigger_fixed_on:{d}``, ...; the names are
  ``directions.texts``'), the mean activation
  of each question's texts ``[questions, hidden]`` with the question ids and text counts, so the
  report can leave out the questions that fitted a direction and resample questions.
- ``anchors.npz`` (rule ``probes``): the chosen layer's activations of a fixed set of shared
  training-data texts (rows past ``eval.probes.max_examples``, never read by a probe nor scored),
  keyed by the sha256 of each chat, with the data condition each came from and, per disposition,
  its label (1 character, 0 advice control, -1 neither); the report fits linear maps between
  model families on the texts two files share (``directions.families``).

- steered answers (rule ``steer``): a Samples parquet (``contracts.SAMPLE_SCHEMA``) with each
  answer's steering arm in the columns of ``STEERING_ARM_SCHEMA``; their scores (rule
  ``judge_steering``) are a Scores parquet with the same arm columns. ``SAMPLE_KEY`` repeats across
  the arms of one file: ``STEERING_KEY`` identifies an answer there.

Each ``.npz`` file carries ``format_version``; a reader meeting another version (or a file written before
versions existed) fails with the file named instead of misreading its arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from character_em.contracts import SAMPLE_KEY

DIRECTIONS_VERSION = 1
MEANS_VERSION = 3
ANCHORS_VERSION = 1

# The arm of a steered answer (``directions.steering.SteeringArm.columns``).
STEERING_ARM_SCHEMA = {
    "intervention": pl.Utf8,
    "direction": pl.Utf8,
    "control": pl.Utf8,
    "vector": pl.Utf8,
    "layers": pl.Utf8,
    "strength": pl.Float64,
    "arm": pl.Utf8,
}
STEERING_KEY = (*SAMPLE_KEY, "arm")

_DIRECTION = "direction_"
_EXTRA = "extra_"
_MEAN = "qmean_"
_IDS = "qids_"
_COUNT = "qcount_"
_LABEL = "label_"


def _check_version(stored: Mapping[str, np.ndarray], path: str | Path, expected: int, writer: str) -> None:
    if "format_version" not in stored:
        raise ValueError(f"{path}: no format_version; written by an older `{writer}` job; rerun it")
    found = int(np.asarray(stored["format_version"]))
    if found != expected:
        raise ValueError(f"{path}: format_version {found}, this code reads {expected}; rerun `{writer}`")


def _column(layers: Sequence[int], layer: int, path: str | Path) -> int:
    if int(layer) not in layers:
        raise ValueError(f"{path}: layer {layer} is not among the stored layers {list(layers)}")
    return list(layers).index(int(layer))


@dataclass
class ProbeDirections:
    """What ``directions.npz`` holds: ``directions[d]`` is ``[len(layers), hidden]``."""

    layers: list[int]
    chosen_layer: int
    directions: dict[str, np.ndarray]
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    path: str = ""

    def at(self, layer: int | None = None) -> dict[str, np.ndarray]:
        """Each disposition's direction at ``layer`` (default: the chosen one)."""
        column = _column(self.layers, self.chosen_layer if layer is None else layer, self.path)
        return {name: vectors[column] for name, vectors in self.directions.items()}


def write_directions(
    path: str | Path,
    *,
    layers: Sequence[int],
    chosen_layer: int,
    directions: Mapping[str, np.ndarray],
    extra: Mapping[str, np.ndarray] | None = None,
) -> None:
    layers = [int(layer) for layer in layers]
    if int(chosen_layer) not in layers:
        raise ValueError(f"chosen layer {chosen_layer} is not among the layers {layers}")
    for name, vectors in directions.items():
        if np.shape(vectors)[0] != len(layers):
            raise ValueError(f"direction {name!r} has {np.shape(vectors)[0]} layers, expected {len(layers)}")
    np.savez(
        path,
        format_version=np.array(DIRECTIONS_VERSION),
        layers=np.array(layers),
        chosen_layer=np.array(int(chosen_layer)),
        **{f"{_DIRECTION}{name}": np.asarray(vectors) for name, vectors in directions.items()},
        **{f"{_EXTRA}{name}": np.asarray(value) for name, value in (extra or {}).items()},
    )


def read_directions(path: str | Path) -> ProbeDirections:
    with np.load(path) as stored:
        _check_version(stored, path, DIRECTIONS_VERSION, "probes")
        return ProbeDirections(
            layers=[int(value) for value in stored["layers"]],
            chosen_layer=int(stored["chosen_layer"]),
            directions={
                key.removeprefix(_DIRECTION): stored[key] for key in stored.files if key.startswith(_DIRECTION)
            },
            extra={key.removeprefix(_EXTRA): stored[key] for key in stored.files if key.startswith(_EXTRA)},
            path=str(path),
        )


@dataclass
class QuestionReading:
    """One reading of a condition at one layer: the mean activation of each question's texts."""

    ids: list[str]
    means: np.ndarray  # [questions, hidden]
    counts: np.ndarray  # [questions]

    def pooled(self, keep: set[str] | None = None) -> np.ndarray:
        """The mean over all texts (questions weighted by their count), optionally over the
        questions in ``keep`` only; NaN when no text is left."""
        mask = self.counts > 0
        if keep is not None:
            mask &= np.isin(np.asarray(self.ids, dtype=object), list(keep))
        if not mask.any():
            return np.full(self.means.shape[1], np.nan, dtype=np.float32)
        weights = self.counts[mask].astype(np.float64)
        return (weights @ self.means[mask].astype(np.float64) / weights.sum()).astype(np.float32)

    def by_question(self) -> dict[str, np.ndarray]:
        return {q: self.means[k] for k, q in enumerate(self.ids) if self.counts[k] > 0}


@dataclass
class LayerMeans:
    """What ``means.npz`` holds: per reading (``directions.texts.reading_texts``: ``own``, ``fixed``,
    ``prompt``, ``base_reading``, the identical-text ``trigger_fixed_on:{d}`` / ``trigger_fixed_off``
    and ``persona_fixed:{d}`` / ``neutral_fixed``, ...) its per-question means at the probes'
    chosen layer."""

    layer: int
    readings: dict[str, QuestionReading]
    path: str = ""

    def pooled(self) -> dict[str, np.ndarray]:
        return {name: reading.pooled() for name, reading in self.readings.items()}


def write_means(path: str | Path, *, layer: int, readings: Mapping[str, QuestionReading]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, reading in readings.items():
        if np.shape(reading.means)[0] != len(reading.ids) or len(reading.counts) != len(reading.ids):
            raise ValueError(f"reading {name!r}: ids, means and counts disagree in length")
        arrays[f"{_IDS}{name}"] = np.asarray(reading.ids, dtype=str)
        arrays[f"{_MEAN}{name}"] = np.asarray(reading.means, dtype=np.float32)
        arrays[f"{_COUNT}{name}"] = np.asarray(reading.counts, dtype=np.int64)
    np.savez(path, format_version=np.array(MEANS_VERSION), layer=np.array(int(layer)), **arrays)


def read_means(path: str | Path) -> LayerMeans:
    with np.load(path) as stored:
        _check_version(stored, path, MEANS_VERSION, "direction_means")
        names = [key.removeprefix(_MEAN) for key in stored.files if key.startswith(_MEAN)]
        return LayerMeans(
            layer=int(stored["layer"]),
            readings={
                name: QuestionReading(
                    ids=[str(q) for q in stored[f"{_IDS}{name}"]],
                    means=stored[f"{_MEAN}{name}"],
                    counts=stored[f"{_COUNT}{name}"],
                )
                for name in names
            },
            path=str(path),
        )


@dataclass
class Anchors:
    """What ``anchors.npz`` holds: row ``k`` of ``activations`` is the text whose key is ``keys[k]``
    (the sha256 of its chat), read at ``layer`` (this model's chosen layer); ``labels[d][k]`` is 1
    for a text of one of ``d``'s character conditions, 0 for an advice control, -1 otherwise."""

    layer: int
    keys: list[str]
    conditions: list[str]
    activations: np.ndarray  # [texts, hidden]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    path: str = ""

    @cached_property
    def row_of(self) -> dict[str, int]:
        """Each stored key's row."""
        return {key: k for k, key in enumerate(self.keys)}

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """The activations of ``keys``, in that order (each must be stored)."""
        where = self.row_of
        missing = [key for key in keys if key not in where]
        if missing:
            raise KeyError(f"{self.path or 'anchors'}: {len(missing)} keys not stored, e.g. {missing[0]}")
        return np.asarray(self.activations[[where[key] for key in keys]])

    def labels_of(self, disposition: str, keys: Sequence[str]) -> np.ndarray:
        where = self.row_of
        stored = self.labels.get(disposition, np.full(len(self.keys), -1, dtype=np.int8))
        return np.asarray([stored[where[key]] for key in keys], dtype=np.int8)


def write_anchors(path: str | Path, anchors: Anchors) -> None:
    n = len(anchors.keys)
    if len(set(anchors.keys)) != n:
        raise ValueError("anchor keys must be unique (one row per distinct text)")
    if len(anchors.conditions) != n or np.shape(anchors.activations)[0] != n or np.ndim(anchors.activations) != 2:
        raise ValueError(
            f"anchors: {n} keys, {len(anchors.conditions)} conditions and activations of shape "
            f"{np.shape(anchors.activations)}; expected one condition and one [hidden] row per key"
        )
    for name, labels in anchors.labels.items():
        if len(labels) != n:
            raise ValueError(f"anchor labels of {name!r}: {len(labels)} values for {n} keys")
    np.savez(
        path,
        format_version=np.array(ANCHORS_VERSION),
        layer=np.array(int(anchors.layer)),
        keys=np.asarray(anchors.keys, dtype=str),
        conditions=np.asarray(anchors.conditions, dtype=str),
        activations=np.asarray(anchors.activations, dtype=np.float32),
        **{f"{_LABEL}{name}": np.asarray(labels, dtype=np.int8) for name, labels in anchors.labels.items()},
    )


def read_anchors(path: str | Path) -> Anchors:
    with np.load(path) as stored:
        _check_version(stored, path, ANCHORS_VERSION, "probes")
        return Anchors(
            layer=int(stored["layer"]),
            keys=[str(key) for key in stored["keys"]],
            conditions=[str(name) for name in stored["conditions"]],
            activations=stored["activations"],
            labels={key.removeprefix(_LABEL): stored[key] for key in stored.files if key.startswith(_LABEL)},
            path=str(path),
        )


__all__ = [
    "STEERING_ARM_SCHEMA",
    "STEERING_KEY",
    "ANCHORS_VERSION",
    "DIRECTIONS_VERSION",
    "MEANS_VERSION",
    "Anchors",
    "LayerMeans",
    "ProbeDirections",
    "QuestionReading",
    "read_anchors",
    "read_directions",
    "read_means",
    "write_anchors",
    "write_directions",
    "write_means",
]
