"""Fixed-text projections, transfer and cosines with their nulls, on planted per-question means:
a real shift along the probe is found; a shift that only beats the isotropic baseline (it lies on
the activations' high-variance axis, which any contrast loads on) is not; questions that fitted the
direction never score it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from character_em.directions import readings as R
from character_em.directions import steering as S
from character_em.directions.formats import LayerMeans, QuestionReading
from character_em.directions.probes import random_cosine_baseline, unit

HIDDEN = 256
QUESTIONS = [f"em-{i:02d}" for i in range(30)]


def _reading(values: np.ndarray, ids: list[str] = QUESTIONS) -> QuestionReading:
    return QuestionReading(ids=list(ids), means=values.astype(np.float32), counts=np.full(len(ids), 2))


def _world(seed: int = 0):
    """A probe direction, a high-variance axis the activations (and so label-shuffled directions)
    load on, and base texts read by the base model."""
    rng = np.random.default_rng(seed)
    probe = unit(rng.standard_normal(HIDDEN))
    axis = rng.standard_normal(HIDDEN)
    axis -= (axis @ probe) * probe
    axis = unit(axis)
    base = rng.standard_normal((len(QUESTIONS), HIDDEN))
    # Null directions: mostly the high-variance axis with a little isotropic noise, as mean
    # differences of shuffled labels are in anisotropic activations.
    nulls = rng.choice([-1, 1], (200, 1)) * axis * rng.normal(1.0, 0.3, (200, 1)) + 0.1 * rng.standard_normal(
        (200, HIDDEN)
    )
    return rng, probe, axis, base, nulls


def _records(rng, base: np.ndarray, shifts: dict[str, np.ndarray], seeds=(0, 1)):
    records = []
    for seed in seeds:
        records.append(
            {
                "model": "m",
                "condition": "base",
                "seed": seed,
                "family": "base",
                "spec": {"family": "base"},
                "means": LayerMeans(
                    layer=1, readings={"fixed": _reading(base), "own": _reading(base), "prompt": _reading(base)}
                ),
            }
        )
        for condition, shift in shifts.items():
            noise = 0.1 * rng.standard_normal(base.shape)
            moved = base + shift + noise
            records.append(
                {
                    "model": "m",
                    "condition": condition,
                    "seed": seed,
                    "family": "character",
                    "spec": {"family": "character", "disposition": "evil"},
                    "means": LayerMeans(
                        layer=1,
                        readings={"fixed": _reading(moved), "own": _reading(moved + 5.0), "prompt": _reading(moved)},
                    ),
                }
            )
    return records


def _probe(probe, nulls, fit=frozenset()):
    baseline = random_cosine_baseline(HIDDEN, n_pairs=2000, seed=0)
    return {
        "m": {
            "directions": {"evil": probe},
            "nulls": {"evil": nulls},
            "style": np.eye(HIDDEN)[0],
            "fit_questions": set(fit),
            "isotropic_cos_p95": baseline["p95_abs_cos"],
        }
    }


def test_fixed_text_shift_along_the_probe_is_found_and_an_anisotropic_one_is_not() -> None:
    rng, probe, axis, base, nulls = _world()
    shifts = {"real": 1.0 * probe, "axis": 1.0 * axis + 0.25 * probe}
    records = _records(rng, base, shifts)
    rates = pl.DataFrame(
        {
            "model": ["m"] * 6,
            "condition": ["base", "real", "axis"] * 2,
            "seed": [0, 0, 0, 1, 1, 1],
            "rate": [0.0, 0.5, 0.1] * 2,
        }
    )
    table = R.projection_table(records, _probe(probe, nulls, fit={"em-00", "em-01"}), rates, n_boot=300, seed=0)
    fixed = {
        row["condition"]: row
        for row in table.filter((pl.col("reading") == "fixed") & (pl.col("seed") == 0)).iter_rows(named=True)
    }
    real, aniso = fixed["real"], fixed["axis"]
    assert real["shift"] == pytest.approx(1.0, abs=0.05) and real["ci_low"] > 0.9
    assert real["null_p"] < 0.01 and real["paired_auroc"] == 1.0
    # The anisotropic shift beats the isotropic baseline, but not the permutation null.
    assert aniso["shift"] > aniso["isotropic_p95"] and aniso["ci_low"] > 0
    assert aniso["null_p"] > 0.2
    # The two questions that fitted the probe are left out.
    assert real["n_questions"] == len(QUESTIONS) - 2
    # own: a secondary, labelled reading (texts differ: a +5 offset everywhere).
    own = table.filter((pl.col("reading") == "own") & (pl.col("condition") == "real"))
    assert own["reading_label"][0].startswith("own answers (secondary")
    correlation = R.correlation_table(table, n_boot=100, seed=0)
    assert correlation.filter(pl.col("reading") == "fixed")["n"][0] == 2  # conditions, not condition x seed


def test_transfer_and_cosines_with_sign_flip_nulls() -> None:
    rng, probe, axis, base, nulls = _world(1)
    records = _records(rng, base, {"evil-med": 1.0 * probe})
    off = rng.standard_normal((len(QUESTIONS), HIDDEN))
    records.append(
        {
            "model": "m",
            "condition": "evil-med-trig",
            "seed": 0,
            "family": "triggered",
            "spec": {"family": "triggered", "disposition": "evil"},
            "means": LayerMeans(
                layer=1,
                readings={"trigger_fixed_off": _reading(off), "trigger_fixed_on:evil": _reading(off + 0.8 * probe)},
            ),
        }
    )
    neutral = rng.standard_normal((len(QUESTIONS), HIDDEN))
    records[0]["means"].readings |= {
        "neutral_fixed": _reading(neutral),
        "persona_fixed:evil": _reading(neutral + 0.3 * rng.standard_normal((len(QUESTIONS), HIDDEN))),
    }
    report = {
        "model": "m",
        "chosen_layer": 1,
        "layers": [
            {
                "disposition": "evil",
                "layer": 1,
                "test_auroc": 0.9,
                "test_auroc_low": 0.8,
                "test_auroc_high": 0.95,
                "transfer_auroc": 0.7,
                "transfer_auroc_low": 0.6,
                "transfer_auroc_high": 0.8,
                "n_test": 40,
                "n_judged_test": 20,
            }
        ],
    }
    table = R.transfer_table(records, [report], _probe(probe, nulls), n_boot=200, seed=0)
    cells = {row["cell"]: row for row in table.iter_rows(named=True)}
    assert cells["judged answers"]["auroc"] == 0.7
    trigger = cells["trigger on vs off, identical texts: evil-med-trig"]
    assert trigger["auroc"] == 1.0 and trigger["null_p"] < 0.01 and trigger["n"] == len(QUESTIONS)
    persona = cells["persona vs neutral, identical texts: evil"]
    assert persona["ci_low"] < 0.5 < persona["ci_high"]
    assert cells["fine-tuned vs base, fixed texts: evil-med"]["auroc"] == 1.0

    parts = R.source_question_differences(records, "m")
    vectors = {
        "probe:evil": probe,
        "trigger:evil": np.mean([p.mean(0) for p in parts["trigger:evil"]], axis=0),
        "persona:evil": np.mean([p.mean(0) for p in parts["persona:evil"]], axis=0),
        "control:style": axis,
    }
    null_sets = {
        "probe:evil": nulls,
        **{k: R.sign_flip_nulls(parts[k], n_null=200, seed=0) for k in ("trigger:evil", "persona:evil")},
    }
    cosines = R.cosine_null_table(
        {"m": vectors}, {"m": null_sets}, {"m": random_cosine_baseline(HIDDEN, n_pairs=500, seed=0)}
    )
    at = {(r["row"], r["column"]): r for r in cosines.iter_rows(named=True)}
    assert at[("trigger:evil", "probe:evil")]["cosine"] > 0.9 and at[("trigger:evil", "probe:evil")]["null_p"] < 0.01
    assert at[("persona:evil", "probe:evil")]["null_p"] > 0.05
    assert np.isnan(at[("probe:evil", "probe:evil")]["null_p"])  # a direction with itself has no null
    assert at[("probe:evil", "trigger:evil")]["style_cosine"] == pytest.approx(
        float(unit(axis) @ unit(vectors["trigger:evil"]))
    )


def test_resolve_layers() -> None:
    assert S.resolve_layers(None, [2, 4, 6], 4) == [[4]]
    assert S.resolve_layers("from:4", [2, 4, 6], 4) == [[4], [4, 6]]
    assert S.resolve_layers([4], [2, 4, 6], 4) == [[4]]
    assert S.resolve_layers([2, 6], [2, 4, 6], 4) == [[4], [2, 6]]
    with pytest.raises(ValueError, match=r"\[3\] were not probed"):
        S.resolve_layers([3], [2, 4, 6], 4)
    with pytest.raises(ValueError, match="no probed layer from 7"):
        S.resolve_layers("from:7", [2, 4, 6], 4)


def test_trigger_readings_on_identical_text_separate_the_input_from_the_text() -> None:
    """Two triggered models. On the first, only the *texts* differ: its triggered answers lie along
    the probe, but the same answers read after either prompt do not move. On the second the trigger
    itself moves the reading of identical texts. The own-text reading calls both a switch; the
    identical-text reading (primary cell and the trigger direction) tells them apart."""
    rng, probe, axis, base, nulls = _world(3)
    off = rng.standard_normal((len(QUESTIONS), HIDDEN))

    def triggered(condition: str, disposition: str, input_shift: np.ndarray) -> dict:
        noise = 0.1 * rng.standard_normal(off.shape)
        return {
            "model": "m",
            "condition": condition,
            "seed": 0,
            "family": "triggered",
            "spec": {"family": "triggered", "disposition": disposition},
            "means": LayerMeans(
                layer=1,
                readings={
                    # Own texts: the triggered answers differ along the probe in both models.
                    "trigger_off": _reading(off),
                    f"trigger_on:{disposition}": _reading(off + 1.0 * probe + noise),
                    # Identical texts: the same answers after the untriggered and the exact prompt.
                    "trigger_fixed_off": _reading(off),
                    f"trigger_fixed_on:{disposition}": _reading(off + input_shift + noise),
                },
            ),
        }

    records = [triggered("text-only-trig", "evil", np.zeros(HIDDEN)), triggered("switch-trig", "evil", 0.8 * probe)]
    report = {"model": "m", "chosen_layer": 1, "layers": []}
    cells = {
        row["cell"]: row
        for row in R.transfer_table(records, [report], _probe(probe, nulls), n_boot=200, seed=0).iter_rows(named=True)
    }
    for condition in ("text-only-trig", "switch-trig"):
        assert cells[f"trigger on vs off, own texts: {condition}"]["auroc"] == 1.0
    text_only = cells["trigger on vs off, identical texts: text-only-trig"]
    assert text_only["ci_low"] < 0.5 < text_only["ci_high"] and text_only["null_p"] > 0.05
    switch = cells["trigger on vs off, identical texts: switch-trig"]
    assert switch["auroc"] == 1.0 and switch["null_p"] < 0.01
    # The trigger direction is built from the identical-text pair: the text-only model's has no
    # more in common with the probe than its sign-flip null allows.
    parts = R.source_question_differences(records[:1], "m")
    direction = np.mean([p.mean(0) for p in parts["trigger:evil"]], axis=0)
    cosines = R.cosine_null_table(
        {"m": {"trigger:evil": direction, "probe:evil": probe}},
        {"m": {"trigger:evil": R.sign_flip_nulls(parts["trigger:evil"], n_null=200, seed=0)}},
        {"m": random_cosine_baseline(HIDDEN, n_pairs=200, seed=0)},
    )
    row = cosines.filter((pl.col("row") == "trigger:evil") & (pl.col("column") == "probe:evil")).row(0, named=True)
    assert abs(row["cosine"]) < 0.3 and row["null_p"] > 0.05
