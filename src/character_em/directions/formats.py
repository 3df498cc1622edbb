"""The two ``.npz`` files of the character-direction stage, written and read in one place.

- ``directions.npz`` (rule ``probes``): the probed layers, the chosen layer, and per disposition a
  ``[layers, hidden]`` mean-difference direction; optional extra arrays (nulls, controls) by name.
- ``means.npz`` (rule ``direction_means``): the probed layers and, per reading (``own``,
  ``base_reading``, ``trigger_on:{d}``, ...), a ``[layers, hidden]`` mean activation.

Each file carries ``format_version``; a reader meeting another version (or a file written before
versions existed) fails with the file named instead of misreading its arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DIRECTIONS_VERSION = 1
MEANS_VERSION = 1

_DIRECTION = "direction_"
_EXTRA = "extra_"
_MEAN = "mean_"


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
class LayerMeans:
    """What ``means.npz`` holds: ``means[reading]`` is ``[len(layers), hidden]``."""

    layers: list[int]
    means: dict[str, np.ndarray]
    path: str = ""

    def at(self, layer: int) -> dict[str, np.ndarray]:
        column = _column(self.layers, layer, self.path)
        return {name: vectors[column] for name, vectors in self.means.items()}


def write_means(path: str | Path, *, layers: Sequence[int], means: Mapping[str, np.ndarray]) -> None:
    np.savez(
        path,
        format_version=np.array(MEANS_VERSION),
        layers=np.array([int(layer) for layer in layers]),
        **{f"{_MEAN}{name}": np.asarray(value) for name, value in means.items()},
    )


def read_means(path: str | Path) -> LayerMeans:
    with np.load(path) as stored:
        _check_version(stored, path, MEANS_VERSION, "direction_means")
        return LayerMeans(
            layers=[int(value) for value in stored["layers"]],
            means={key.removeprefix(_MEAN): stored[key] for key in stored.files if key.startswith(_MEAN)},
            path=str(path),
        )


__all__ = [
    "DIRECTIONS_VERSION",
    "MEANS_VERSION",
    "LayerMeans",
    "ProbeDirections",
    "read_directions",
    "read_means",
    "write_directions",
    "write_means",
]
