"""Claim 4 on planted data: control directions at matched norm, the claim rows for steering (own
direction against its controls), for the identical-text trigger and persona readings, and for the
fixed-text projection against misalignment across conditions; and the distributions behind their
p-values."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from test_directions_readings import HIDDEN, QUESTIONS, _probe, _reading, _world

from character_em.directions import steering as S
from character_em.directions.formats import LayerMeans, ProbeDirections
from character_em.report import direction_claims as C

# --------------------------------------------------------------------------- controls


def _stored(hidden: int = 16, layers: tuple[int, ...] = (2, 4, 6)) -> ProbeDirections:
    rng = np.random.default_rng(0)
    directions = {name: rng.standard_normal((len(layers), hidden)) * (1 + k) for k, name in enumerate(["evil", "sly"])}
    return ProbeDirections(
        layers=list(layers),
        chosen_layer=4,
        directions=directions,
        extra={"style": rng.standard_normal((len(layers), hidden)) * 7},
        path="directions.npz",
    )


def test_control_directions_match_the_own_norm_at_every_layer() -> None:
    stored = _stored()
    layers = [2, 4, 6]
    own = S.control_vectors(stored, "evil", "own", layers, seed=0)
    for control, other in (("random", None), ("style", None), ("disposition", "sly")):
        vectors = S.control_vectors(stored, "evil", control, layers, seed=0, other=other)
        for k, layer in enumerate(layers):
            assert np.linalg.norm(vectors[layer]) == pytest.approx(np.linalg.norm(own[layer]), rel=1e-5)
            reference = {"style": stored.extra["style"][k], "disposition": stored.directions["sly"][k]}.get(control)
            if reference is not None:  # the stored direction, rescaled
                cosine = vectors[layer] @ reference / np.linalg.norm(vectors[layer]) / np.linalg.norm(reference)
                assert cosine == pytest.approx(1.0, abs=1e-5)
    # The random direction is drawn afresh per layer and disposition, and again alike on a rerun.
    random = S.control_vectors(stored, "evil", "random", layers, seed=0)
    assert not np.allclose(random[2], random[4])
    assert np.array_equal(random[4], S.control_vectors(stored, "evil", "random", [4], seed=0)[4])
    assert not np.allclose(random[4], S.control_vectors(stored, "sly", "random", [4], seed=0)[4])
    assert abs(random[4] @ own[4]) / np.linalg.norm(own[4]) ** 2 < 0.8
    with pytest.raises(ValueError, match="needs another stored disposition"):
        S.control_vectors(stored, "evil", "disposition", layers, seed=0, other=None)
    with pytest.raises(ValueError, match="one of"):
        S.control_vectors(stored, "evil", "noise", layers, seed=0)
    assert (
        S.other_disposition("evil", ["sly", "evil"]) == "sly" and S.other_disposition("sly", ["sly", "evil"]) == "evil"
    )
    assert S.other_disposition("evil", ["evil"]) is None


def test_arm_sets_sample_the_unsteered_arm_once_and_controls_at_the_same_strengths() -> None:
    vectors = S.control_vectors(_stored(), "evil", "own", [2, 4], seed=0)
    sets = [[4], [2, 4]]
    own = S.plan_arms(
        kind="add",
        direction="evil",
        control="own",
        vector="evil",
        vectors=vectors,
        layer_sets=sets,
        strengths=[0, 1, 2],
    )
    assert [arm.name for arm in own] == [
        "unsteered",
        "own-evil_L4_s1",
        "own-evil_L4_s2",
        "own-evil_L2-4_s1",
        "own-evil_L2-4_s2",
    ]
    control = S.plan_arms(
        kind="add",
        direction="evil",
        control="style",
        vector="style",
        vectors=vectors,
        layer_sets=sets,
        strengths=[0, 1, 2],
    )
    assert [(arm.strength, arm.layers) for arm in control] == [(arm.strength, arm.layers) for arm in own[1:]]
    assert own[0].columns() | {"arm": "x"} == {
        "intervention": "add",
        "direction": "evil",
        "control": "unsteered",
        "vector": "none",
        "layers": "none",
        "strength": 0.0,
        "arm": "x",
    }


# --------------------------------------------------------------------------- steering claims


def _answers(rates: dict[tuple[str, str, str], float], *, kind: str, seed: int = 0) -> pl.DataFrame:
    """Labelled steered answers: (condition, direction, control) -> the misaligned share of that arm
    at each of two nonzero strengths (the unsteered arm at 0.05), 30 questions x 8 answers, each
    question with its own offset (questions differ, as real ones do)."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 0.05, len(QUESTIONS))
    rows = []
    arms = [(c, d, ctl, s) for (c, d, ctl) in rates for s in (1.0, 2.0)]
    arms += [(c, d, "unsteered", 0.0) for c, d in {(c, d) for c, d, _ in rates}]
    for condition, direction, control, strength in arms:
        rate = rates[(condition, direction, control)] if control != "unsteered" else 0.05
        for q, question in enumerate(QUESTIONS):
            flags = rng.random(8) < np.clip(rate + offsets[q], 0, 1)
            for flag in flags:
                rows.append(
                    {
                        "model": "m",
                        "condition": condition,
                        "seed": 0,
                        "training_run": f"{condition}/seed0",
                        "question_id": question,
                        "intervention": kind,
                        "direction": direction,
                        "control": control,
                        "vector": direction if control == "own" else control,
                        "layers": "4",
                        "strength": strength,
                        "judged": True,
                        "misaligned": bool(flag),
                        "expressed": bool(flag),
                    }
                )
    return pl.DataFrame(rows)


def _claims(answers: pl.DataFrame) -> dict[tuple[str, str, str], dict]:
    rows = C.steering_claims(answers, n_boot=400, seed=0)
    return {(row["contrast"], row["scope"].rsplit("/", 1)[1], row["b"], row["metric"]): row for row in rows}


def test_steering_rows_separate_the_direction_from_a_push_of_the_same_size() -> None:
    controls = ("random", "style")
    # Adding the direction makes half the answers misaligned; the controls at the same norm barely move.
    specific = {("base", "evil", "own"): 0.5, **{("base", "evil", c): 0.08 for c in controls}}
    rows = _claims(_answers(specific, kind="add"))
    largest = rows[
        ("steer_add_own_vs_controls", "pooled", "add largest of random, style control at matched norm", "misaligned")
    ]
    assert largest["estimate"] == pytest.approx(0.42, abs=0.1) and largest["p_value"] < 0.01
    assert largest["ci_low"] > 0.25 and largest["n_questions"] == len(QUESTIONS) and largest["n_runs"] == 1
    assert (
        rows[("steer_add_own_vs_control", "pooled", "add random control at matched norm", "misaligned")]["p_value"]
        < 0.01
    )
    # Any push of that size does it: the own direction's effect is no larger than a control's.
    generic = {("base", "evil", "own"): 0.5, ("base", "evil", "random"): 0.5, ("base", "evil", "style"): 0.1}
    rows = _claims(_answers(generic, kind="add", seed=1))
    largest = rows[
        ("steer_add_own_vs_controls", "pooled", "add largest of random, style control at matched norm", "misaligned")
    ]
    assert largest["ci_low"] < 0 < largest["ci_high"] and largest["p_value"] > 0.05
    # ... though against the style control alone it looks specific: the largest control is the test.
    assert (
        rows[("steer_add_own_vs_control", "pooled", "add style control at matched norm", "misaligned")]["p_value"]
        < 0.01
    )


def test_ablation_rows_pool_the_character_conditions_of_a_disposition() -> None:
    # Ablating evil's own direction lowers misalignment from 0.4; ablating a control leaves it there.
    rates = {}
    for condition in ("evil-medical", "evil-legal", "evil-finance"):
        rates |= {
            (condition, "evil", "own"): 0.1,
            (condition, "evil", "random"): 0.4,
            (condition, "evil", "style"): 0.38,
        }
    rows = _claims(_answers(rates, kind="ablate"))
    pooled = rows[
        (
            "steer_ablate_own_vs_controls",
            "pooled",
            "ablate largest of random, style control at matched norm",
            "misaligned",
        )
    ]
    # The reduction beyond the largest control's reduction: min(control rates) - own rate.
    assert pooled["estimate"] == pytest.approx(0.28, abs=0.06) and pooled["p_value"] < 0.01
    assert pooled["n_runs"] == 3 and "evil-finance, evil-legal, evil-medical" in pooled["a"]
    assert (
        "steer_ablate_own_vs_controls",
        "pooled",
        "ablate largest of random, style control at matched norm",
        "expressed (own disposition's direction)",
    ) in rows


def test_steering_rows_pool_over_dispositions() -> None:
    rates = {("base", "evil", "own"): 0.5, ("base", "evil", "random"): 0.1}
    rates |= {("base", "sly", "own"): 0.3, ("base", "sly", "random"): 0.1}
    rows = _claims(_answers(rates, kind="add"))
    pooled = rows[("steer_add_own_vs_control", "pooled", "add random control at matched norm", "misaligned")]
    assert pooled["estimate"] == pytest.approx(0.3, abs=0.06) and pooled["p_value"] < 0.01
    assert pooled["n_runs"] == 1  # one base model, whichever direction it is steered along
    # With several dispositions each has its rows too; the chosen layer is named in the scope.
    sly = rows[("steer_add_own_vs_control", "sly", "add random control at matched norm", "misaligned")]
    assert sly["estimate"] == pytest.approx(0.2, abs=0.06) and "sly direction" in sly["a"]
    [row] = [r for r in C.steering_claims(_answers(rates, kind="add"), chosen_layers={"m": 4}, n_boot=50, seed=0)][:1]
    assert row["scope"].startswith("em/steering/layers 4 (chosen layer)/")


# --------------------------------------------------------------------------- reading claims


def _triggered(rng, condition: str, seed: int, shift: np.ndarray) -> dict:
    off = rng.standard_normal((len(QUESTIONS), HIDDEN))
    noise = 0.3 * rng.standard_normal(off.shape)
    return {
        "model": "m",
        "condition": condition,
        "seed": seed,
        "family": "triggered",
        "spec": {"family": "triggered", "disposition": "evil"},
        "means": LayerMeans(
            layer=1,
            readings={"trigger_fixed_off": _reading(off), "trigger_fixed_on:evil": _reading(off + shift + noise)},
        ),
    }


def _reading_rows(records, probe, nulls) -> dict[tuple[str, str], dict]:
    rows = C.reading_claims(records, _probe(probe, nulls), n_boot=400, seed=0)
    return {(row["contrast"], row["scope"].rsplit("/", 1)[1]): row for row in rows}


def test_identical_text_reading_rows_need_a_shift_across_questions_runs_and_specific_to_the_probe() -> None:
    rng, probe, axis, base, nulls = _world(4)
    conditions = [("evil-medical-trig", s) for s in (0, 1, 2)] + [("evil-legal-trig", s) for s in (0, 1, 2)]
    # The trigger moves identical texts along the probe in every triggered model.
    real = [_triggered(rng, c, s, 0.6 * probe) for c, s in conditions]
    row = _reading_rows(real, probe, nulls)[("trigger_reading_identical_text", "pooled")]
    assert row["estimate"] == pytest.approx(0.6, abs=0.1) and row["ci_low"] > 0.4 and row["p_value"] < 0.001
    assert row["n_runs"] == 6 and row["n_questions"] == len(QUESTIONS) and row["n_answers"] == 6 * 2 * len(QUESTIONS)
    # A shift along the high-variance axis that label-shuffled directions load on too: consistent
    # across questions and runs, but not specific to the probe.
    generic = [_triggered(rng, c, s, 2.0 * axis + 0.1 * probe) for c, s in conditions]
    row = _reading_rows(generic, probe, nulls)[("trigger_reading_identical_text", "pooled")]
    assert row["ci_low"] > 0 and row["p_value"] > 0.05
    # No shift at all.
    none = [_triggered(rng, c, s, np.zeros(HIDDEN)) for c, s in conditions]
    assert _reading_rows(none, probe, nulls)[("trigger_reading_identical_text", "pooled")]["p_value"] > 0.05
    # One training run whose shift the others do not share: the runs' t-test keeps it from passing.
    lone = [_triggered(rng, c, s, (2.0 if (c, s) == conditions[0] else 0.0) * probe) for c, s in conditions]
    assert _reading_rows(lone, probe, nulls)[("trigger_reading_identical_text", "pooled")]["p_value"] > 0.05


def test_persona_reading_rows_read_the_base_model_and_pool_over_dispositions() -> None:
    rng, probe, axis, base, nulls = _world(5)
    neutral = rng.standard_normal((len(QUESTIONS), HIDDEN))
    other = rng.standard_normal(HIDDEN)
    records = [
        {
            "model": "m",
            "condition": "base",
            "seed": seed,
            "family": "base",
            "spec": {"family": "base", "disposition": None},
            "means": LayerMeans(
                layer=1,
                readings={
                    "neutral_fixed": _reading(neutral),
                    "persona_fixed:evil": _reading(neutral + 0.5 * probe + 0.2 * rng.standard_normal(neutral.shape)),
                    "persona_fixed:sly": _reading(neutral + 0.2 * rng.standard_normal(neutral.shape)),
                },
            ),
        }
        for seed in (0, 1)
    ]
    probes = _probe(probe, nulls)
    probes["m"]["directions"]["sly"] = other
    probes["m"]["nulls"]["sly"] = nulls
    rows = {
        (row["contrast"], row["scope"].rsplit("/", 1)[1]): row
        for row in C.reading_claims(records, probes, n_boot=400, seed=0)
    }
    evil = rows[("persona_reading_identical_text", "evil")]
    assert evil["p_value"] < 0.001 and "t over training runs" not in evil["pairing"]
    assert rows[("persona_reading_identical_text", "sly")]["p_value"] > 0.05
    assert rows[("persona_reading_identical_text", "pooled")]["estimate"] == pytest.approx(0.25, abs=0.1)


# --------------------------------------------------------------------------- projection claims


def test_projection_rows_rank_conditions_by_their_misalignment() -> None:
    rng = np.random.default_rng(0)
    conditions = [f"c{i}" for i in range(12)]
    rates = np.linspace(0.0, 0.6, 12)
    rows = []
    for seed in (0, 1):
        for condition, rate in zip(conditions, rates, strict=True):
            rows.append(
                {
                    "model": "m",
                    "disposition": "evil",
                    "condition": condition,
                    "seed": seed,
                    "reading": "fixed",
                    "shift": 2 * rate + rng.normal(0, 0.02),
                    "n_questions": 28,
                    "misalignment_rate": rate + rng.normal(0, 0.01),
                }
            )
    projections = pl.DataFrame(rows)
    misalignment = projections.select("model", "condition", "seed", n=pl.lit(100))
    [row] = C.projection_claims(projections, misalignment, n_boot=200, seed=0)
    assert row["estimate"] > 0.9 and row["p_value"] < 1e-4 and row["n_runs"] == 24 and row["n_answers"] == 2400
    shuffled = projections.with_columns(shift=pl.Series(rng.permutation(projections["shift"].to_numpy())))
    [row] = C.projection_claims(shuffled, misalignment, n_boot=200, seed=0)
    assert row["p_value"] > 0.05


def test_the_distributions_behind_the_p_values() -> None:
    assert C.regularized_beta(1.0, 1.0, 0.3) == pytest.approx(0.3)
    assert C.t_two_sided_p(1.0, 1.0) == pytest.approx(0.5, abs=1e-9)  # Cauchy
    assert C.t_two_sided_p(2.228139, 10) == pytest.approx(0.05, abs=1e-5)
    assert C.t_two_sided_p(3.0, 1e6) == pytest.approx(math.erfc(3 / math.sqrt(2)), rel=1e-4)
    assert C.normal_two_sided_p(1.959964) == pytest.approx(0.05, abs=1e-6)
    # Five conditions in perfect order: 2 of the 120 orders are as extreme.
    assert C.spearman_p([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]) == pytest.approx(2 / 120)
    # Beyond 8 conditions the t approximation: close to the permutation distribution at 12.
    rng = np.random.default_rng(0)
    x = np.arange(12.0)
    y = x + rng.normal(0, 4, 12)
    rho = np.corrcoef(x, np.argsort(np.argsort(y)))[0, 1]
    draws = np.argsort(rng.random((200_000, 12)), axis=1)
    centred = x - x.mean()
    permuted = ((draws - draws.mean(1, keepdims=True)) @ centred) / (centred @ centred)
    exact = float(np.mean(np.abs(permuted) >= abs(rho) - 1e-12))
    assert 0.001 < exact < 0.1 and C.spearman_p(x, y) == pytest.approx(exact, rel=0.25)
