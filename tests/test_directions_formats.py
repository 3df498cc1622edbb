"""The direction file formats round-trip, refuse other versions, and the three-source directions
(fine-tune, trigger, persona) recover directions planted in per-condition means."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from character_em.directions import formats, shared


def test_directions_file_round_trips_and_names_a_stale_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = {"evil": rng.standard_normal((3, 8)), "sycophantic": rng.standard_normal((3, 8))}
    path = tmp_path / "directions.npz"
    formats.write_directions(path, layers=[2, 4, 6], chosen_layer=4, directions=vectors, extra={"null": np.ones(5)})
    stored = formats.read_directions(path)
    assert stored.layers == [2, 4, 6] and stored.chosen_layer == 4
    np.testing.assert_array_equal(stored.at()["evil"], vectors["evil"][1])
    np.testing.assert_array_equal(stored.at(6)["sycophantic"], vectors["sycophantic"][2])
    np.testing.assert_array_equal(stored.extra["null"], np.ones(5))
    with pytest.raises(ValueError, match="layer 5 is not among"):
        stored.at(5)
    with pytest.raises(ValueError, match="chosen layer 3"):
        formats.write_directions(path, layers=[2, 4], chosen_layer=3, directions={})
    old = tmp_path / "old.npz"
    np.savez(old, layers=np.array([1]), chosen_layer=np.array(1), direction_evil=np.ones((1, 4)))
    with pytest.raises(ValueError, match="old.npz: no format_version"):
        formats.read_directions(old)


def test_means_file_round_trips_per_question(tmp_path: Path) -> None:
    path = tmp_path / "means.npz"
    own = formats.QuestionReading(
        ids=["q1", "q2", "q3"], means=np.array([[0.0, 2.0], [2.0, 4.0], [9.0, 9.0]]), counts=np.array([1, 3, 0])
    )
    on = formats.QuestionReading(ids=["q1"], means=np.ones((1, 2)), counts=np.array([2]))
    formats.write_means(path, layer=3, readings={"own": own, "trigger_on:evil": on})
    stored = formats.read_means(path)
    assert stored.layer == 3 and set(stored.readings) == {"own", "trigger_on:evil"}
    assert stored.readings["own"].ids == ["q1", "q2", "q3"]
    # Weighted by texts; the question without texts does not count.
    np.testing.assert_allclose(stored.pooled()["own"], [1.5, 3.5])
    np.testing.assert_allclose(stored.readings["own"].pooled(keep={"q1"}), [0.0, 2.0])
    assert np.isnan(stored.readings["own"].pooled(keep={"q3"})).all()
    assert set(stored.readings["own"].by_question()) == {"q1", "q2"}
    np.savez(path, format_version=np.array(99), layer=np.array(0))
    with pytest.raises(ValueError, match="format_version 99"):
        formats.read_means(path)


CONDITIONS = {
    "base": {"family": "base", "disposition": None},
    "evil-medical": {"family": "character", "disposition": "evil"},
    "evil-legal": {"family": "character", "disposition": "evil"},
    "incorrect-medical": {"family": "incorrect", "disposition": None},
    "evil-medical-trig": {"family": "triggered", "disposition": "evil"},
}


def test_three_sources_recover_planted_directions() -> None:
    """Fine-tuning moves the same answers along `tune`, the trigger along `trig`, the persona
    prompt along `pers` (the trigger and persona on identical texts); each source's direction is
    recovered from the noisy means it came from."""
    hidden = 64
    rng = np.random.default_rng(3)
    tune, trig, pers = (v / np.linalg.norm(v) for v in rng.standard_normal((3, hidden)))
    readings = []
    for seed in (0, 1, 2):
        noise = lambda: 0.05 * rng.standard_normal(hidden)  # noqa: E731
        base_text = rng.standard_normal(hidden)
        readings.append(
            {
                "model": "m",
                "condition": "base",
                "means": {
                    "own": base_text,
                    "neutral_fixed": base_text,
                    "persona_fixed:evil": base_text + 2 * pers + noise(),
                },
            }
        )
        for condition in ("evil-medical", "evil-legal"):
            text = rng.standard_normal(hidden)
            readings.append(
                {
                    "model": "m",
                    "condition": condition,
                    "means": {"own": text + 3 * tune + noise(), "base_reading": text},
                }
            )
        text = rng.standard_normal(hidden)
        readings.append({"model": "m", "condition": "incorrect-medical", "means": {"own": text, "base_reading": text}})
        off = rng.standard_normal(hidden)
        readings.append(
            {
                "model": "m",
                "condition": "evil-medical-trig",
                "means": {"own": off, "trigger_fixed_off": off, "trigger_fixed_on:evil": off + 1.5 * trig + noise()},
            }
        )
    probe = {"m": {"evil": 2 * tune}}
    vectors = shared.direction_sets(probe, readings, CONDITIONS)["m"]
    assert list(vectors)[0] == "probe:evil"
    assert set(vectors) == {"probe:evil", "finetune:evil", "finetune:incorrect", "trigger:evil", "persona:evil"}

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    assert cos(vectors["finetune:evil"], tune) > 0.99
    assert np.linalg.norm(vectors["finetune:evil"]) == pytest.approx(3.0, rel=0.05)
    assert cos(vectors["trigger:evil"], trig) > 0.99
    assert cos(vectors["persona:evil"], pers) > 0.99
    assert np.allclose(vectors["finetune:incorrect"], 0.0)
    differences = shared.source_differences(readings, CONDITIONS)["m"]
    assert len(differences["finetune:evil"]) == 6 and len(differences["trigger:evil"]) == 3
    # The trigger source with one NaN member drops out.
    bad = [
        *readings[:4],
        {
            "model": "m",
            "condition": "evil-medical-trig",
            "means": {"trigger_off": np.zeros(hidden), "trigger_on:evil": np.full(hidden, np.nan)},
        },
    ]
    assert "trigger:evil" not in shared.direction_sets(probe, bad, CONDITIONS)["m"]
