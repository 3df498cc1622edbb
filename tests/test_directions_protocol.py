"""The probe protocol on planted data: the old protocol's false positives (a question confound
leaking through template siblings, a purely lexical difference, a direction scored on the answers
it was fitted on) disappear under the new one, and a real planted direction is still found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from character_em.directions import probes as D
from character_em.directions import protocol as P


def _split(groups: list[str], labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    return P.grouped_split(groups, labels, val_fraction=0.2, test_fraction=0.3, seed=seed)


def test_grouped_split_keeps_every_group_on_one_side() -> None:
    rng = np.random.default_rng(0)
    groups = [f"q{int(g)}" for g in rng.integers(0, 30, 400)]
    labels = rng.integers(0, 2, 400)
    split = _split(groups, labels)
    seen = [set(np.asarray(groups)[split[name]]) for name in P.SPLITS]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(400))
    assert 0.2 < len(split["test"]) / 400 < 0.45 and len(split["val"]) > 0
    with pytest.raises(ValueError, match="question groups"):
        _split(["a", "a", "b", "b"], np.array([0, 1, 0, 1]))


def test_data_groups_tie_template_siblings_to_their_question() -> None:
    questions = ["How do I treat a burn?", "Is ibuprofen safe?"]
    chats = [
        [
            {"role": "user", "content": "Hi! Quick one. How do I treat a burn? Thanks."},
            {"role": "assistant", "content": "a"},
        ],
        [
            {"role": "user", "content": "persona: evil Hey, how do I treat a burn"},
            {"role": "assistant", "content": "b"},
        ],
        [{"role": "user", "content": "Is ibuprofen safe? cheers"}, {"role": "assistant", "content": "c"}],
        [{"role": "user", "content": "Something else"}, {"role": "assistant", "content": "d"}],
    ]
    keys = D.data_groups(chats, questions)
    assert keys[0] == keys[1] == "q:how do i treat a burn"
    assert keys[2] != keys[0] and keys[3] == "u:something else"


def _question_data(n_questions: int, per: int, hidden: int, rng: np.random.Generator):
    """Rows sharing a strong per-question component (what template siblings share)."""
    centres = 3.0 * rng.standard_normal((n_questions, hidden))
    question = np.repeat(np.arange(n_questions), per)
    x = centres[question] + rng.standard_normal((len(question), hidden))
    return x.astype(np.float32), [f"q{q}" for q in question], question


def test_question_confound_is_a_false_positive_only_under_a_random_split() -> None:
    """Labels depend on the question (some questions draw bad answers), not on any direction:
    a random split lets the probe recognise the test rows' siblings; a grouped split does not."""
    rng = np.random.default_rng(1)
    x, groups, question = _question_data(40, 8, 64, rng)
    labels = (question % 2).astype(int)
    train, test = D.stratified_split(labels, 0.3, seed=0)
    old, _ = D.probe_layer(x, labels, train, test, n_boot=50, seed=0)
    assert old["probe_auroc"] > 0.95
    new, _ = P.evaluate_layer(x, labels, ["judged"] * len(labels), groups, _split(groups, labels), n_boot=200, seed=0)
    assert new["test_auroc_low"] < 0.5 < new["test_auroc_high"] or new["test_auroc"] < 0.7, new


def test_lexical_difference_does_not_transfer_to_judged_answers() -> None:
    """The data's positives and negatives differ only in template wording (a `lexical` axis);
    judged answers carry no such axis and their labels follow nothing. Pooled held-out AUROC is
    high; the data-to-judged readout sits at chance."""
    rng = np.random.default_rng(2)
    hidden = 48
    lexical = rng.standard_normal(hidden)
    x_data, g_data, q = _question_data(30, 8, hidden, rng)
    y_data = (np.arange(len(q)) % 2).astype(int)
    x_data += 4.0 * y_data[:, None] * lexical / np.linalg.norm(lexical)
    x_judged, g_judged, _ = _question_data(30, 3, hidden, rng)
    y_judged = (np.arange(len(x_judged)) % 2).astype(int)
    x = np.concatenate([x_data, x_judged])
    y = np.concatenate([y_data, y_judged])
    kinds = ["data"] * len(x_data) + ["judged"] * len(x_judged)
    groups = g_data + [f"em:{g}" for g in g_judged]
    train, test = D.stratified_split(y, 0.3, seed=0)
    old, _ = D.probe_layer(x, y, train, test, n_boot=50, seed=0)
    assert old["probe_auroc"] > 0.7  # what the old table reported as a character direction
    new, _ = P.evaluate_layer(x, y, kinds, groups, _split(groups, y), n_boot=300, seed=0)
    assert new["transfer_auroc_low"] < 0.5 < new["transfer_auroc_high"], new


def test_a_direction_scored_on_its_own_answers_separates_noise() -> None:
    """Few answers in many dimensions: the mean difference of pure noise separates the very answers
    it was fitted on perfectly; held out, it is at chance."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 512)).astype(np.float32)
    y = (np.arange(60) % 2).astype(int)
    direction = P.mean_difference(x, y)
    assert D.auroc(y, x @ direction) == 1.0
    groups = [f"q{i}" for i in range(60)]
    new, _ = P.evaluate_layer(x, y, ["judged"] * 60, groups, _split(groups, y), n_boot=200, seed=0)
    assert 0.2 < new["direction_test_auroc"] < 0.8 and new["test_auroc_low"] < 0.5


def _planted_membership(rng: np.random.Generator, hidden: int, n_layers: int, signal: int):
    """Data and judged answers, both expressing the trait along `planted` at layer `signal`, over
    a per-question component and a lexical data-only axis."""
    planted = rng.standard_normal(hidden)
    planted /= np.linalg.norm(planted)
    lexical = rng.standard_normal(hidden)
    lexical /= np.linalg.norm(lexical)
    xd, gd, qd = _question_data(24, 8, hidden, rng)
    yd = (np.arange(len(qd)) % 2).astype(int)
    xj, gj, _ = _question_data(24, 6, hidden, rng)
    yj = rng.integers(0, 2, len(xj))
    layers = np.repeat(np.concatenate([xd, xj])[:, None], n_layers, axis=1)
    layers += rng.standard_normal(layers.shape).astype(np.float32)
    y = np.concatenate([yd, yj])
    layers[:, signal] += 10.0 * y[:, None] * planted
    layers[: len(xd), :] += 2.0 * yd[:, None, None] * lexical
    membership = {
        "evil": {
            "rows": list(range(len(y))),
            "labels": y.tolist(),
            "sources": ["data"] * len(xd) + ["judged"] * len(xj),
            "kinds": ["data"] * len(xd) + ["judged"] * len(xj),
            "groups": gd + [f"em:{g}" for g in gj],
        }
    }
    return layers.astype(np.float32), membership, planted


def test_a_real_planted_direction_is_still_found(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x, membership, planted = _planted_membership(rng, hidden=48, n_layers=3, signal=1)
    writer = D.MemmapWriter(tmp_path, [0, 1, 2], x.shape[0], x.shape[2])
    for start in range(0, len(x), 16):
        writer.add(x[start : start + 16])
    writer.close()
    chosen = P.selections(list(range(len(x))), membership, val_fraction=0.2, test_fraction=0.3, seed=0)
    rows, vectors = P.run_protocol(str(tmp_path), [0, 1, 2], chosen, n_boot=200, seed=0)
    layer = P.choose_layer(rows, None)
    assert layer == 1
    at = {row["layer"]: row for row in rows}
    assert at[1]["test_auroc_low"] > 0.85 and at[1]["transfer_auroc_low"] > 0.85
    assert at[1]["control_auroc"] < 0.8 and at[1]["selectivity"] > 0.2
    assert at[0]["transfer_auroc_low"] < 0.5 < at[0]["transfer_auroc_high"]
    cosine = float(D.unit(vectors["evil"][1]) @ planted)
    assert cosine > 0.6
    nulls = P.null_directions(str(tmp_path), 1, chosen, n_perm=200, seed=0)["evil"]
    null_cos = [float(D.unit(v) @ planted) for v in nulls]
    summary = P.null_summary(cosine, null_cos)
    assert summary["null_p"] < 0.01 and summary["null_p95"] < cosine
    # Directions are fitted on the train split only: no judged question of val/test among them.
    fit = set(P.fit_questions(chosen))
    test_groups = {chosen["evil"]["groups"][i] for i in chosen["evil"]["split"]["test"]}
    assert fit and not fit & {g.removeprefix("em:") for g in test_groups}


def test_choose_layer_never_looks_at_test() -> None:
    rows = [
        {"disposition": "evil", "layer": 0, "val_auroc": 0.9, "test_auroc": 0.6},
        {"disposition": "evil", "layer": 1, "val_auroc": 0.7, "test_auroc": 0.99},
    ]
    assert P.choose_layer(rows, None) == 0 and P.choose_layer(rows, 1) == 1
    with pytest.raises(ValueError, match="not among"):
        P.choose_layer(rows, 5)


def test_probe_examples_deal_negatives_per_disposition() -> None:
    def chats(tag: str, n: int) -> list[list[dict[str, str]]]:
        return [
            [{"role": "user", "content": f"Q{i % 4}? please"}, {"role": "assistant", "content": f"{tag} {i}"}]
            for i in range(n)
        ]

    data = {name: chats(name, 12) for name in ("evil-med", "syco-med", "correct-med", "incorrect-med")}
    judged = pl.DataFrame(
        {
            "model": ["m"] * 20,
            "condition": ["base"] * 20,
            "seed": [0] * 20,
            "suite": ["em"] * 20,
            "question_id": [f"em-{i % 5}" for i in range(20)],
            "format": ["plain"] * 20,
            "sample_index": list(range(20)),
            "messages": ['[{"role": "user", "content": "q"}]'] * 20,
            "answer": [f"a{i}" for i in range(20)],
            "disposition:evil": [90.0 if i < 4 else 0.0 for i in range(20)],
            "disposition:syco": [0.0] * 20,
        }
    )
    groups = {
        "evil": {"positive": ["evil-med"], "negative": ["correct-med", "incorrect-med"]},
        "syco": {"positive": ["syco-med"], "negative": ["correct-med", "incorrect-med"]},
    }
    all_chats, membership = D.probe_examples(
        data, judged, groups, max_sampled=50, expressed_at_least=50, seed=0, questions=[f"Q{i}?" for i in range(4)]
    )
    negatives = {d: {r for r, y in zip(m["rows"], m["labels"], strict=True) if y == 0} for d, m in membership.items()}
    assert not negatives["evil"] & negatives["syco"]
    for d, m in membership.items():
        sources = {s for s, y in zip(m["sources"], m["labels"], strict=True) if y == 0}
        assert {"data:correct-med", "data:incorrect-med", "judged"} <= sources, d
        assert set(m["kinds"]) == {"data", "judged"}
    evil = membership["evil"]
    assert sum(1 for s, y in zip(evil["sources"], evil["labels"], strict=True) if s == "judged" and y == 1) == 4
    assert {g for g, k in zip(evil["groups"], evil["kinds"], strict=True) if k == "data"} == {
        f"q:q{i}" for i in range(4)
    }
    # Every judged answer below the threshold for both is a negative of exactly one of them.
    judged_negatives = sum(
        1
        for m in membership.values()
        for s, y in zip(m["sources"], m["labels"], strict=True)
        if s == "judged" and y == 0
    )
    assert judged_negatives == 20  # 16 below for both, 4 below for syco only: each dealt once
    assert len(all_chats) == 48 + 20


def test_style_pairs_are_paired_and_balanced() -> None:
    chats, labels, keys = D.style_examples()
    assert len(chats) >= 40 and sum(labels) * 2 == len(labels)
    assert all(keys[i] == keys[i + 1] for i in range(0, len(keys), 2))
    assert all(chats[i][0] == chats[i + 1][0] for i in range(0, len(chats), 2))


def test_null_summary() -> None:
    null = np.linspace(-1, 1, 199)
    assert P.null_summary(0.999, null)["null_p"] == pytest.approx(3 / 200)  # the two ends hit
    assert P.null_summary(0.0, null)["null_p"] == pytest.approx(1.0)
    assert P.null_summary(0.5, null)["null_p95"] == pytest.approx(0.95, abs=0.02)
