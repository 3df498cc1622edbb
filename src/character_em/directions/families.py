"""A probe trained in one model family, read in another: linear stitching between residual streams.

Two families (Llama 8B, hidden 4,096; Qwen 14B, hidden 5,120) have residual streams of different
widths and bases, so a direction of one means nothing in the other as it stands. Here:

- **Anchors.** Each model's ``probes`` job reads the same training-data files (they are per
  condition, not per model). The rows *past* ``eval.probes.max_examples`` of each file are never read
  by a probe and never scored; from them a fixed set of texts is chosen by the sha256 of each chat
  (the ``limit`` smallest keys: a deterministic, model-independent sample) and read at the model's
  chosen layer (``anchors.npz``). Two models' files share the texts whose keys agree.
- **Parts.** Each shared text falls in one of three parts by its key alone (``anchor_part``): ``fit``
  (the map's rows), ``val`` (chooses the ridge penalty) and ``test`` (reports how good the map is).
- **Map.** A ridge regression from model B's standardised activations to model A's (with intercepts),
  ``h_A ~ M h_B``, fitted in closed form through the anchors' Gram matrix (anchors are fewer than
  hidden units); the penalty is the one with the best held-out R^2 on ``val`` (averaged over A's
  units), then the map is refitted on ``fit`` and ``val``.
- **Mapped probe.** A's direction ``w_A`` becomes ``w_B = M^T w_A`` (on B's raw activations), so
  ``w_B . h_B`` equals ``w_A . (M h_B)`` up to a constant that every difference cancels. A's
  label-permutation null directions go through the same map, so the null p-value compares like with
  like. ``w_B`` is scored on B's cells exactly as B's own probe is (``readings.cell_transfer_rows``).
- **Map quality**, on the ``test`` anchors (texts that fitted neither the direction nor the map):
  ``map_r2`` (held-out R^2 of the whole map, mean over A's units), ``projection_r2`` (of ``w_A . h_A``
  predicted from B), and the AUROC of the mapped probe separating character from advice-control texts
  in B next to that of A's own direction on the same texts in A. A low map quality with chance
  transfer is a failed map, not evidence of no shared direction.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from character_em.directions.formats import Anchors
from character_em.directions.probes import Chat, auroc, bootstrap_interval, question_means
from character_em.directions.readings import TRANSFER_SCHEMA, cell_transfer_rows, transfer_cells
from character_em.hashing import sha256_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ANCHOR_PARTS = ("fit", "val", "test")
# Multiples of the mean squared norm of a standardised anchor row (the Gram matrix's mean diagonal),
# so one grid suits any width and any number of anchors.
PENALTIES = tuple(float(10.0**power) for power in np.arange(-4.0, 4.01, 0.5))
# Fewer shared texts than this in a part and no map is fitted: the table says so instead.
MIN_ANCHORS_PER_PART = 5
NO_SHARED_ANCHORS = "no shared anchor texts: map not fitted"
MAPPED_ANCHOR_CELL = "held-out anchor texts: mapped probe"
SOURCE_ANCHOR_CELL = "held-out anchor texts: probe in its own model"


# --------------------------------------------------------------------------- anchor texts


def anchor_key(chat: Chat) -> str:
    """The sha256 of a chat's canonical JSON: equal texts get equal keys in every model's file."""
    return sha256_json(list(chat))


def anchor_part(key: str) -> str:
    """``fit``, ``val`` or ``test`` from the key alone (3/5, 1/5, 1/5), so every pair of models
    splits the texts they share the same way."""
    return {0: "test", 1: "val"}.get(int(key[:8], 16) % 5, "fit")


def _rows_past(path: str | Path, skip: int) -> Iterator[Chat]:
    """The chats of a training-data file after its first ``skip`` (those a probe reads;
    ``probes.read_chats`` counts non-blank lines the same way)."""
    seen = 0
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            seen += 1
            if seen > skip:
                try:
                    yield json.loads(line)["messages"]
                except (json.JSONDecodeError, KeyError) as error:
                    raise ValueError(f"{path}:{number}: not a chat with `messages` ({error})") from error


def select_anchor_chats(
    files: Mapping[str, str | Path], *, skip: int, limit: int, exclude: Collection[str] = ()
) -> list[dict[str, Any]]:
    """The ``limit`` texts with the smallest keys among the rows past ``skip`` of each condition's
    data file (``files``: condition -> path), sorted by key; a text met twice counts once (the first
    condition in name order keeps it), and a key in ``exclude`` (the texts the probes read, should
    one file repeat another's probed row) never. Holds at most ``limit`` chats at a time.

    Returns [{"key", "condition", "chat"}]."""
    if limit <= 0:
        return []
    seen: set[str] = set(exclude)

    def candidates() -> Iterator[tuple[str, str, Chat]]:
        for condition in sorted(files):
            for chat in _rows_past(files[condition], skip):
                key = anchor_key(chat)
                if key not in seen:
                    seen.add(key)
                    yield key, condition, chat

    smallest = heapq.nsmallest(limit, candidates(), key=lambda item: item[0])
    return [{"key": key, "condition": condition, "chat": chat} for key, condition, chat in smallest]


def anchor_labels(
    conditions: Sequence[str], groups: Mapping[str, Mapping[str, Sequence[str]]]
) -> dict[str, np.ndarray]:
    """Per disposition: 1 for a text of one of its character conditions, 0 for an advice control
    (its ``negative`` conditions), -1 for anything else. ``groups`` as in ``probes.probe_examples``."""
    out = {}
    for disposition, group in groups.items():
        positive, negative = set(group["positive"]), set(group["negative"])
        out[disposition] = np.array(
            [1 if c in positive else 0 if c in negative else -1 for c in conditions], dtype=np.int8
        )
    return out


def anchor_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    selected: Sequence[Mapping[str, Any]],
    layer: int,
    groups: Mapping[str, Mapping[str, Sequence[str]]],
    *,
    batch_size: int,
    max_tokens: int,
) -> Anchors:
    """The response-token mean activation of each selected text at ``layer`` (streamed a batch at
    a time; one row per text is kept), with its condition and labels. Texts without a response
    after truncation drop out."""
    if not selected:
        hidden = int(model.config.hidden_size)
        return Anchors(layer=int(layer), keys=[], conditions=[], activations=np.zeros((0, hidden), np.float32))
    # One "question" per text: question_means then keeps exactly one row per key.
    got = question_means(
        model,
        tokenizer,
        [item["chat"] for item in selected],
        [item["key"] for item in selected],
        [int(layer)],
        batch_size=batch_size,
        max_tokens=max_tokens,
    )
    condition_of = {item["key"]: item["condition"] for item in selected}
    kept = [k for k, count in enumerate(got["counts"]) if count > 0]
    keys = [got["ids"][k] for k in kept]
    conditions = [condition_of[key] for key in keys]
    return Anchors(
        layer=int(layer),
        keys=keys,
        conditions=conditions,
        activations=got["means"][kept, 0].astype(np.float32),
        labels=anchor_labels(conditions, groups),
    )


# --------------------------------------------------------------------------- the map


def mean_r2(actual: np.ndarray, predicted: np.ndarray) -> float:
    """R^2 per column (against the column's own mean), averaged over columns that vary: every unit
    counts alike, so a few very large units do not decide it."""
    actual = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    predicted = np.asarray(predicted, dtype=np.float64).reshape(len(predicted), -1)
    if len(actual) < 2:
        return math.nan
    total = ((actual - actual.mean(axis=0)) ** 2).sum(axis=0)
    error = ((actual - predicted) ** 2).sum(axis=0)
    varies = total > 1e-12 * max(float(total.max()), 1e-300)
    if not varies.any():
        return math.nan
    return float(np.mean(1.0 - error[varies] / total[varies]))


@dataclass
class LinearMap:
    """``target ~ target_mean + z @ basis.T @ weights @ target_centred`` with
    ``z = (source - source_mean) / source_scale``: ridge regression in its dual form, where
    ``weights = (G + penalty * mean(diag(G)) * I)^-1``, ``G = basis @ basis.T`` over the rows the map
    was fitted on."""

    source_mean: np.ndarray
    source_scale: np.ndarray
    basis: np.ndarray  # [rows, source hidden], standardised
    weights: np.ndarray  # [rows, rows]
    target_mean: np.ndarray
    target_centred: np.ndarray  # [rows, target hidden]
    penalty: float  # relative: a multiple of the Gram matrix's mean diagonal
    validation_r2: dict[float, float] = field(default_factory=dict)

    def predict(self, source: np.ndarray) -> np.ndarray:
        z = (np.asarray(source, dtype=np.float64) - self.source_mean) / self.source_scale
        return self.target_mean + (z @ self.basis.T) @ (self.weights @ self.target_centred)

    def pull_back(self, directions: np.ndarray) -> np.ndarray:
        """[k, target hidden] directions -> [k, source hidden] with ``pulled . h`` =
        ``direction . predict(h)`` + a constant, for every source activation ``h``."""
        directions = np.atleast_2d(np.asarray(directions, dtype=np.float64))
        coefficients = self.weights @ (self.target_centred @ directions.T)  # [rows, k]
        return ((self.basis.T @ coefficients) / self.source_scale[:, None]).T


def _standardiser(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = rows.mean(axis=0)
    scale = rows.std(axis=0)
    # A unit constant over the anchors carries no information; dividing by ~0 would only amplify noise.
    return mean, np.where(scale > 1e-8 * max(float(scale.max(initial=0.0)), 1e-30), scale, 1.0)


def _dual_weights(gram: np.ndarray, penalty: float) -> np.ndarray:
    ridge = penalty * float(np.trace(gram)) / max(len(gram), 1)
    return np.linalg.inv(gram + max(ridge, 1e-12) * np.eye(len(gram)))


def fit_linear_map(
    source: np.ndarray, target: np.ndarray, parts: Sequence[str], *, penalties: Sequence[float] = PENALTIES
) -> LinearMap:
    """The ridge map from ``source`` rows to ``target`` rows (the same texts, in the same order).

    ``parts`` (``anchor_part`` of each row): the penalty is chosen by the R^2 on the ``val`` rows of
    maps fitted on the ``fit`` rows (ties to the stronger penalty), then the map is refitted on
    ``fit`` and ``val``. ``test`` rows are never touched here."""
    x = np.asarray(source, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    part = np.asarray(list(parts))
    if not (len(x) == len(y) == len(part)):
        raise ValueError(f"source ({len(x)}), target ({len(y)}) and parts ({len(part)}) must have one row per text")
    fit, val = part == "fit", part == "val"
    if fit.sum() < 2 or val.sum() < 2:
        raise ValueError(f"a ridge map needs at least 2 fit and 2 val rows; got {int(fit.sum())} and {int(val.sum())}")
    mean, scale = _standardiser(x[fit])
    z_fit, z_val = (x[fit] - mean) / scale, (x[val] - mean) / scale
    y_mean = y[fit].mean(axis=0)
    y_fit = y[fit] - y_mean
    gram = z_fit @ z_fit.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    cross = z_val @ z_fit.T @ eigenvectors
    rotated = eigenvectors.T @ y_fit
    mean_diagonal = float(np.trace(gram)) / len(gram)
    scores = {}
    for penalty in penalties:
        shrink = 1.0 / (eigenvalues + max(penalty * mean_diagonal, 1e-12))
        scores[float(penalty)] = mean_r2(y[val], y_mean + cross @ (shrink[:, None] * rotated))
    finite = {p: s for p, s in scores.items() if math.isfinite(s)}
    best = max(finite, key=lambda p: (finite[p], p)) if finite else float(max(penalties))
    rows = fit | val
    mean, scale = _standardiser(x[rows])
    basis = (x[rows] - mean) / scale
    y_mean = y[rows].mean(axis=0)
    return LinearMap(
        source_mean=mean,
        source_scale=scale,
        basis=basis,
        weights=_dual_weights(basis @ basis.T, best),
        target_mean=y_mean,
        target_centred=y[rows] - y_mean,
        penalty=best,
        validation_r2=scores,
    )


# --------------------------------------------------------------------------- the table


def _r2_of_column(actual: np.ndarray, predicted: np.ndarray) -> float:
    return mean_r2(np.asarray(actual)[:, None], np.asarray(predicted)[:, None])


def _anchor_auroc(labels: np.ndarray, scores: np.ndarray, *, n_boot: int, seed: int) -> tuple[float, float, float]:
    if len(set(labels.tolist())) < 2:
        return math.nan, math.nan, math.nan
    low, high = bootstrap_interval(labels, scores, auroc, n_boot=n_boot, seed=seed)
    return auroc(labels, scores), low, high


def family_transfer_table(
    records: Sequence[Mapping[str, Any]],
    probes: Mapping[str, Mapping[str, Any]],
    anchors: Mapping[str, Anchors],
    *,
    n_boot: int,
    seed: int,
    min_per_part: int = MIN_ANCHORS_PER_PART,
) -> pl.DataFrame:
    """Every model's probes read in every *other* model (rows of ``direction_transfer``, schema
    ``readings.TRANSFER_SCHEMA``): ``probe_model`` A's directions and nulls mapped into ``model`` B
    through the ridge map fitted on their shared anchors; the held-out anchor AUROCs of the mapped
    probe and of A's own; then B's cells (``readings.transfer_cells``, leaving out the questions that
    fitted A's probe) scored as B's own probe is. ``map_r2`` and ``projection_r2`` say how good the
    map is on held-out anchors. A pair with too few shared texts gets one row per disposition,
    ``NO_SHARED_ANCHORS``, with ``n`` the number it shares.

    probes: as for ``readings.transfer_table`` (``directions``, ``nulls``, ``fit_questions``,
    ``isotropic_cos_p95``; ``layer`` when known is checked against the anchors' layer)."""
    rows: list[dict[str, Any]] = []
    models = [model for model in probes if model in anchors]
    for model in models:
        _check_anchors(model, probes[model], anchors[model])
    for probe_model in models:
        for model in models:
            if model == probe_model:
                continue
            rows += _pair_rows(records, probes, anchors, probe_model, model, n_boot, seed, min_per_part)
    return pl.DataFrame(rows, schema=TRANSFER_SCHEMA)


def _check_anchors(model: str, probe: Mapping[str, Any], stored: Anchors) -> None:
    hidden = {len(vector) for vector in probe["directions"].values()}
    if stored.keys and hidden and {stored.activations.shape[1]} != hidden:
        raise ValueError(
            f"{stored.path or model}: anchors have {stored.activations.shape[1]} units, the probe directions of "
            f"{model} {sorted(hidden)}; rerun `probes` for {model}"
        )
    if "layer" in probe and int(probe["layer"]) != stored.layer:
        raise ValueError(
            f"{stored.path or model}: anchors read at layer {stored.layer}, the probes of {model} chose layer "
            f"{probe['layer']}; rerun `probes` for {model}"
        )


def _pair_rows(
    records: Sequence[Mapping[str, Any]],
    probes: Mapping[str, Mapping[str, Any]],
    anchors: Mapping[str, Anchors],
    probe_model: str,
    model: str,
    n_boot: int,
    seed: int,
    min_per_part: int,
) -> list[dict[str, Any]]:
    source, reader = probes[probe_model], probes[model]
    shared = sorted(set(anchors[probe_model].keys) & set(anchors[model].keys))
    parts = [anchor_part(key) for key in shared]
    counts = {name: parts.count(name) for name in ANCHOR_PARTS}
    identity = {"model": model, "probe_model": probe_model}
    if min(counts.values()) < min_per_part:
        log.warning(
            "%s -> %s: %d shared anchor texts (%s), fewer than %d in a part; no map fitted",
            probe_model,
            model,
            len(shared),
            counts,
            min_per_part,
        )
        nothing = dict.fromkeys(("auroc", "ci_low", "ci_high", "null_p", "map_r2", "projection_r2"), math.nan)
        return [
            {**identity, "disposition": d, "cell": NO_SHARED_ANCHORS, **nothing, "n": len(shared)}
            for d in source["directions"]
        ]
    target = anchors[probe_model].rows(shared).astype(np.float64)
    read = anchors[model].rows(shared).astype(np.float64)
    linear = fit_linear_map(read, target, parts)
    test = np.asarray(parts) == "test"
    test_keys = [key for key, part in zip(shared, parts, strict=True) if part == "test"]
    predicted = linear.predict(read[test])
    map_r2 = mean_r2(target[test], predicted)
    log.info(
        "%s -> %s: %d shared anchors %s, penalty %g, held-out map R^2 %.3f",
        probe_model,
        model,
        len(shared),
        counts,
        linear.penalty,
        map_r2,
    )
    mapped, mapped_nulls, quality, rows = {}, {}, {}, []
    for disposition, direction in source["directions"].items():
        w = np.asarray(direction, dtype=np.float64)
        mapped[disposition] = linear.pull_back(w)[0]
        nulls = np.asarray(source["nulls"].get(disposition, np.zeros((0, len(w)))), dtype=np.float64)
        mapped_nulls[disposition] = linear.pull_back(nulls) if len(nulls) else np.zeros((0, read.shape[1]))
        quality[disposition] = {"map_r2": map_r2, "projection_r2": _r2_of_column(target[test] @ w, predicted @ w)}
        labels = anchors[probe_model].labels_of(disposition, test_keys)
        member = labels >= 0
        for cell, scores in (
            (MAPPED_ANCHOR_CELL, read[test][member] @ mapped[disposition]),
            (SOURCE_ANCHOR_CELL, target[test][member] @ w),
        ):
            value, low, high = _anchor_auroc(labels[member], scores, n_boot=n_boot, seed=seed)
            rows.append(
                {
                    **identity,
                    "disposition": disposition,
                    "cell": cell,
                    "auroc": value,
                    "ci_low": low,
                    "ci_high": high,
                    "null_p": math.nan,
                    "n": int(member.sum()),
                    **quality[disposition],
                }
            )
    # A's fit questions: answers to them fitted the direction being scored, whoever wrote the text read.
    cells = transfer_cells([r for r in records if r["model"] == model], source["fit_questions"], model)
    for row in cell_transfer_rows(
        cells,
        mapped,
        mapped_nulls,
        isotropic_cos_p95=reader["isotropic_cos_p95"],
        n_boot=n_boot,
        seed=seed,
    ):
        rows.append({**identity, **row, **quality[row["disposition"]]})
    return rows


__all__ = [
    "ANCHOR_PARTS",
    "MAPPED_ANCHOR_CELL",
    "MIN_ANCHORS_PER_PART",
    "NO_SHARED_ANCHORS",
    "PENALTIES",
    "SOURCE_ANCHOR_CELL",
    "LinearMap",
    "anchor_activations",
    "anchor_key",
    "anchor_labels",
    "anchor_part",
    "family_transfer_table",
    "fit_linear_map",
    "mean_r2",
    "select_anchor_chats",
]
