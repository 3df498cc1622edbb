"""The probe protocol: grouped three-way splits, a layer chosen on validation and reported on test,
a data-to-judged readout, a control task, and the label-permutation and style nulls.

Why each piece (see docs/directions.md):
- Training data are written from templates, so one question appears many times with different
  wrappings (and, across the character, correct and incorrect conditions, with different answers).
  Rows are split by *group* (the underlying question; the em question for judged answers), so no
  sibling of a test row was seen in training.
- The layer is the one with the best *validation* AUROC; the *test* AUROC at that layer is what is
  reported. Selecting and reporting on the same rows overstates the maximum.
- A probe trained on the (templated) data only and tested on judged sampled answers asks whether
  the direction generalises beyond the wording of the data; a purely lexical difference does not.
- The control task refits the probe on labels shuffled within each source (data / judged): the
  AUROC a probe reaches on noise with the same rows, to subtract as in selectivity.
- Null directions are mean differences of the same training rows under shuffled labels: they share
  the activations' anisotropy (the high-variance axes any difference of texts tends to load on),
  which an isotropic random vector does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from character_em.directions.probes import auroc, load_layer

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- splits


def grouped_split(
    groups: Sequence[str],
    labels: Sequence[int],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    attempts: int = 200,
) -> dict[str, np.ndarray]:
    """Row indices of train / val / test with every group on one side only.

    Groups are dealt in a seeded random order: test until it holds ``test_fraction`` of the rows,
    then val, the rest train. A draw where a split lacks a class is redrawn (up to ``attempts``);
    if none works there are too few groups, and the error says so.
    """
    labels = np.asarray(labels, dtype=int)
    keys = np.asarray(list(groups), dtype=object)
    names, inverse = np.unique(keys.astype(str), return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(names))
    n = len(labels)
    rng = np.random.default_rng(seed)
    for _ in range(attempts):
        order = rng.permutation(len(names))
        side = np.zeros(len(names), dtype=int)  # 0 train, 1 val, 2 test
        filled = 0
        for group in order:
            if filled < test_fraction * n:
                side[group] = 2
            elif filled < (test_fraction + val_fraction) * n:
                side[group] = 1
            else:
                break
            filled += sizes[group]
        row_side = side[inverse]
        split = {name: np.flatnonzero(row_side == index) for index, name in enumerate(SPLITS)}
        if all(len(set(labels[rows].tolist())) == 2 for rows in split.values()):
            return split
    raise ValueError(
        f"no grouped split of {n} rows in {len(names)} question groups gives both classes in train, val and test; "
        "add questions or examples (eval.probes.max_examples / max_sampled)"
    )


def group_bootstrap(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: Sequence[str],
    *,
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the AUROC resampling whole groups (questions), the unit the split
    holds out: rows of one question are not independent evidence."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    names, inverse = np.unique(np.asarray(list(groups)).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        draw = np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
        value = auroc(labels[draw], scores[draw])
        if math.isfinite(value):
            values.append(value)
    if not values:
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


# --------------------------------------------------------------------------- one layer


def _fit(x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)


def mean_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0)).astype(np.float32)


def shuffled_labels(labels: np.ndarray, strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels permuted within each stratum (source kind), keeping every stratum's class balance."""
    out = labels.copy()
    for value in np.unique(strata):
        rows = np.flatnonzero(strata == value)
        out[rows] = labels[rng.permutation(rows)]
    return out


def _both(y: np.ndarray) -> bool:
    return len(set(np.asarray(y).tolist())) == 2


def evaluate_layer(
    features: np.ndarray,
    labels: np.ndarray,
    kinds: Sequence[str],
    groups: Sequence[str],
    split: Mapping[str, np.ndarray],
    *,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """Every readout of one layer. Returns (metrics row, the train-split mean-difference direction).

    val_auroc selects the layer; test_auroc (group-bootstrap interval) reports it. direction_*: the
    mean difference fitted on train, scored by projection. control_auroc: the same probe refitted on
    labels shuffled within source kind. transfer_auroc: a probe fitted on the *data* rows of the
    train split, scored on the *judged* rows of the test split (NaN when they lack a class).
    """
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=int)
    kind = np.asarray(list(kinds))
    group = np.asarray(list(groups)).astype(str)
    train, val, test = (np.asarray(split[name]) for name in SPLITS)
    probe = _fit(x[train], y[train])
    direction = mean_difference(x[train], y[train])
    val_scores = probe.decision_function(x[val])
    test_scores = probe.decision_function(x[test])
    low, high = group_bootstrap(y[test], test_scores, group[test], n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed + 7)
    control = _fit(x[train], shuffled_labels(y[train], kind[train], rng))
    row: dict[str, Any] = {
        "val_auroc": auroc(y[val], val_scores),
        "test_auroc": auroc(y[test], test_scores),
        "test_auroc_low": low,
        "test_auroc_high": high,
        "test_accuracy": float(np.mean((test_scores > 0).astype(int) == y[test])),
        "direction_val_auroc": auroc(y[val], x[val] @ direction),
        "direction_test_auroc": auroc(y[test], x[test] @ direction),
        "control_auroc": auroc(y[test], control.decision_function(x[test])),
    }
    row["selectivity"] = row["test_auroc"] - row["control_auroc"]
    data_train = train[kind[train] == "data"]
    judged_test = test[kind[test] == "judged"]
    transfer, t_low, t_high = math.nan, math.nan, math.nan
    if _both(y[data_train]) and _both(y[judged_test]):
        scores = _fit(x[data_train], y[data_train]).decision_function(x[judged_test])
        transfer = auroc(y[judged_test], scores)
        t_low, t_high = group_bootstrap(y[judged_test], scores, group[judged_test], n_boot=n_boot, seed=seed + 3)
    row |= {
        "transfer_auroc": transfer,
        "transfer_auroc_low": t_low,
        "transfer_auroc_high": t_high,
        "direction_norm": float(np.linalg.norm(direction)),
        **{f"n_{name}": int(len(split[name])) for name in SPLITS},
        "n_judged_test": int(len(judged_test)),
        "n_positive": int(y.sum()),
        "n_negative": int(len(y) - y.sum()),
    }
    return row, direction


# --------------------------------------------------------------------------- all layers


def selections(
    kept: Sequence[int],
    membership: Mapping[str, Mapping[str, Sequence[Any]]],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per disposition: its rows in the activation files, labels, kinds, groups and grouped split.
    Chats without a response (not in ``kept``) drop out here."""
    position = {chat: row for row, chat in enumerate(kept)}
    out = {}
    for disposition, member in membership.items():
        keep = [i for i, r in enumerate(member["rows"]) if r in position]
        rows = np.array([position[member["rows"][i]] for i in keep], dtype=int)
        labels = np.array([member["labels"][i] for i in keep], dtype=int)
        kinds = [member["kinds"][i] for i in keep]
        groups = [member["groups"][i] for i in keep]
        split = grouped_split(groups, labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        out[disposition] = {"rows": rows, "labels": labels, "kinds": kinds, "groups": groups, "split": split}
    return out


def run_protocol(
    folder: str,
    layers: Sequence[int],
    chosen: Mapping[str, Mapping[str, Any]],
    *,
    n_boot: int,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Evaluate every disposition at every layer, one layer's memmap at a time. ``chosen`` comes from
    ``selections``. Returns (rows, {disposition: [len(layers), hidden] train-split directions})."""
    rows: list[dict[str, Any]] = []
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in chosen}
    for layer in layers:
        matrix = load_layer(folder, layer)
        for disposition, sel in chosen.items():
            row, direction = evaluate_layer(
                np.asarray(matrix[sel["rows"]]),
                sel["labels"],
                sel["kinds"],
                sel["groups"],
                sel["split"],
                n_boot=n_boot,
                seed=seed,
            )
            rows.append({"disposition": disposition, "layer": int(layer), **row})
            vectors[disposition].append(direction)
        del matrix
    return rows, {name: np.stack(v) for name, v in vectors.items()}


def choose_layer(rows: Sequence[Mapping[str, Any]], fixed: int | None) -> int:
    """The configured layer, or the best *validation* probe AUROC averaged over dispositions
    (ties to the earlier layer). Test AUROC never enters the choice."""
    layers = sorted({int(row["layer"]) for row in rows})
    if fixed is not None:
        if fixed not in layers:
            raise ValueError(f"eval.probes.layer {fixed} is not among the probed layers {layers}")
        return int(fixed)
    means = {layer: np.nanmean([row["val_auroc"] for row in rows if row["layer"] == layer]) for layer in layers}
    return max(layers, key=lambda layer: (means[layer], -layer))


def null_directions(
    folder: str, layer: int, chosen: Mapping[str, Mapping[str, Any]], *, n_perm: int, seed: int
) -> dict[str, np.ndarray]:
    """[n_perm, hidden] mean differences of each disposition's train rows at ``layer`` under labels
    shuffled within source kind: the label-permutation null for cosines and projections."""
    matrix = load_layer(folder, layer)
    out = {}
    for disposition, sel in chosen.items():
        train = sel["split"]["train"]
        x = np.asarray(matrix[sel["rows"][train]], dtype=np.float32)
        y = sel["labels"][train]
        kind = np.asarray(sel["kinds"])[train]
        rng = np.random.default_rng(seed + 11)
        out[disposition] = np.stack([mean_difference(x, shuffled_labels(y, kind, rng)) for _ in range(n_perm)])
    return out


def style_direction(folder: str, layers: Sequence[int], rows: Sequence[int], labels: Sequence[int]) -> np.ndarray:
    """[len(layers), hidden] formal-minus-casual mean difference: the unrelated-contrast control."""
    y = np.asarray(labels, dtype=int)
    return np.stack([mean_difference(np.asarray(load_layer(folder, layer)[list(rows)]), y) for layer in layers])


# --------------------------------------------------------------------------- null statistics


def null_summary(observed: float, null: Sequence[float]) -> dict[str, float]:
    """Two-sided permutation p-value on |statistic| ((1 + hits) / (1 + draws), never 0) and the
    null's 95th percentile of |statistic|."""
    values = np.abs(np.asarray(null, dtype=float))
    values = values[np.isfinite(values)]
    if not values.size or not math.isfinite(observed):
        return {"null_p": math.nan, "null_p95": math.nan}
    hits = int((values >= abs(observed)).sum())
    return {"null_p": (1 + hits) / (1 + values.size), "null_p95": float(np.quantile(values, 0.95))}


__all__ = [
    "SPLITS",
    "choose_layer",
    "evaluate_layer",
    "example_counts",
    "fit_questions",
    "group_bootstrap",
    "grouped_split",
    "mean_difference",
    "null_directions",
    "null_summary",
    "run_protocol",
    "selections",
    "shuffled_labels",
    "style_direction",
]


def example_counts(
    membership: Mapping[str, Mapping[str, Sequence[Any]]], chosen: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per disposition: rows per source, per class, per split, and how many question groups."""
    out = {}
    for name, member in membership.items():
        sel = chosen[name]
        out[name] = {source: member["sources"].count(source) for source in sorted(set(member["sources"]))}
        out[name] |= {
            "positive": int(sel["labels"].sum()),
            "negative": int(len(sel["labels"]) - sel["labels"].sum()),
            "groups": len(set(sel["groups"])),
            **{split: int(len(sel["split"][split])) for split in SPLITS},
        }
    return out


def fit_questions(chosen: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Em question ids with a judged answer in any disposition's train split."""
    found = set()
    for sel in chosen.values():
        for i in sel["split"]["train"]:
            key = sel["groups"][i]
            if sel["kinds"][i] == "judged" and key.startswith("em:"):
                found.add(key.removeprefix("em:"))
    return sorted(found)
