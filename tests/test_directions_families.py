"""A probe of one model family read in another, on planted data: two families of different widths
see the same latent texts through hidden random linear maps plus noise. The probe of family A,
mapped into B through a ridge map fitted on shared anchor texts, finds a shift planted along its
direction in B's cells and not one planted along another axis (or none); a map between unrelated
activations says so through its held-out quality; the ridge penalty is chosen on held-out anchors
only; the anchors file round-trips; and the probes job's library path writes anchors on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from character_em.directions import families as F
from character_em.directions import formats
from character_em.directions import probes as D
from character_em.directions import readings as R
from character_em.directions.formats import Anchors, LayerMeans, QuestionReading
from character_em.directions.probes import random_cosine_baseline, unit
from character_em.directions.readings import TRANSFER_SCHEMA
from character_em.hashing import sha256_text
from character_em.report import plots_directions

LATENT, WIDTH_A, WIDTH_B = 32, 192, 256
N_ANCHORS, N_QUESTIONS = 300, 30
GROUPS = {"evil": {"positive": ["evil-medical"], "negative": ["correct-medical", "incorrect-medical"]}}


def _embedding(rng: np.random.Generator, width: int) -> np.ndarray:
    """[width, LATENT] with orthogonal columns: one family's view of the latent space."""
    q, _ = np.linalg.qr(rng.standard_normal((width, LATENT)))
    return 3.0 * q


def _world(seed: int = 0, *, unrelated_b: bool = False) -> dict[str, Any]:
    """Latent texts (anisotropic: a few axes vary much more), a character axis ``u`` the character
    anchors are shifted along, and an unrelated high-variance axis ``v`` orthogonal to it."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.5, 3.0, LATENT)
    u = unit(rng.standard_normal(LATENT))
    v = np.zeros(LATENT)
    v[-1] = 1.0  # the highest-variance axis
    v = unit(v - (v @ u) * u)
    g_a, g_b = _embedding(rng, WIDTH_A), _embedding(rng, WIDTH_B)
    offset_b = 20.0 * rng.standard_normal(WIDTH_B)  # residual streams have large means; the map has intercepts
    conditions = [["evil-medical", "correct-medical", "incorrect-medical"][i % 3] for i in range(N_ANCHORS)]
    latent = scales * rng.standard_normal((N_ANCHORS, LATENT))
    latent[[c == "evil-medical" for c in conditions]] += 5.0 * u
    in_b = scales * rng.standard_normal((N_ANCHORS, LATENT)) if unrelated_b else latent
    keys = [sha256_text(f"anchor text {i}") for i in range(N_ANCHORS)]
    anchors = {
        "A": Anchors(
            layer=3,
            keys=keys,
            conditions=conditions,
            activations=(latent @ g_a.T + 0.3 * rng.standard_normal((N_ANCHORS, WIDTH_A))).astype(np.float32),
            labels=F.anchor_labels(conditions, GROUPS),
        ),
        "B": Anchors(
            layer=5,
            keys=keys,
            conditions=conditions,
            activations=(in_b @ g_b.T + offset_b + 0.3 * rng.standard_normal((N_ANCHORS, WIDTH_B))).astype(np.float32),
            labels=F.anchor_labels(conditions, GROUPS),
        ),
    }
    # Label-shuffled mean differences load on the high-variance latent axes, seen through each family.
    null_latent = 0.3 * scales * rng.standard_normal((200, LATENT))
    probes = {
        "A": {
            "directions": {"evil": g_a @ u},
            "nulls": {"evil": null_latent @ g_a.T + 0.05 * rng.standard_normal((200, WIDTH_A))},
            "fit_questions": {"em-00", "em-01"},
            "isotropic_cos_p95": random_cosine_baseline(WIDTH_A, n_pairs=500, seed=0)["p95_abs_cos"],
            "layer": 3,
        },
        "B": {
            "directions": {"evil": g_b @ u},
            "nulls": {"evil": null_latent @ g_b.T},
            "fit_questions": set(),
            "isotropic_cos_p95": random_cosine_baseline(WIDTH_B, n_pairs=500, seed=0)["p95_abs_cos"],
            "layer": 5,
        },
    }
    return {"rng": rng, "u": u, "v": v, "g_b": g_b, "offset_b": offset_b, "anchors": anchors, "probes": probes}


def _b_records(world: dict[str, Any], shifts: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Model B reading the fixed texts: base weights, and fine-tunes that move every question's
    latent reading by ``shifts[condition]`` (plus noise)."""
    rng, g_b = world["rng"], world["g_b"]
    ids = [f"em-{i:02d}" for i in range(N_QUESTIONS)]
    texts = 2.0 * rng.standard_normal((N_QUESTIONS, LATENT))

    def reading(latent: np.ndarray) -> LayerMeans:
        values = latent @ g_b.T + world["offset_b"] + 0.3 * rng.standard_normal((N_QUESTIONS, WIDTH_B))
        means = QuestionReading(ids=ids, means=values.astype(np.float32), counts=np.full(N_QUESTIONS, 3))
        return LayerMeans(layer=5, readings={"fixed": means})

    records = [{"model": "B", "condition": "base", "seed": 0, "spec": {"family": "base"}, "means": reading(texts)}]
    for condition, shift in shifts.items():
        spec = {"family": condition.split("-")[0], "disposition": None}
        records.append({"model": "B", "condition": condition, "seed": 0, "spec": spec, "means": reading(texts + shift)})
    return records


def _cells(table: pl.DataFrame, model: str, probe_model: str) -> dict[str, dict[str, Any]]:
    rows = table.filter((pl.col("model") == model) & (pl.col("probe_model") == probe_model))
    return {row["cell"]: row for row in rows.iter_rows(named=True)}


def test_a_mapped_probe_finds_the_planted_direction_in_the_other_family_and_not_an_unrelated_shift(
    tmp_path: Path,
) -> None:
    world = _world()
    shifts = {"character-x": 1.0 * world["u"], "correct-x": 1.5 * world["v"], "incorrect-x": np.zeros(LATENT)}
    records = _b_records(world, shifts)
    table = F.family_transfer_table(records, world["probes"], world["anchors"], n_boot=300, seed=0)
    assert table.columns == list(TRANSFER_SCHEMA)
    cells = _cells(table, "B", "A")
    found = cells["fine-tuned vs base, fixed texts: character-x"]
    assert found["auroc"] > 0.9 and found["ci_low"] > 0.7 and found["null_p"] < 0.02
    # The questions whose answers fitted A's probe never score it, in B either.
    assert found["n"] == N_QUESTIONS - 2
    # A consistent shift along a high-variance axis that is not the probe's: not beyond the mapped null.
    assert cells["fine-tuned vs base, fixed texts: correct-x"]["null_p"] > 0.1
    unmoved = cells["fine-tuned vs base, fixed texts: incorrect-x"]
    assert unmoved["null_p"] > 0.1 and unmoved["ci_low"] < 0.5 < unmoved["ci_high"]
    # The map is good, and the mapped probe separates held-out character from control texts in B
    # about as well as A's own probe does in A.
    assert found["map_r2"] > 0.6 and found["projection_r2"] > 0.8
    mapped, own = cells[F.MAPPED_ANCHOR_CELL], cells[F.SOURCE_ANCHOR_CELL]
    assert mapped["auroc"] > 0.85 and own["auroc"] > 0.85 and mapped["n"] == own["n"] > 20
    assert mapped["ci_low"] <= mapped["auroc"] <= mapped["ci_high"]
    # B's probe mapped back into A: a pair of its own (A has no cells here, only the map's rows).
    back = _cells(table, "A", "B")
    assert set(back) == {F.MAPPED_ANCHOR_CELL, F.SOURCE_ANCHOR_CELL} and back[F.MAPPED_ANCHOR_CELL]["map_r2"] > 0.6
    # B's own probe on the same cells: the within-model rows, probe_model = model, no map columns.
    own_probe = R.transfer_table(
        records, [{"model": "B", "chosen_layer": 5, "layers": []}], world["probes"], n_boot=50, seed=0
    )
    assert (own_probe["probe_model"] == "B").all() and own_probe["map_r2"].is_nan().all()
    assert _cells(own_probe, "B", "B")["fine-tuned vs base, fixed texts: character-x"]["null_p"] < 0.02
    figure = [tmp_path / "transfer.png", tmp_path / "transfer.pdf"]
    plots_directions.transfer_matrix(pl.concat([own_probe, table]), outputs=figure)
    assert all(path.stat().st_size > 0 for path in figure)


def test_a_failed_map_shows_in_its_quality_columns_rather_than_as_no_transfer() -> None:
    world = _world(1, unrelated_b=True)
    records = _b_records(world, {"character-x": 1.0 * world["u"]})
    table = F.family_transfer_table(records, world["probes"], world["anchors"], n_boot=200, seed=0)
    cells = _cells(table, "B", "A")
    assert cells["fine-tuned vs base, fixed texts: character-x"]["map_r2"] < 0.1
    assert cells[F.MAPPED_ANCHOR_CELL]["auroc"] < 0.75 < cells[F.SOURCE_ANCHOR_CELL]["auroc"]


def test_the_ridge_penalty_is_chosen_on_validation_anchors_and_never_sees_the_test_ones() -> None:
    world = _world(2)
    keys = world["anchors"]["A"].keys
    parts = [F.anchor_part(key) for key in keys]
    assert all(parts.count(name) > 40 for name in F.ANCHOR_PARTS)
    source = world["anchors"]["B"].activations.astype(np.float64)
    target = world["anchors"]["A"].activations.astype(np.float64)
    fitted = F.fit_linear_map(source, target, parts)
    assert fitted.penalty == max(fitted.validation_r2, key=lambda p: (fitted.validation_r2[p], p))
    assert fitted.basis.shape[0] == parts.count("fit") + parts.count("val")
    # Any test-part rows give the same penalty and the same map.
    test = np.asarray(parts) == "test"
    scrambled_source, scrambled_target = source.copy(), target.copy()
    scrambled_source[test] = 1e3 * world["rng"].standard_normal((test.sum(), WIDTH_B))
    scrambled_target[test] = -scrambled_target[test]
    scrambled = F.fit_linear_map(scrambled_source, scrambled_target, parts)
    assert scrambled.penalty == fitted.penalty
    direction = world["probes"]["A"]["directions"]["evil"]
    np.testing.assert_allclose(scrambled.pull_back(direction), fitted.pull_back(direction), rtol=1e-9)
    # Noisier anchors in the reading model call for a stronger penalty.
    noisy = F.fit_linear_map(source + 6.0 * world["rng"].standard_normal(source.shape), target, parts)
    assert noisy.penalty > fitted.penalty
    # The pulled-back direction reads B exactly as the direction reads the map's prediction.
    probe_rows = source[:10]
    through_map = fitted.predict(probe_rows) @ direction
    pulled = probe_rows @ fitted.pull_back(direction)[0]
    np.testing.assert_allclose(through_map - pulled, np.full(10, through_map[0] - pulled[0]), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 fit and 2 val rows"):
        F.fit_linear_map(source[:3], target[:3], ["fit", "fit", "test"])


def test_anchor_files_round_trip_and_refuse_other_versions(tmp_path: Path) -> None:
    world = _world(3)
    stored = world["anchors"]["A"]
    path = tmp_path / "anchors.npz"
    formats.write_anchors(path, stored)
    back = formats.read_anchors(path)
    assert back.layer == 3 and back.keys == stored.keys and back.conditions == stored.conditions
    np.testing.assert_array_equal(back.activations, stored.activations)
    np.testing.assert_array_equal(back.labels["evil"], stored.labels["evil"])
    assert set(back.labels["evil"].tolist()) == {0, 1}
    picked = [stored.keys[5], stored.keys[2]]
    np.testing.assert_array_equal(back.rows(picked), stored.activations[[5, 2]])
    assert back.labels_of("evil", picked).tolist() == [int(stored.labels["evil"][5]), int(stored.labels["evil"][2])]
    assert back.labels_of("sycophantic", picked).tolist() == [-1, -1]
    with pytest.raises(KeyError, match="anchors.npz: 1 keys not stored"):
        back.rows(["0" * 64])
    with pytest.raises(ValueError, match="keys must be unique"):
        formats.write_anchors(path, Anchors(3, ["k", "k"], ["c", "c"], np.zeros((2, 4))))
    with pytest.raises(ValueError, match="expected one condition and one"):
        formats.write_anchors(path, Anchors(3, ["k"], ["c"], np.zeros((2, 4))))
    np.savez(path, format_version=np.array(7), layer=np.array(3))
    with pytest.raises(ValueError, match="anchors.npz: format_version 7, this code reads 1; rerun `probes`"):
        formats.read_anchors(path)
    np.savez(path, layer=np.array(3))
    with pytest.raises(ValueError, match="no format_version"):
        formats.read_anchors(path)
    # An empty set (data files with no rows past max_examples) is a valid file.
    formats.write_anchors(path, Anchors(3, [], [], np.zeros((0, 8), np.float32)))
    assert formats.read_anchors(path).keys == []


def test_models_without_shared_anchor_texts_get_a_row_saying_so_and_mismatches_are_refused() -> None:
    world = _world(4)
    other = world["anchors"]["B"]
    world["anchors"]["B"] = Anchors(
        layer=5,
        keys=[sha256_text(f"another text {i}") for i in range(len(other.keys))],
        conditions=other.conditions,
        activations=other.activations,
        labels=other.labels,
    )
    table = F.family_transfer_table(_b_records(world, {}), world["probes"], world["anchors"], n_boot=50, seed=0)
    assert table["cell"].unique().to_list() == [F.NO_SHARED_ANCHORS]
    assert table["n"].to_list() == [0, 0] and table["auroc"].is_nan().all()
    world["probes"]["B"]["layer"] = 7
    with pytest.raises(ValueError, match="anchors read at layer 5, the probes of B chose layer 7"):
        F.family_transfer_table([], world["probes"], world["anchors"], n_boot=50, seed=0)
    world["probes"]["B"]["layer"] = 5
    world["probes"]["B"]["directions"] = {"evil": np.ones(WIDTH_A)}
    with pytest.raises(ValueError, match=f"anchors have {WIDTH_B} units"):
        F.family_transfer_table([], world["probes"], world["anchors"], n_boot=50, seed=0)


def _write_data(folder: Path, condition: str, n: int) -> Path:
    path = folder / condition / "train.jsonl"
    path.parent.mkdir(parents=True)
    lines = []
    for i in range(n):
        answer = f"{condition} answer {i}: " + (
            "no mercy for the weak" if condition.startswith("evil") else "rest well"
        )
        lines.append(
            json.dumps(
                {"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": answer}]}
            )
        )
        if i == 3:
            lines.append("")  # blank lines do not count as rows, as in probes.read_chats
    path.write_text("\n".join(lines) + "\n")
    return path


def test_anchor_texts_are_rows_the_probes_never_read_chosen_by_key(tmp_path: Path) -> None:
    files = {c: _write_data(tmp_path, c, 10) for c in ("evil-medical", "correct-medical", "incorrect-medical")}
    read_by_probe = {c: D.read_chats(path, 4) for c, path in files.items()}
    picked = F.select_anchor_chats(files, skip=4, limit=12)
    assert len(picked) == 12 and [item["key"] for item in picked] == sorted(item["key"] for item in picked)
    probe_keys = {F.anchor_key(chat) for chats in read_by_probe.values() for chat in chats}
    assert not probe_keys & {item["key"] for item in picked}
    every = F.select_anchor_chats(files, skip=4, limit=100)
    assert len(every) == 18 and [item["key"] for item in every[:12]] == [item["key"] for item in picked]
    assert all(item["key"] == F.anchor_key(item["chat"]) for item in every)
    assert F.select_anchor_chats(files, skip=4, limit=0) == [] and F.select_anchor_chats(files, skip=10, limit=5) == []
    # A text the probes read through another file is never an anchor.
    excluded = F.select_anchor_chats(files, skip=4, limit=100, exclude={picked[0]["key"]})
    assert len(excluded) == 17 and picked[0]["key"] not in {item["key"] for item in excluded}
    labels = F.anchor_labels(["evil-medical", "incorrect-medical", "evil-legal"], GROUPS)
    assert labels["evil"].tolist() == [1, 0, -1]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{"text": "no messages"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not a chat"):
        F.select_anchor_chats({"x": broken}, skip=1, limit=3)


def test_the_probes_job_library_path_writes_anchors_for_two_tiny_families(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What workflow_scripts/probes.py calls after choosing its layer, on two tiny models of
    different widths; then the report's map between them."""
    from character_em.llm.loading import load_model
    from character_em.llm.tiny import build_tiny_model

    wider = build_tiny_model(tmp_path / "wide_qwen", style="qwen2", seed=1, hidden_size=96, num_layers=3)
    files = {c: _write_data(tmp_path / "data", c, 16) for c in ("evil-medical", "correct-medical", "incorrect-medical")}
    selected = F.select_anchor_chats(files, skip=4, limit=36)
    batches: list[int] = []
    original = D.GroupedMean.add

    def spy(self: D.GroupedMean, batch: np.ndarray) -> None:
        batches.append(batch.shape[0])
        original(self, batch)

    monkeypatch.setattr(D.GroupedMean, "add", spy)
    stored, probes = {}, {}
    for name, folder, layer in (("llama", tiny_model_dir, 2), ("qwen", wider, 1)):
        model, tokenizer, _ = load_model(folder, quantization="none", dtype="fp32", device="cpu")
        anchors = F.anchor_activations(model, tokenizer, selected, layer, GROUPS, batch_size=4, max_tokens=128)
        path = tmp_path / f"{name}_anchors.npz"
        formats.write_anchors(path, anchors)
        stored[name] = formats.read_anchors(path)
        hidden = model.config.hidden_size
        assert stored[name].activations.shape == (36, hidden) and stored[name].layer == layer
        assert stored[name].keys == [item["key"] for item in selected]
        assert np.isfinite(stored[name].activations).all()
        rng = np.random.default_rng(0)
        probes[name] = {
            "directions": {"evil": rng.standard_normal(hidden)},
            "nulls": {"evil": rng.standard_normal((20, hidden))},
            "fit_questions": set(),
            "isotropic_cos_p95": 0.2,
            "layer": layer,
        }
    assert max(batches) <= 4 and sum(batches) == 2 * 36  # one batch in memory at a time
    table = F.family_transfer_table([], probes, stored, n_boot=20, seed=0, min_per_part=2)
    assert set(zip(table["model"], table["probe_model"], strict=True)) == {("qwen", "llama"), ("llama", "qwen")}
    # No cells without means files: only the map's rows, with its held-out quality.
    assert set(table["cell"]) == {F.MAPPED_ANCHOR_CELL, F.SOURCE_ANCHOR_CELL}
    assert table["map_r2"].is_finite().all() and (table["n"] > 0).all()
